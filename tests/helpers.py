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


TINY_DIMS = {"hidden_size": 64, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16,
             "vocab_size": 672, "image_tokens": 25, "image_size": 30, "patch_size": 6, "vision_hidden_size": 32,
             "max_position_embeddings": 512}


def tiny_manifest(folder="/artifact", max_anchors=None, **sections):
    """A complete manifest in memory (tiny LLaVA dims and graph specs), any section replaced by the JSON
    given for it (manifest.json's own layout), for tests of one section without an export."""
    from attanchor_runtime.manifest import Dims, Graphs, Manifest, to_json

    from attanchor_export.families.base import decoder_spec, embedding_spec
    from attanchor_export.families.llava import vision_spec

    dims = Dims(**{**TINY_DIMS, **sections.pop("dims", {})})
    data = {
        "source": {}, "dims": to_json(dims),
        "family": {"name": "llava", "architecture": "LlavaForConditionalGeneration",
                   "model_types": {"vision": "clip_vision_model", "text": "llama"},
                   "payload": {"image_preprocessing": {}, "positions": "sequential"}},
        "anchor": {"mode": "t2i", "threshold": 0.12, "max_anchors": max_anchors},
        "text": {"image_token_id": 670, "pad_token_id": 671, "bos_token_id": 1, "eos_token_ids": [2]},
        "graphs": to_json(Graphs(vision_spec(dims), embedding_spec(dims, max_anchors), decoder_spec(dims))),
        "embed_table": {"file": "embed_tokens.bin", "dtype": "float32", "shape": [dims.vocab_size, dims.hidden_size]},
        "onnx": {"opset": 18, "ir_version": 10},
        **sections,
    }
    return Manifest.from_dict(folder, data)


def assert_answers_close(folder: Path, reference: dict, items, max_drop: float, min_same: float) -> dict:
    """`folder`'s answers through the runtime on `items` (test questions a gate never graded) against the
    fp32 artifact's `reference` evaluation: accuracy within `max_drop`, identical answers on >= `min_same`."""
    from attanchor_runtime import Pipeline

    from attanchor_export.checks.task_accuracy import evaluate_artifact

    result = evaluate_artifact(Pipeline.load(folder), items)
    assert result["accuracy"] >= reference["accuracy"] - max_drop, (result["by_kind"], reference["by_kind"])
    same = sum(a["answer"] == b["answer"] for a, b in zip(result["records"], reference["records"], strict=True))
    assert same / len(items) >= min_same, same
    return result


def assert_fp32_answers_as_pytorch(checkpoint: Path, fp32_eval) -> None:
    """A trained tiny model's fp32 artifact (`fp32_eval`: pipe, items, evaluation) answers every question
    exactly as its PyTorch checkpoint does, accurately, with anchors inserted."""
    from attanchor_export.checks.task_accuracy import torch_answers
    from attanchor_export.load.checkpoint import load_checkpoint

    pipe, items, result = fp32_eval
    reference = torch_answers(load_checkpoint(str(checkpoint)), pipe, items, pipe.default_threshold)
    runtime = [r["answer"] for r in result["records"]]
    assert runtime == reference  # the same answers, question by question, not just the same rate
    assert result["accuracy"] >= 0.90, result["by_kind"]
    assert result["anchors_per_question"] > 0


def assert_word_anchors_on_the_shape(fp32_eval) -> None:
    """Colour and shape words were anchored next to patches on the shape, well above chance."""
    loc = fp32_eval[2]["localisation"]
    assert loc["word_anchors"] >= 20, loc
    assert loc["on_shape"] >= 0.40 and loc["ratio_to_chance"] >= 2.0, loc
