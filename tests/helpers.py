"""Plain helpers the tests import (fixtures live in conftest.py; pytest discourages importing from it)."""

from __future__ import annotations

import fcntl
import importlib.util
import json
import sys
from contextlib import contextmanager
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    """scripts/NAME.py imported as module NAME (registered in sys.modules: dataclasses look it up)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

# (family, mode, max_anchors): both families, both modes, with and without a budget.
ARTIFACTS = {
    "clip-t2i": ("clip-llama", "t2i", None),
    "clip-i2t-k6": ("clip-llama", "i2t", 6),
    "siglip-t2i-k4": ("siglip-qwen2", "t2i", 4),
    "siglip-i2t": ("siglip-qwen2", "i2t", None),
}


@contextmanager
def locked(path: Path):
    """Exclusive lock beside `path`: one xdist worker builds it, the others wait and reuse it."""
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def read_manifest(folder: Path) -> dict:
    return json.loads((Path(folder) / "manifest.json").read_text())
