"""Peer benchmark: this project's decoder beside onnxruntime-genai, llama.cpp and transformers, one checkpoint.

    python scripts/bench_peers.py [--dims tinyllava-1b|small] [--rounds 6] [--prompt-len 512] [--new-tokens 64]
        [--threads 2] [--systems NAME,...] [--cache DIR] [--json PATH] [--chart PATH.png] [--seed 0]

Top to bottom, what a run does:

1. checkpoint(): one random-weight LlamaForCausalLM (transformers' own init, torch.manual_seed(--seed)) at
   TinyLLaVA-1B decoder dims (attanchor_export.load.tiny_random.tinyllava_1b_config().text_config: hidden
   2048, 22 layers, 32 / 4 KV heads, intermediate 5632, vocab 32064) or `--dims small` (hidden 256, 2 layers,
   same vocab), saved fp32 safetensors with scripts/make_random_checkpoint.py's tokenizer. Cached by dims+seed.
2. ensure_peers(): a venv of its own for the peers (their pins never touch the project venv), under
   CACHE/venv: torch (the project's version, installed first as the README does; extra pip arguments for it
   from $ATTANCHOR_PEERS_TORCH_PIP_ARGS), onnxruntime-genai, transformers, onnx-ir, matplotlib; then
   llama-cpp-python built once from its PyPI sdist (CMAKE_ARGS="-DGGML_NATIVE=ON", or $CMAKE_ARGS; about
   18 min on the 2-core machine), whose vendor/llama.cpp also gives convert_hf_to_gguf.py and gguf-py.
   CACHE: --cache (or $ATTANCHOR_PEERS_CACHE), default ~/.cache/attanchor-export/peers. Logs: CACHE/logs/.
3. build(): every system from that one checkpoint, each in CACHE/models/<dims>-seed<seed>/<system>/ with a
   build.json (files, bytes on disk, weight bytes read per decode token), cached:
     project-fp32         export_decoder + optimize_decoder, as an export writes decoder.onnx (bench_quant.py)
     project-int4         + quantize_graph (MatMulNBits block 128 asymmetric, accuracy_level 4, the lm_head
                          too: precision.quantize.lm_head_quantized) + precision.ort_fusions.fuse_decoder_file
                          (RMSNorm, residual Adds, rotary, attention reading the KV cache in place):
                          what `attanchor-export --quant int4` writes for onnxruntime
     project-int4-keep-lm-head  the same with the lm_head kept fp32 (the export's --keep-lm-head)
     project-int4-unfused the default int4 weights in the standard-op graph (no onnxruntime fusions)
     project-int8         MatMulNBits bits 8, block 128, accuracy_level 4, lm_head fp32, fused: `--quant int8`
     genai-fp32/-int4     python -m onnxruntime_genai.models.builder -i CKPT -o DIR -p fp32|int4 -e cpu
                          (its defaults: int4 block 32, accuracy_level 4 on CPU)
     llama-f32/-f16       llama.cpp's convert_hf_to_gguf.py --outtype f32|f16
     llama-q4_0/-q4_k_m/-q8_0  llama_cpp.llama_model_quantize (the ctypes API) of the F32 file
     transformers-fp32    the checkpoint itself, eager PyTorch with sdpa attention: the reference row
4. Rounds (--rounds, default 6): every system, plus a memory-bandwidth probe, each in a FRESH child process
   (the project's and transformers' in the project venv, the peers' in the peers venv), in a seeded order
   shuffled anew each round (round_order). A child loads its model, runs one warm-up generate, then one measured generate: the prompt
   (--prompt-len fixed random ids in [3, 32000), the same ids for everyone, no BOS added), the greedy token
   from its logits, then --new-tokens cached greedy steps (EOS ignored). It prints ONE JSON line: prefill_s
   (prompt in -> first token out), decode_tok_s (new_tokens / time from the first token to the last),
   tokens (all 1 + new_tokens greedy ids) and its own peak RSS (VmHWM; os.wait4's ru_maxrss is the fallback,
   it also counts the parent's pages at fork). The parent parses that line (noise on stdout is skipped).
     project: attanchor_runtime.sessions.ort_session (the session options users get) driven by the runtime's
              own decode loop (attanchor_runtime.decode.generate over ort_backend.OrtDecoder: explicit
              position_ids, attention_mask, past -> present; a fused graph reads one KVBuffer per layer in
              place, as OrtBackend decodes it); embedding rows from embed_tokens.npy;
     genai:   og.Model + og.Generator, greedy search, 2 intra-op threads set through og.Config.overlay;
     llama:   llama_cpp.Llama(n_threads=n_threads_batch=2, n_batch=n_ubatch=prompt length), eval() + arg-max;
     transformers: LlamaForCausalLM.from_pretrained(attn_implementation="sdpa"), torch.set_num_threads(2).
   Bandwidth: attanchor_export.bench.probes.BandwidthProbe (a 1 GiB float32 buffer read by numpy/BLAS, best of
   5 repeats of each reader) once per round; the table gives the median and max over rounds.
5. summarize() / format_table(): min / median / max of prefill and decode over rounds, each system's decode
   ratio to project-int4 (median over rounds of the same-round ratio), weights read per token (every weight
   but the token-embedding table, a gather: ONNX initializers except Gather data, GGUF tensors except
   token_embd, safetensors except embed_tokens; the project's decoder takes inputs_embeds, so it has none),
   fraction of the bound = median tok/s * bytes per token / median bandwidth, peak RSS, bytes on disk (the
   project's include embed_tokens.npy, the fp32 table an artifact ships as embed_tokens.bin), and whether
   the fp32 systems' greedy tokens agree. --json writes it all, --chart draws it (matplotlib, in the peers
   venv when the project venv has none).

Workaround (llama.cpp converter): the checkpoint's tokenizer is the project's tiny byte-level BPE, whose
pre-tokenizer hash convert_hf_to_gguf.py does not know ("BPE pre-tokenizer was not recognized"). The
benchmark feeds token ids only and never tokenizes text, so convert_gguf() runs the converter in-process with
its TextModel.get_vocab_base_pre replaced by one that answers "default" (llama.cpp's generic pre-tokenizer);
the vocabulary, token types and all weights are converted as usual.

Not in CI (it builds and runs multi-GB models); tests/test_bench_peers.py checks the parsing and aggregation.
At 1B dims: ~25 GB of disk in CACHE, up to ~10 GB of RAM while building, ~4-6 min per round.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parent.parent
DEFAULT_CACHE = Path.home() / ".cache" / "attanchor-export" / "peers"
MARK = "bench_peers"  # every child's result line carries this key
BASELINE = "project-int4"
REFERENCE = "transformers-fp32"  # the greedy tokens the fp32 systems are compared with

# The peers' versions, pinned so a cached venv and a fresh one measure the same code.
GENAI_VERSION = "0.18.0"
LLAMA_CPP_VERSION = "0.3.36"
PEER_TRANSFORMERS = "5.24.0"  # the genai 0.18 builder imports transformers 5 classes
PEER_PACKAGES = [f"onnxruntime-genai=={GENAI_VERSION}", f"transformers=={PEER_TRANSFORMERS}", "onnx", "onnx-ir",
                 "safetensors", "sentencepiece", "protobuf>=4.21,<5", "matplotlib"]

SMALL_TEXT = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2, "num_attention_heads": 8,
              "num_key_value_heads": 2}


@dataclass(frozen=True)
class System:
    name: str
    label: str
    family: str  # project | genai | llama | transformers: which builder and runner
    variant: str
    fp32: bool = False


SYSTEMS = [
    System("project-fp32", "this project fp32", "project", "fp32", fp32=True),
    System("project-int4", "this project int4 (the default: block 128, lm_head int4, fused, KV read in place)", "project",
           "int4"),
    System("project-int4-keep-lm-head", "this project int4, lm_head fp32 (--keep-lm-head), fused", "project",
           "int4-keep-lm-head"),
    System("project-int4-unfused", "this project int4, standard ops (no onnxruntime fusions)", "project",
           "int4-unfused"),
    System("project-int8", "this project int8 (MatMulNBits block 128, lm_head fp32, fused)", "project", "int8"),
    System("genai-fp32", "onnxruntime-genai builder fp32", "genai", "fp32", fp32=True),
    System("genai-int4", "onnxruntime-genai int4 (block 32)", "genai", "int4"),
    System("llama-f32", "llama.cpp F32", "llama", "f32", fp32=True),
    System("llama-f16", "llama.cpp F16", "llama", "f16"),
    System("llama-q4_0", "llama.cpp Q4_0", "llama", "q4_0"),
    System("llama-q4_k_m", "llama.cpp Q4_K_M", "llama", "q4_k_m"),
    System("llama-q8_0", "llama.cpp Q8_0", "llama", "q8_0"),
    System("transformers-fp32", "transformers eager (sdpa) fp32", "transformers", "fp32", fp32=True),
]
BY_NAME = {s.name: s for s in SYSTEMS}
BANDWIDTH = "bandwidth"  # the probe child, one per round like a system
# Per family, bumped when its recipe changes: cached folders of another version are rebuilt.
BUILD_VERSION = {"project": 3, "genai": 2, "llama": 2, "transformers": 2}


class BenchError(Exception):
    """A one-line reason the run cannot go on (a peer that fails to build names itself and its log)."""


def say(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------ 1. checkpoint


def text_config(dims: str):
    from attanchor_export.load.tiny_random import tinyllava_1b_config

    config = tinyllava_1b_config().text_config
    if dims == "small":
        for key, value in SMALL_TEXT.items():
            setattr(config, key, value)
        config.head_dim = config.hidden_size // config.num_attention_heads
    config.architectures = ["LlamaForCausalLM"]
    return config


def checkpoint(cache: Path, dims: str, seed: int) -> Path:
    """CACHE/checkpoints/<dims>-seed<seed>: config, model.safetensors (fp32), tokenizer; built once."""
    folder = cache / "checkpoints" / f"{dims}-seed{seed}"
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import LlamaForCausalLM

    sys.path.insert(0, str(SCRIPT.parent))
    from make_random_checkpoint import build_tokenizer

    t0 = time.perf_counter()
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(text_config(dims)).eval()
    model.save_pretrained(staging, safe_serialization=True)
    build_tokenizer().save_pretrained(staging)
    del model
    staging.rename(folder)
    say(f"checkpoint {folder} in {time.perf_counter() - t0:.0f} s")
    return folder


# ------------------------------------------------------------------------------------------ 2. peers venv


def peer_python(cache: Path) -> Path:
    return cache / "venv" / "bin" / "python"


def _sh(cmd: list[str], log: Path, what: str, env: dict | None = None) -> None:
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
    if not families & {"genai", "llama"} and not (chart and _needs_peer_matplotlib()):
        return
    python, logs = peer_python(cache), cache / "logs"
    if not python.is_file():
        _sh([sys.executable, "-m", "venv", cache / "venv"], logs / "peers-venv.log", "creating the peers venv")
    packages = [_torch_requirement(), *PEER_PACKAGES]
    marker = cache / "venv" / f".base-{hashlib.sha256(' '.join(packages).encode()).hexdigest()[:12]}"
    if not marker.is_file():
        say(f"installing the peers' packages into {cache / 'venv'} (log: {logs / 'peers-pip.log'})")
        extra = os.environ.get("ATTANCHOR_PEERS_TORCH_PIP_ARGS", "").split()  # e.g. a CPU-only torch index
        _sh([python, "-m", "pip", "install", *extra, packages[0]], logs / "peers-pip.log",
            "pip install torch (peers venv)")
        _sh([python, "-m", "pip", "install", *packages[1:]], logs / "peers-pip.log",
            "pip install onnxruntime-genai and friends (peers venv)")
        marker.write_text(json.dumps(packages) + "\n")
    if "llama" in families:
        ensure_llama_cpp(cache)


def llama_source(cache: Path) -> Path:
    return cache / "src" / f"llama_cpp_python-{LLAMA_CPP_VERSION}"


def llama_tree(cache: Path) -> Path:
    """llama.cpp as the sdist vendors it: convert_hf_to_gguf.py, conversion/, gguf-py/."""
    return llama_source(cache) / "vendor" / "llama.cpp"


def ensure_llama_cpp(cache: Path) -> None:
    marker = cache / "venv" / f".llama-cpp-python-{LLAMA_CPP_VERSION}.json"
    if marker.is_file():
        return
    src, log = cache / "src", cache / "logs" / "llama-cpp-python-build.log"
    sdist = src / f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"
    if not sdist.is_file():
        say(f"downloading the llama-cpp-python {LLAMA_CPP_VERSION} sdist (log: {log})")
        _sh([peer_python(cache), "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={LLAMA_CPP_VERSION}", "-d", src], log, "llama.cpp: downloading the sdist")
    if not (llama_source(cache) / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").is_file():
        with tarfile.open(sdist) as tar:
            tar.extractall(src, filter="data")  # for convert_hf_to_gguf.py and gguf-py
    cmake_args = os.environ.get("CMAKE_ARGS", "-DGGML_NATIVE=ON")
    say(f"building llama-cpp-python {LLAMA_CPP_VERSION} from source, CMAKE_ARGS={cmake_args!r} "
        f"(several minutes, once; log: {log})")
    t0 = time.perf_counter()
    _sh([peer_python(cache), "-m", "pip", "install", "-v", "--no-binary", "llama-cpp-python", sdist], log,
        "llama.cpp: building llama-cpp-python from source",
        env={"CMAKE_ARGS": cmake_args, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)})
    seconds = round(time.perf_counter() - t0)
    marker.write_text(json.dumps({"version": LLAMA_CPP_VERSION, "cmake_args": cmake_args, "build_s": seconds}) + "\n")
    say(f"llama-cpp-python built in {seconds} s")


def _needs_peer_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return True
    return False


# ------------------------------------------------------------------------------------------ 3. build


def model_dir(cache: Path, dims: str, seed: int, system: str) -> Path:
    return cache / "models" / f"{dims}-seed{seed}" / system


def build(system: System, cache: Path, ckpt: Path, dims: str, seed: int) -> dict:
    """The system's folder with its build.json (built now unless cached); returns build.json."""
    out = model_dir(cache, dims, seed, system.name)
    if (out / "build.json").is_file():
        cached = json.loads((out / "build.json").read_text())
        if cached.get("build_version") == BUILD_VERSION[system.family]:
            return cached
    if system.family == "transformers":
        info = {"model": str(ckpt), "files": sorted(str(p) for p in ckpt.glob("*.safetensors")),
                "weight_bytes_per_token": safetensors_weight_bytes(ckpt)}
    else:
        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        say(f"building {system.name} ...")
        t0 = time.perf_counter()
        builder = {"project": build_project, "genai": build_genai, "llama": build_llama}[system.family]
        info = builder(system, staging, cache, ckpt, dims, seed)
        info["build_s"] = round(time.perf_counter() - t0, 1)
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
        info = json.loads(json.dumps(info).replace(str(staging), str(out)))
        info["files"] = sorted(str(p) for p in out.rglob("*") if p.is_file())
        say(f"built {system.name} in {info['build_s']:.0f} s")
    info["file_bytes"] = sum(Path(p).stat().st_size for p in info["files"])
    info["build_version"] = BUILD_VERSION[system.family]
    out.mkdir(parents=True, exist_ok=True)
    (out / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def build_project(system: System, out: Path, cache: Path, ckpt: Path, dims: str, seed: int) -> dict:
    """decoder.onnx as an export writes it: traced by export_decoder, pinned and checked, rewritten by the
    grouped-attention pass; int4 from that fp32 graph with the export's MatMulNBits path."""
    import numpy as np
    import onnx
    import onnx_ir as ir
    from attanchor_runtime.manifest import KV_CONCAT

    from attanchor_export.options import ARTIFACT_IR_VERSION
    from attanchor_export.precision.ort_fusions import fuse_decoder_file
    from attanchor_export.precision.quantize import lm_head_quantized
    from attanchor_export.precision.streamed_weights import linear_nodes, quantize_graph, save_beside
    from attanchor_export.precision.weights import DEFAULT_ACCURACY_LEVEL

    if system.variant == "fp32":
        import torch
        from transformers import LlamaForCausalLM

        from attanchor_export.families.base import decoder_spec
        from attanchor_export.trace.decoder import export_decoder
        from attanchor_export.trace.optimize import optimize_decoder

        model = LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
        model_dims = project_dims(model.config)
        path = out / "decoder.onnx"
        export_decoder(model.model, model.lm_head, model_dims, decoder_spec(model_dims), path, 18)
        proto = onnx.load(str(path), load_external_data=False)
        proto.ir_version = ARTIFACT_IR_VERSION
        path.write_bytes(proto.SerializeToString())
        onnx.checker.check_model(str(path))
        optimized = optimize_decoder(path, model_dims)
        np.save(out / "embed_tokens.npy", model.model.embed_tokens.weight.detach().numpy().astype(np.float32))
        del model
        notes = {"optimize": {k: v for k, v in optimized.items() if isinstance(v, (int, float, str))},
                 "kv_cache": KV_CONCAT}
    else:
        from attanchor_runtime.manifest import Dims

        fp32_build = build(BY_NAME["project-fp32"], cache, ckpt, dims, seed)
        src = Path(fp32_build["model"])
        model = ir.load(str(src))
        quant = system.variant.split("-")[0]  # int4 | int8
        lm_head = lm_head_quantized(quant, False if system.variant == "int4-keep-lm-head" else None)
        nodes, _ = linear_nodes(model.graph, lm_head)
        level = DEFAULT_ACCURACY_LEVEL[quant]
        count = quantize_graph(model, nodes, int(quant[3:]), 128, symmetric=False, qdq=False, accuracy_level=level)
        if count != len(nodes):
            raise BenchError(f"{system.name}: quantized {count} of {len(nodes)} linears")
        path = out / "decoder.onnx"
        save_beside(model, path, ARTIFACT_IR_VERSION)
        del model
        os.link(src.with_name("embed_tokens.npy"), out / "embed_tokens.npy")
        model_dims = Dims.from_json(fp32_build["dims"])
        notes = {"block_size": 128, "symmetric": False, "accuracy_level": level, "lm_head_quantized": lm_head,
                 "quantized_linears": count, "kv_cache": KV_CONCAT}
        if system.variant != "int4-unfused":  # the export's onnxruntime form (ExportOptions.ort_fusions)
            notes["ort_fusions"] = fuse_decoder_file(path, model_dims)
            notes["kv_cache"] = notes["ort_fusions"]["kv_cache"]
    return {"model": str(path), "dims": model_dims.to_json(), "notes": notes,
            "weight_bytes_per_token": onnx_weight_bytes(path)}


def project_dims(config):
    from attanchor_runtime.manifest import Dims

    return Dims(
        hidden_size=config.hidden_size, num_layers=config.num_hidden_layers, num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads, head_dim=config.hidden_size // config.num_attention_heads,
        vocab_size=config.vocab_size, image_tokens=576, image_size=336, patch_size=14, vision_hidden_size=1024,
        max_position_embeddings=config.max_position_embeddings, tie_word_embeddings=False,
    )


def build_genai(system: System, out: Path, cache: Path, ckpt: Path, dims: str, seed: int) -> dict:
    log = cache / "logs" / f"build-{system.name}.log"
    log.unlink(missing_ok=True)
    _sh([peer_python(cache), "-m", "onnxruntime_genai.models.builder", "-i", ckpt, "-o", out,
         "-p", system.variant, "-e", "cpu", "-c", cache / "genai-builder-cache"], log,
        f"onnxruntime-genai: building {system.name}")
    path = out / "model.onnx"
    if not path.is_file():
        raise BenchError(f"onnxruntime-genai: {system.name}: the builder wrote no model.onnx; log: {log}")
    genai = json.loads((out / "genai_config.json").read_text())
    return {"model": str(out), "weight_bytes_per_token": onnx_weight_bytes(path),
            "notes": {"builder": f"onnxruntime-genai {GENAI_VERSION}", "precision": system.variant,
                      "search": genai.get("search", {})}}


GGUF_QUANT = {"q4_0": 2, "q4_k_m": 15, "q8_0": 7}  # llama_ftype: LLAMA_FTYPE_MOSTLY_Q4_0, _Q4_K_M, _Q8_0


def build_llama(system: System, out: Path, cache: Path, ckpt: Path, dims: str, seed: int) -> dict:
    log = cache / "logs" / f"build-{system.name}.log"
    log.unlink(missing_ok=True)
    path = out / f"model-{system.variant}.gguf"
    if system.variant in ("f32", "f16"):
        peer_task(cache, "gguf-convert", {"checkpoint": str(ckpt), "out": str(path), "outtype": system.variant,
                                          "llama_tree": str(llama_tree(cache))},
                  log, f"llama.cpp: converting to {system.variant.upper()}")
        notes = {"converter": "convert_hf_to_gguf.py (vendor/llama.cpp of llama-cpp-python "
                 f"{LLAMA_CPP_VERSION}), pre-tokenizer 'default'", "outtype": system.variant}
    else:
        source = Path(build(BY_NAME["llama-f32"], cache, ckpt, dims, seed)["model"])
        peer_task(cache, "gguf-quantize", {"src": str(source), "dst": str(path), "ftype": GGUF_QUANT[system.variant]},
                  log, f"llama.cpp: quantizing to {system.variant.upper()}")
        notes = {"quantizer": "llama_cpp.llama_model_quantize", "from": source.name}
    tensors = peer_task(cache, "gguf-bytes", {"path": str(path), "llama_tree": str(llama_tree(cache))}, log,
                        "llama.cpp: reading the GGUF tensors")
    notes["tensor_types"] = tensors["types"]
    return {"model": str(path), "weight_bytes_per_token": tensors["weight_bytes"], "notes": notes}


def peer_task(cache: Path, task: str, spec: dict, log: Path, what: str) -> dict:
    """One helper task of this script run by the peers venv's python; returns its JSON line."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        proc = subprocess.run([str(peer_python(cache)), str(SCRIPT), "--child", task, "--spec", json.dumps(spec)],
                              stdout=subprocess.PIPE, stderr=f, text=True)
        f.write(proc.stdout)
    result = parse_child_output(proc.stdout)
    if proc.returncode != 0 or result is None:
        raise BenchError(f"{what} failed (exit {proc.returncode}); log: {log}")
    return result


def onnx_weight_bytes(path: Path) -> int:
    """Bytes of the initializers a decode step reads: all but the data of a Gather (the token-embedding
    table, of which one row is read per token). Nothing is loaded."""
    from attanchor_export.bench.probes import decoder_weight_bytes

    return decoder_weight_bytes(path, skip_gathered=True)


def safetensors_weight_bytes(folder: Path, skip: str = "embed_tokens") -> int:
    """Bytes of every tensor in the folder's *.safetensors except the embedding table (header only)."""
    total = 0
    for file in folder.glob("*.safetensors"):
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, entry in header.items():
            if name != "__metadata__" and skip not in name:
                start, end = entry["data_offsets"]
                total += end - start
    return total


# ------------------------------------------------------------------------------------------ 4. runners
# Each runs in a fresh child, prints ONE JSON line (run_child_main) and exits. Timing: `prefill_s` is the
# prompt in -> the first greedy token out; `decode_tok_s` is new_tokens / (last token out - first token out).

clock = time.perf_counter


def _measure(generate, warmup: int) -> dict:
    for _ in range(warmup):
        generate()
    start, token_times, tokens = generate()
    decode_s = token_times[-1] - token_times[0]
    return {"prefill_s": token_times[0] - start, "decode_s": decode_s,
            "decode_tok_s": (len(token_times) - 1) / decode_s, "tokens": [int(t) for t in tokens]}


def run_project(spec: dict) -> dict:
    import numpy as np
    from attanchor_runtime.decode import SequentialStep, generate
    from attanchor_runtime.manifest import KV_CONCAT
    from attanchor_runtime.ort_backend import OrtDecoder
    from attanchor_runtime.sessions import ort_session

    t0 = clock()
    session = ort_session(spec["model"], threads=spec["threads"])
    decoder = OrtDecoder.of_session(session, spec["dims"]["max_position_embeddings"], spec.get("kv_cache", KV_CONCAT))
    table = np.load(spec["embed"], mmap_mode="r")  # [vocab, hidden] fp32, the artifact's embed_tokens.bin
    load_s = clock() - t0
    ids = np.array(spec["prompt"], np.int64)[None]

    def embed(tokens):
        return np.asarray(table[tokens], np.float32)[:, None, :]  # the runtime's table lookup (Pipeline.embed)

    def generate_once():
        start, token_times = clock(), []
        mask, positions = np.ones_like(ids), np.arange(ids.shape[1], dtype=np.int64)[None]
        for item in generate(decoder, SequentialStep.after_prefill(mask, positions),
                             np.asarray(table[ids], np.float32), embed, 1 + spec["new_tokens"]):
            if isinstance(item, np.ndarray):
                token_times.append(clock())  # each call's token, the moment the loop yields it
            else:
                tokens = item.tokens[0]
        return start, token_times, tokens

    return {**_measure(generate_once, spec["warmup"]), "load_s": load_s,
            "kv_cache": spec.get("kv_cache", KV_CONCAT)}


def run_transformers(spec: dict) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(spec["threads"])
    t0 = clock()
    model = LlamaForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, attn_implementation="sdpa").eval()
    load_s = clock() - t0
    ids = torch.tensor([spec["prompt"]], dtype=torch.long)

    @torch.inference_mode()
    def generate():
        start = clock()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)  # as generate() prefills
        tokens, token_times = [int(out.logits[0, -1].argmax())], [clock()]
        for _ in range(spec["new_tokens"]):
            out = model(input_ids=torch.tensor([[tokens[-1]]]), cache=out.cache, use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
            token_times.append(clock())
        return start, token_times, tokens

    return {**_measure(generate, spec["warmup"]), "load_s": load_s}


def run_genai(spec: dict) -> dict:
    import onnxruntime_genai as og

    t0 = clock()
    config = og.Config(spec["model"])
    config.clear_providers()  # CPU
    threads = {"intra_op_num_threads": spec["threads"], "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": threads}}}))
    model = og.Model(config)
    load_s = clock() - t0
    total = len(spec["prompt"]) + 1 + spec["new_tokens"]

    def generate():
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=total, batch_size=1)
        generator = og.Generator(model, params)
        start = clock()
        generator.append_tokens(spec["prompt"])  # runs the prompt
        tokens, token_times = [], []
        while len(tokens) < 1 + spec["new_tokens"]:
            if generator.is_done():  # greedy hit EOS (id 2; genai takes no id outside the vocab)
                raise RuntimeError(f"onnxruntime-genai stopped at EOS after {len(tokens)} tokens")
            generator.generate_next_token()  # the arg-max of the last logits (then, next call, one step)
            tokens.append(int(generator.get_next_tokens()[0]))
            token_times.append(clock())
        return start, token_times, tokens

    return {**_measure(generate, spec["warmup"]), "load_s": load_s}


