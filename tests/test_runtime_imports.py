"""The runtime and the graph package import without torch or transformers (as on a Jetson).

A subprocess installs a meta-path blocker that makes ``import torch`` / ``import transformers`` (and
their submodules) raise ImportError, then imports every module of attanchor_runtime and
attanchor_graphs found by pkgutil.walk_packages, so modules added later are covered too. Modules that
need optional GPU stacks (tensorrt, onnxruntime-gpu, CUDA) must import those lazily, inside functions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

BLOCKED = ("torch", "torchvision", "torchaudio", "transformers")

CHILD = textwrap.dedent(
    """
    import importlib, importlib.abc, json, pkgutil, sys, traceback

    BLOCKED = {blocked!r}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"{{name}} is blocked: the runtime must not import it")
            return None

    sys.meta_path.insert(0, Blocker())
    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED:
            del sys.modules[name]

    report = {{"imported": [], "failed": {{}}, "blocker_works": False}}
    try:
        import torch  # noqa: F401
    except ImportError:
        report["blocker_works"] = True

    def import_all(package_name):
        package = importlib.import_module(package_name)
        report["imported"].append(package_name)
        def onerror(name):
            report["failed"][name] = traceback.format_exc(limit=3)
        for info in pkgutil.walk_packages(package.__path__, package_name + ".", onerror=onerror):
            try:
                importlib.import_module(info.name)
                report["imported"].append(info.name)
            except BaseException:
                report["failed"][info.name] = traceback.format_exc(limit=5)

    for package_name in ("attanchor_runtime", "attanchor_graphs"):
        try:
            import_all(package_name)
        except BaseException:
            report["failed"][package_name] = traceback.format_exc(limit=5)

    import attanchor_runtime.preprocess, attanchor_runtime.text, attanchor_runtime.errors  # noqa: E401,F401

    report["leaked"] = sorted(n for n in sys.modules if n.split(".")[0] in BLOCKED)
    print("REPORT" + json.dumps(report))
    """
).format(blocked=BLOCKED)


def _run_child() -> dict:
    env = dict(os.environ)
    root = Path(__file__).resolve().parents[1]
    # The packages are installed editable; also put their source roots first so a plain checkout works.
    extra = [str(root / "runtime"), str(root / "graphs")]
    env["PYTHONPATH"] = os.pathsep.join(extra + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, cwd=root, timeout=120
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT")]
    assert proc.returncode == 0 and lines, f"child failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1][len("REPORT") :])


def test_runtime_and_graphs_import_without_torch_or_transformers():
    report = _run_child()
    assert report["blocker_works"], "the import blocker did not block torch"
    assert not report["failed"], "modules failed to import without torch/transformers:\n" + "\n".join(
        f"--- {name}\n{tb}" for name, tb in report["failed"].items()
    )
    imported = set(report["imported"])
    assert {"attanchor_runtime", "attanchor_graphs", "attanchor_runtime.preprocess", "attanchor_runtime.text",
            "attanchor_runtime.errors"} <= imported
    assert report["leaked"] == [], f"torch/transformers modules were imported: {report['leaked']}"
