"""Export memory: the traced graphs hold no second copy of the weights, and let go of the model's.

The figures at real dimensions come from scripts/bench_export.py; these tests pin the two properties
behind them on a tiny checkpoint so they cannot regress silently.
"""

from __future__ import annotations

import gc
import weakref

import onnx


def test_linear_weights_are_written_lazily_not_folded(artifact):
    """Every MatMul weight of decoder.onnx is the lazily transposed source tensor (`<name>.T`), i.e. the
    optimizer never folded a Transpose into a new in-memory constant."""
    model = onnx.load(str(artifact("clip-t2i") / "decoder.onnx"), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    weights = [n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in initializers]
    assert len(weights) >= 7 * 2  # q k v o gate up down per layer, two layers (+ lm_head)
    assert all(name.endswith(".weight.T") for name in weights), weights


def test_model_weights_are_freed_before_onnxruntime_runs(checkpoint, tmp_path, monkeypatch):
    import attanchor_export.exporter as exporter
    from attanchor_export.exporter import ExportOptions, export_artifact

    seen = {}
    real_source, real_compare = exporter.source_outputs, exporter.compare_with_source

    def reference(loaded, *args, **kwargs):
        language_model = loaded.family.language_model(loaded.model)
        seen["weight"] = weakref.ref(language_model.layers[0].self_attn.q_proj.weight)
        seen["tower"] = weakref.ref(next(loaded.family.vision_module(loaded.model).parameters()))
        return real_source(loaded, *args, **kwargs)

    def compare(*args, **kwargs):
        gc.collect()
        seen["alive"] = [name for name in ("weight", "tower") if seen[name]() is not None]
        return real_compare(*args, **kwargs)

    monkeypatch.setattr(exporter, "source_outputs", reference)
    monkeypatch.setattr(exporter, "compare_with_source", compare)
    assert export_artifact(str(checkpoint("clip-llama")), ExportOptions(output=tmp_path / "art")).passed
    # Nothing (traced programs, onnxscript's rewrite rules, lazy tensors) keeps the weights alive.
    assert seen["alive"] == []