def run_llama(spec: dict) -> dict:
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    n = len(spec["prompt"])
    t0 = clock()
    llm = Llama(spec["model"], n_ctx=n + spec["new_tokens"] + 8, n_batch=n, n_ubatch=n, n_threads=spec["threads"],
                n_threads_batch=spec["threads"], verbose=False)
    load_s = clock() - t0

    vocab = llm.n_vocab()

    def last_token() -> int:  # arg-max of the batch's last logits (eval keeps none unless logits_all)
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))))

    def generate():
        llm.reset()
        start = clock()
        llm.eval(spec["prompt"])
        tokens, token_times = [last_token()], [clock()]
        for _ in range(spec["new_tokens"]):
            llm.eval([tokens[-1]])
            tokens.append(last_token())
            token_times.append(clock())
        return start, token_times, tokens

    return {**_measure(generate, spec["warmup"]), "load_s": load_s}


def run_bandwidth(spec: dict) -> dict:
    from attanchor_export.bench.probes import BandwidthProbe

    probe = BandwidthProbe(spec.get("bytes", 1 << 30)).measure(spec.get("repeats", 5))
    return {"bytes_per_s": probe["bytes_per_s"], "method": probe["method"], "probes": probe["probes"]}


# Helper tasks run in the peers venv (the GGUF files, the chart): same one-JSON-line protocol.


