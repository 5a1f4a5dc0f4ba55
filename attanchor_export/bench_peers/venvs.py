"""Step 2: the peers' own venv (their pins never touch the project venv), llama-cpp-python built there once
from its sdist, and the helper tasks run by that venv's python."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from .common import SCRIPT, BenchError, parse_child_output, say
from .systems import LLAMA_CPP_VERSION, PEER_PACKAGES


def peer_python(cache: Path) -> Path:
    return cache / "venv" / "bin" / "python"


def sh(cmd: list[str], log: Path, what: str, env: dict | None = None) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(map(str, cmd))}\n")
        f.flush()
        rc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}).returncode
    if rc != 0:
        raise BenchError(f"{what} failed (exit {rc}); log: {log}")


def _torch_requirement() -> str:
    from importlib.metadata import version

    return "torch==" + version("torch").split("+")[0]  # the project's CPU torch (see the README: torch first)


def ensure_peers(cache: Path, families: set[str], chart: bool = False) -> None:
    """The peers venv (base packages once per pin set) and, when llama.cpp is wanted, llama-cpp-python
    built from its sdist once; both marked done by a file, so later runs start at once."""
    if not families & {"genai", "llama"} and not (chart and needs_peer_matplotlib()):
        return
    python, logs = peer_python(cache), cache / "logs"
    if not python.is_file():
        sh([sys.executable, "-m", "venv", cache / "venv"], logs / "peers-venv.log", "creating the peers venv")
    packages = [_torch_requirement(), *PEER_PACKAGES]
    marker = cache / "venv" / f".base-{hashlib.sha256(' '.join(packages).encode()).hexdigest()[:12]}"
    if not marker.is_file():
        say(f"installing the peers' packages into {cache / 'venv'} (log: {logs / 'peers-pip.log'})")
        extra = os.environ.get("ATTANCHOR_PEERS_TORCH_PIP_ARGS", "").split()  # e.g. a CPU-only torch index
        sh([python, "-m", "pip", "install", *extra, packages[0]], logs / "peers-pip.log",
           "pip install torch (peers venv)")
        sh([python, "-m", "pip", "install", *packages[1:]], logs / "peers-pip.log",
           "pip install onnxruntime-genai and friends (peers venv)")
        marker.write_text(json.dumps(packages) + "\n")
    if "llama" in families:
        ensure_llama_cpp(cache)


def llama_source(cache: Path) -> Path:
    return cache / "src" / f"llama_cpp_python-{LLAMA_CPP_VERSION}"


def llama_tree(cache: Path) -> Path:
    """llama.cpp as the sdist vendors it: convert_hf_to_gguf.py, conversion/, gguf-py/."""
    return llama_source(cache) / "vendor" / "llama.cpp"


# On a CPU that lists AMX, -march=native compiles ggml's AMX kernels, and in the VM this project measures on
# their first ldtilecfg dies with a general protection fault (every Q4_0/Q8_0 child exited -11). The build
# keeps every other native ISA (AVX-512, VNNI, BF16, llama.cpp's weight repacking); GCC's explicit -mno-*
# flags win over -march=native whatever their order. $CMAKE_ARGS replaces this default.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def default_cmake_args(cpuinfo: str | None = None) -> str:
    if cpuinfo is None:
        cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    if "amx_tile" not in cpuinfo:
        return "-DGGML_NATIVE=ON"
    return f'-DGGML_NATIVE=ON "-DCMAKE_C_FLAGS={NO_AMX}" "-DCMAKE_CXX_FLAGS={NO_AMX}"'


def ensure_llama_cpp(cache: Path) -> None:
    marker = cache / "venv" / f".llama-cpp-python-{LLAMA_CPP_VERSION}.json"
    cmake_args = os.environ.get("CMAKE_ARGS", default_cmake_args())
    if marker.is_file() and json.loads(marker.read_text()).get("cmake_args") == cmake_args:
        return
    src, log = cache / "src", cache / "logs" / "llama-cpp-python-build.log"
    sdist = src / f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"
    if not sdist.is_file():
        say(f"downloading the llama-cpp-python {LLAMA_CPP_VERSION} sdist (log: {log})")
        sh([peer_python(cache), "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            f"llama-cpp-python=={LLAMA_CPP_VERSION}", "-d", src], log, "llama.cpp: downloading the sdist")
    if not (llama_source(cache) / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").is_file():
        with tarfile.open(sdist) as tar:
            tar.extractall(src, filter="data")  # for convert_hf_to_gguf.py and gguf-py
    say(f"building llama-cpp-python {LLAMA_CPP_VERSION} from source, CMAKE_ARGS={cmake_args!r} "
        f"(several minutes, once; log: {log})")
    t0 = time.perf_counter()
    if marker.is_file():  # built before with other CMAKE_ARGS: pip would keep that build (same version)
        sh([peer_python(cache), "-m", "pip", "uninstall", "-y", "llama-cpp-python"], log, "llama.cpp: uninstalling")
        marker.unlink()
    sh([peer_python(cache), "-m", "pip", "install", "-v", "--no-cache-dir", "--no-binary", "llama-cpp-python", sdist],
       log,
       "llama.cpp: building llama-cpp-python from source",
       env={"CMAKE_ARGS": cmake_args, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)})
    seconds = round(time.perf_counter() - t0)
    marker.write_text(json.dumps({"version": LLAMA_CPP_VERSION, "cmake_args": cmake_args, "build_s": seconds}) + "\n")
    say(f"llama-cpp-python built in {seconds} s")


def needs_peer_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return True
    return False


def peer_task(cache: Path, task: str, spec: dict, log: Path, what: str) -> dict:
    """One helper task of scripts/bench_peers.py run by the peers venv's python; returns its JSON line."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        proc = subprocess.run([str(peer_python(cache)), str(SCRIPT), "--child", task, "--spec", json.dumps(spec)],
                              stdout=subprocess.PIPE, stderr=f, text=True)
        f.write(proc.stdout)
    result = parse_child_output(proc.stdout)
    if proc.returncode != 0 or result is None:
        raise BenchError(f"{what} failed (exit {proc.returncode}); log: {log}")
    return result