def task_gguf_convert(spec: dict) -> dict:
    """convert_hf_to_gguf.py in-process, its pre-tokenizer check answered with "default" (see the docstring)."""
    sys.path.insert(0, spec["llama_tree"])
    import convert_hf_to_gguf
    from conversion.base import TextModel

    TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
    sys.argv = ["convert_hf_to_gguf.py", spec["checkpoint"], "--outfile", spec["out"], "--outtype", spec["outtype"]]
    stdout = sys.stdout
    sys.stdout = sys.stderr  # the converter's prints go to the log, the result line alone to stdout
    try:
        convert_hf_to_gguf.main()
    finally:
        sys.stdout = stdout
    return {"path": spec["out"]}


def task_gguf_quantize(spec: dict) -> dict:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = spec["ftype"]
    params.nthread = os.cpu_count() or 2
    rc = llama_cpp.llama_model_quantize(spec["src"].encode(), spec["dst"].encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")
    return {"path": spec["dst"]}


def task_gguf_bytes(spec: dict) -> dict:
    sys.path.insert(0, str(Path(spec["llama_tree"]) / "gguf-py"))
    from gguf import GGUFReader

    reader = GGUFReader(spec["path"])
    types: dict[str, int] = {}
    total = 0
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        if t.name != "token_embd.weight":
            total += int(t.n_bytes)
    return {"weight_bytes": total, "types": types,
            "token_embd": next((t.tensor_type.name for t in reader.tensors if t.name == "token_embd.weight"), None),
            "output": next((t.tensor_type.name for t in reader.tensors if t.name == "output.weight"), None)}


def task_chart(spec: dict) -> dict:
    write_chart(json.loads(Path(spec["json"]).read_text()), Path(spec["png"]))
    return {"png": spec["png"]}


CHILDREN = {"project": run_project, "transformers": run_transformers, "genai": run_genai, "llama": run_llama,
            BANDWIDTH: run_bandwidth, "gguf-convert": task_gguf_convert, "gguf-quantize": task_gguf_quantize,
            "gguf-bytes": task_gguf_bytes, "chart": task_chart}


def vm_hwm() -> int | None:
    """This process's peak resident set (VmHWM) in bytes: its own, unlike ru_maxrss of a forked child, which
    also counts the parent's pages at fork time."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def run_child_main(task: str, spec: dict) -> int:
    result = CHILDREN[task](spec)
    print(json.dumps({MARK: 1, "task": task, **result, "vm_hwm_bytes": vm_hwm()}), flush=True)
    return 0


# ------------------------------------------------------------------------------------------ rounds


def parse_child_output(stdout: str) -> dict | None:
    """The child's result: the last stdout line that is a JSON object carrying MARK (libraries may print)."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict) and value.get(MARK) == 1:
            return value
    return None


def run_child(cmd: list[str], log: Path, timeout: float, threads: int) -> tuple[int, str, int, float]:
    """(exit status, stdout, ru_maxrss in bytes, wall seconds); stderr goes to `log`. ru_maxrss is only the
    fallback figure for the child's peak RSS (see vm_hwm)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            stdout = proc.stdout.read()
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, stdout, int(usage.ru_maxrss) * 1024, time.perf_counter() - t0


def run_record(name: str, round_no: int, rc: int, stdout: str, ru_maxrss: int, wall: float, log: Path) -> dict:
    """One measurement as the summary reads it: ok (exit 0 and a result line) with the child's figures, peak
    RSS (its VmHWM, else ru_maxrss), and where its log is."""
    result = parse_child_output(stdout) if rc == 0 else None
    run = {"system": name, "round": round_no, "returncode": rc, "ru_maxrss_bytes": ru_maxrss, "wall_s": round(wall, 2),
           "log": str(log), **({"ok": True, **result} if result else {"ok": False})}
    run.pop(MARK, None)
    run["peak_rss_bytes"] = run.get("vm_hwm_bytes") or ru_maxrss
    return run


def round_order(names: list[str], round_index: int, seed: int = 0) -> list[str]:
    """The order of one round: a seeded shuffle, different each round. Not a rotation: a rotation keeps
    every system behind the same neighbour, so whatever a neighbour leaves behind (a 4.7 GB fp32 process
    that just freed its memory) biases the same system every round. With rotation project-int4, always
    right after project-fp32, measured 0.87x the unfused int4 form; the two alone, 1.08x."""
    order = list(names)
    random.Random(f"{seed}-{round_index}").shuffle(order)
    return order


def measure(entries: list[str], specs: dict, args, cache: Path, log_dir: Path) -> list[dict]:
    """Every entry (systems + the bandwidth probe), `args.rounds` rounds, fresh child each, order shuffled."""
    runs = []
    for r in range(args.rounds):
        for name in round_order(entries, r, args.seed):
            spec, python, task = specs[name]
            log = log_dir / f"round{r + 1}-{name}.log"
            rc, stdout, rss, wall = run_child([python, str(SCRIPT), "--child", task, "--spec", json.dumps(spec)],
                                              log, args.child_timeout, args.threads)
            run = run_record(name, r + 1, rc, stdout, rss, wall, log)
            runs.append(run)
            if not run["ok"]:
                say(f"  round {r + 1} {name}: FAILED (exit {rc}); log: {log}")
            elif name == BANDWIDTH:
                say(f"  round {r + 1} {name}: {run['bytes_per_s'] / 1e9:.1f} GB/s ({run['method']})")
            else:
                say(f"  round {r + 1} {name}: prefill {run['prefill_s']:.2f} s, decode {run['decode_tok_s']:.1f} tok/s, "
                    f"peak RSS {run['peak_rss_bytes'] / 1e9:.2f} GB")
    return runs


# ------------------------------------------------------------------------------------------ 5. summary


def _stats(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def _prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def summarize(runs: list[dict], builds: dict[str, dict], baseline: str = BASELINE, reference: str = REFERENCE,
              labels: dict[str, str] | None = None, fp32: set[str] | None = None) -> dict:
    """Per system: prefill / decode min-median-max over its successful runs, decode ratio to `baseline`
    (median over rounds of the same-round ratio), weights per token, fraction of the bandwidth bound (median
    tok/s * bytes per token / median bandwidth), peak RSS (max), bytes on disk, greedy agreement with
    `reference` (the fp32 systems' tokens must match it). `builds`: system -> build.json."""
    labels = labels or {s.name: s.label for s in SYSTEMS}
    fp32 = fp32 if fp32 is not None else {s.name for s in SYSTEMS if s.fp32}
    ok = [r for r in runs if r.get("ok")]
    bw = _stats([r["bytes_per_s"] for r in ok if r["system"] == BANDWIDTH])
    by_round = {(r["system"], r["round"]): r for r in ok}
    rank = {name: i for i, name in enumerate(labels)}  # the table lists systems as given, not as first run
    names = sorted((n for n in dict.fromkeys(r["system"] for r in runs) if n != BANDWIDTH),
                   key=lambda n: rank.get(n, len(rank)))
    ref_tokens = next((r["tokens"] for r in ok if r["system"] == reference), None)
    systems = {}
    for name in names:
        mine = [r for r in ok if r["system"] == name]
        entry = {"label": labels.get(name, name), "runs": len(mine),
                 "failed": sum(1 for r in runs if r["system"] == name and not r.get("ok")),
                 "failed_logs": [r["log"] for r in runs if r["system"] == name and not r.get("ok")],
                 "prefill_s": _stats([r["prefill_s"] for r in mine]),
                 "decode_tok_s": _stats([r["decode_tok_s"] for r in mine]),
                 "peak_rss_bytes": max((r["peak_rss_bytes"] for r in mine), default=None)}
        build_info = builds.get(name, {})
        entry["file_bytes"] = build_info.get("file_bytes")
        entry["weight_bytes_per_token"] = build_info.get("weight_bytes_per_token")
        ratios = [r["decode_tok_s"] / by_round[(baseline, r["round"])]["decode_tok_s"]
                  for r in mine if (baseline, r["round"]) in by_round]
        entry["decode_ratio_to_baseline"] = statistics.median(ratios) if ratios else None
        prefill_ratios = [by_round[(baseline, r["round"])]["prefill_s"] / r["prefill_s"]
                          for r in mine if (baseline, r["round"]) in by_round]
        entry["prefill_speed_ratio_to_baseline"] = statistics.median(prefill_ratios) if prefill_ratios else None
        if bw and entry["decode_tok_s"] and entry["weight_bytes_per_token"]:
            entry["bytes_per_s_read"] = entry["decode_tok_s"]["median"] * entry["weight_bytes_per_token"]
            entry["fraction_of_bound"] = entry["bytes_per_s_read"] / bw["median"]
        else:
            entry["bytes_per_s_read"] = entry["fraction_of_bound"] = None
        if mine:
            entry["tokens"] = mine[0]["tokens"]
            entry["tokens_stable"] = all(r["tokens"] == mine[0]["tokens"] for r in mine)
            entry["agree_with_reference"] = _prefix(mine[0]["tokens"], ref_tokens) if ref_tokens else None
        systems[name] = entry
    fp32_present = [n for n in names if n in fp32 and systems[n]["runs"]]
    agree = (all(systems[n]["tokens"] == systems[fp32_present[0]]["tokens"] for n in fp32_present)
             if fp32_present else None)
    return {"systems": systems, "bandwidth": bw, "baseline": baseline, "reference": reference,
            "fp32_systems": fp32_present, "fp32_tokens_agree": agree}


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _mmm(s: dict | None, fmt: str) -> str:
    return " / ".join(format(s[k], fmt) for k in ("min", "median", "max")) if s else "-"


def format_table(summary: dict, prompt_len: int | None = None) -> str:
    """Markdown table (min / median / max) + the bandwidth line + the greedy-agreement line."""
    baseline = summary["baseline"]
    prefill = f"prefill {prompt_len} tok (s)" if prompt_len else "prefill (s)"
    lines = [f"| system | {prefill} | decode tok/s | decode vs {baseline} | weights per token | fraction of bound "
             "| peak RSS | file size | runs |", "|---|---|---|---|---|---|---|---|---|"]
    for e in summary["systems"].values():
        ratio = e["decode_ratio_to_baseline"]
        frac = e["fraction_of_bound"]
        runs = f"{e['runs']}" + (f" ({e['failed']} failed)" if e["failed"] else "")
        lines.append(f"| {e['label']} | {_mmm(e['prefill_s'], '.2f')} | {_mmm(e['decode_tok_s'], '.1f')} | "
                     f"{'-' if ratio is None else f'{ratio:.2f}x'} | {_size(e['weight_bytes_per_token'])} | "
                     f"{'-' if frac is None else f'{frac:.0%}'} | {_size(e['peak_rss_bytes'])} | "
                     f"{_size(e['file_bytes'])} | {runs} |")
    bw = summary["bandwidth"]
    if bw:
        lines.append(f"\nmemory read bandwidth: median {bw['median'] / 1e9:.1f} GB/s, max {bw['max'] / 1e9:.1f} GB/s, "
                     f"min {bw['min'] / 1e9:.1f} GB/s ({bw['n']} probes, one per round)")
    else:
        lines.append("\nmemory read bandwidth: not measured")
    agree = summary["fp32_tokens_agree"]
    if agree is None:
        lines.append("fp32 greedy tokens: no fp32 system ran")
    else:
        ref = summary["reference"]
        detail = ", ".join(f"{n} {summary['systems'][n]['agree_with_reference']}"
                           for n in summary["fp32_systems"] if summary["systems"][n].get("agree_with_reference") is not None)
        lines.append(f"fp32 greedy tokens: {'all agree' if agree else 'DISAGREE'} across {', '.join(summary['fp32_systems'])}"
                     + (f" (leading tokens equal to {ref}: {detail})" if detail else ""))
    failed = [(n, e["failed_logs"]) for n, e in summary["systems"].items() if e["failed"]]
    for name, logs in failed:
        lines.append(f"{name}: {len(logs)} failed run(s), first log: {logs[0]}")
    return "\n".join(lines)


def write_chart(result: dict, png: Path) -> None:
    """Decode tok/s (median, min-max whiskers, the bandwidth bound as a tick) and prefill seconds per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    names = [n for n, e in summary["systems"].items() if e["decode_tok_s"]]
    labels = [summary["systems"][n]["label"] for n in names]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.55 * len(names) + 2.2), sharey=True)
    y = range(len(names))
    for ax, key, title in ((ax1, "decode_tok_s", "decode tokens/s (median, min-max)"),
                           (ax2, "prefill_s", f"prefill {result['settings']['prompt_len']} tokens, s")):
        stats = [summary["systems"][n][key] for n in names]
        med = [s["median"] for s in stats]
        err = [[s["median"] - s["min"] for s in stats], [s["max"] - s["median"] for s in stats]]
        colors = ["#4c72b0" if n.startswith("project") else "#999999" if n.startswith("transformers") else "#dd8452"
                  for n in names]
        ax.barh(list(y), med, xerr=err, color=colors, capsize=3)
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    bw = summary["bandwidth"]
    if bw:
        right = 1.3 * max(summary["systems"][n]["decode_tok_s"]["max"] for n in names)
        for i, n in enumerate(names):
            wpt = summary["systems"][n]["weight_bytes_per_token"]
            if wpt and bw["median"] / wpt <= right:
                ax1.plot([bw["median"] / wpt], [i], "k|", markersize=14)
        ax1.set_xlim(0, right)
        ax1.set_xlabel(f"| = bandwidth bound at {bw['median'] / 1e9:.1f} GB/s (median probe; off the axis: not drawn)")
    ax1.set_yticks(list(y), labels)
    ax1.invert_yaxis()
    s = result["settings"]
    fig.suptitle(f"bench_peers: {s['dims']} random weights, {s['threads']} threads, batch 1, {s['new_tokens']} new tokens, "
                 f"{s['rounds']} rounds")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main


def child_specs(systems: list[System], builds: dict, args, prompt: list[int], cache: Path) -> dict:
    specs = {}
    for s in systems:
        spec = {"model": builds[s.name]["model"], "prompt": prompt, "new_tokens": args.new_tokens,
                "threads": args.threads, "warmup": args.warmup}
        if s.family == "project":
            spec["dims"] = builds[s.name]["dims"]
            spec["embed"] = str(Path(builds[s.name]["model"]).with_name("embed_tokens.npy"))
            spec["kv_cache"] = builds[s.name].get("notes", {}).get("kv_cache")
        python = sys.executable if s.family in ("project", "transformers") else str(peer_python(cache))
        specs[s.name] = (spec, python, s.family)
    specs[BANDWIDTH] = ({"bytes": args.bandwidth_bytes, "repeats": 5}, sys.executable, BANDWIDTH)
    return specs


def fixed_prompt(length: int, seed: int) -> list[int]:
    import numpy as np

    return np.random.default_rng(seed + 1).integers(3, 32000, length).tolist()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", choices=["tinyllava-1b", "small"], default="tinyllava-1b")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64, help="decode steps timed after the first token")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--systems", default=",".join(s.name for s in SYSTEMS),
                        help=f"comma-separated subset of: {', '.join(s.name for s in SYSTEMS)}")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("ATTANCHOR_PEERS_CACHE", DEFAULT_CACHE)))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=1, help="untimed generates in each child before the timed one")
    parser.add_argument("--bandwidth-bytes", type=int, default=1 << 30)
    parser.add_argument("--child-timeout", type=float, default=1800)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--chart", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_child_main(args.child, json.loads(args.spec))
    wanted = [n.strip() for n in args.systems.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in BY_NAME]
    if unknown:
        raise BenchError(f"unknown system(s) {', '.join(unknown)}: choose from {', '.join(BY_NAME)}")
    systems = [BY_NAME[n] for n in wanted]
    cache = args.cache.expanduser().resolve()
    cache.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    ckpt = checkpoint(cache, args.dims, args.seed)
    ensure_peers(cache, {s.family for s in systems}, chart=bool(args.chart))
    builds = {s.name: build(s, cache, ckpt, args.dims, args.seed) for s in systems}
    say(f"checkpoint and systems ready in {time.perf_counter() - t0:.0f} s (cache {cache})")

    prompt = fixed_prompt(args.prompt_len, args.seed)
    specs = child_specs(systems, builds, args, prompt, cache)
    log_dir = cache / "logs" / time.strftime("run-%Y%m%d-%H%M%S")
    log_dir.mkdir(parents=True)
    say(f"{args.rounds} rounds of {len(specs)} fresh processes, {args.threads} threads, prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens (child logs: {log_dir})")
    runs = measure([s.name for s in systems] + [BANDWIDTH], specs, args, cache, log_dir)
    summary = summarize(runs, builds, labels={s.name: s.label for s in systems})
    table = format_table(summary, args.prompt_len)
    say("\n" + table)

    settings = {"dims": args.dims, "seed": args.seed, "rounds": args.rounds, "prompt_len": args.prompt_len,
                "new_tokens": args.new_tokens, "threads": args.threads, "warmup": args.warmup,
                "cpu_count": os.cpu_count(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                "versions": {"onnxruntime-genai": GENAI_VERSION, "llama-cpp-python": LLAMA_CPP_VERSION}}
    result = {"settings": settings, "summary": summary, "builds": builds, "runs": runs, "table": table}
    if args.json:
        write_json(args.json, result)
        say(f"wrote {args.json}")
    if args.chart:
        save_chart(result, args.chart, cache, args.json)
        say(f"wrote {args.chart}")
    return 0


def write_json(path: Path, result: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def save_chart(result: dict, png: Path, cache: Path, json_path: Path | None) -> None:
    if not _needs_peer_matplotlib():
        write_chart(result, png)
        return
    source = json_path or png.with_suffix(".json")
    if json_path is None:
        source.write_text(json.dumps(result) + "\n")
    peer_task(cache, "chart", {"json": str(source.resolve()), "png": str(png.resolve())}, cache / "logs" / "chart.log",
              "drawing the chart (peers venv)")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"bench_peers: error: {e}", file=sys.stderr)
        sys.exit(1)
