"""The decoder traced at two layers with layer 1 repeated (trace/layer_repeat.py) is the decoder traced
layer by layer: same IO, same ops, the same outputs to the bit, for the LLaVA (llama) and Qwen2.5-VL
(Qwen2, M-RoPE, q/k/v biases) families, from a loaded model and from a streamed one."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import locked

from attanchor_export.load.checkpoint import load_checkpoint
from attanchor_export.options import DEFAULT_OPSET
from attanchor_export.trace.decoder import export_decoder

LAYERS = 4


def _llama(path: Path) -> Path:
    from attanchor_export.load.tiny_random import make_tiny_llava

    return make_tiny_llava(path, text_dims={"num_hidden_layers": LAYERS})


def _qwen(path: Path) -> Path:
    from transformers import Qwen2_5_VLForConditionalGeneration

    from attanchor_export.load import tiny_qwen2_5_vl as tiny

    def config(tokenizer):
        config = tiny.tiny_qwen2_5_vl_config(tokenizer)
        config.text_config.num_hidden_layers = LAYERS
        if getattr(config.text_config, "layer_types", None):
            config.text_config.layer_types = [config.text_config.layer_types[0]] * LAYERS
        return config

    return tiny._make(path, 0, config, Qwen2_5_VLForConditionalGeneration)


@pytest.fixture(scope="module", params=["llama", "qwen2_5_vl"])
def four_layers(request, shared_dir) -> Path:
    path = shared_dir / f"ck-{request.param}-{LAYERS}-layers"
    with locked(path):
        if not (path / "config.json").is_file():
            {"llama": _llama, "qwen2_5_vl": _qwen}[request.param](path)
    return path


def _export(folder: Path, out: Path, streamed: bool, every_layer: bool, monkeypatch) -> Path:
    monkeypatch.setenv("ATTANCHOR_TRACE_EVERY_LAYER", "1" if every_layer else "0")
    loaded = load_checkpoint(str(folder), streamed=streamed)
    assert loaded.dims.num_layers == LAYERS
    spec = loaded.family.graph_specs(None, False).decoder
    out.mkdir(parents=True, exist_ok=True)
    path = out / "decoder.onnx"
    steps = []

    def step(name):
        steps.append(name)
        from contextlib import nullcontext

        return nullcontext()

    export_decoder(loaded.family.language_model(loaded.model), loaded.family.lm_head(loaded.model), loaded.dims,
                   spec, path, DEFAULT_OPSET, streamed=loaded.streamed, steps=step)
    assert any("repeated" in s for s in steps) != every_layer, steps
    return path


def _feeds(session: ort.InferenceSession) -> dict:
    rng = np.random.default_rng(0)
    past, seq = 3, 5
    feeds = {}
    for i in session.get_inputs():
        if i.name == "inputs_embeds":
            feeds[i.name] = rng.standard_normal((2, seq, i.shape[2]), dtype=np.float32)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((2, past + seq), np.int64)
        elif i.name == "position_ids":
            positions = np.arange(past, past + seq, dtype=np.int64)
            feeds[i.name] = np.broadcast_to(positions, (*[d for d in i.shape[:-2] if isinstance(d, int)], 2, seq))
            feeds[i.name] = np.ascontiguousarray(feeds[i.name])
        else:
            feeds[i.name] = rng.standard_normal((2, i.shape[1], past, i.shape[3]), dtype=np.float32)
    return feeds


@pytest.mark.parametrize("streamed", [False, True], ids=["loaded", "streamed"])
def test_repeated_layer_equals_every_layer_traced(four_layers, tmp_path, monkeypatch, streamed):
    repeated = _export(four_layers, tmp_path / "repeated", streamed, False, monkeypatch)
    every = _export(four_layers, tmp_path / "every", streamed, True, monkeypatch)
    a, b = (onnx.load(str(p), load_external_data=False) for p in (repeated, every))
    assert [i.name for i in a.graph.input] == [i.name for i in b.graph.input]
    assert [o.name for o in a.graph.output] == [o.name for o in b.graph.output]
    # The arithmetic on activations and weights is the same op for op; the copies may repeat a few shape
    # computations that a full trace makes once (they read their own layer's past length).
    math = {"MatMul", "Gemm", "Softmax", "Sigmoid", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Cos", "Sin", "Neg"}
    assert sorted(n.op_type for n in a.graph.node if n.op_type in math) == \
        sorted(n.op_type for n in b.graph.node if n.op_type in math)
    assert len(a.graph.node) <= len(b.graph.node) + 8 * (LAYERS - 2)
    assert len(a.graph.initializer) >= len(b.graph.initializer)  # every layer's weights are its own
    onnx.checker.check_model(str(repeated))
    sa, sb = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (repeated, every))
    feeds = _feeds(sb)
    for name, x, y in zip([o.name for o in b.graph.output], sa.run(None, feeds), sb.run(None, feeds), strict=True):
        assert np.array_equal(x, y), name


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int8])
def test_transposed_copy_is_the_transpose(dtype):
    """The weights written transposed (trace.torch_onnx.transposed_copy: strips of rows) are exactly the
    transpose, at row counts around the strip size and for one row or one column."""
    from attanchor_export.trace.torch_onnx import STRIP_ROWS, transposed_copy

    rng = np.random.default_rng(0)
    for shape in [(1, 7), (7, 1), (STRIP_ROWS - 1, 5), (STRIP_ROWS, 3), (STRIP_ROWS + 1, 33), (130, 64), (64, 130)]:
        array = (rng.standard_normal(shape) * 50).astype(dtype)
        out = transposed_copy(array)
        assert out.flags.c_contiguous and out.dtype == array.dtype
        np.testing.assert_array_equal(out, array.T)


VISION_LAYERS = 5


@pytest.fixture(scope="module", params=["clip-llama", "siglip-qwen2"])
def deep_tower(request, shared_dir) -> Path:
    """A tiny LLaVA whose tower has VISION_LAYERS layers: CLIP read at -2 (4 run), SigLIP at -1 (5 run)."""
    from attanchor_export.load.tiny_random import make_tiny_llava

    path = shared_dir / f"ck-{request.param}-tower-{VISION_LAYERS}"
    with locked(path):
        if not (path / "config.json").is_file():
            make_tiny_llava(path, request.param, vision_dims={"num_hidden_layers": VISION_LAYERS})
    return path


def _export_vision(folder: Path, out: Path, every_layer: bool, monkeypatch) -> tuple[Path, list[str]]:
    from contextlib import nullcontext

    from attanchor_export.trace.vision import export_vision

    monkeypatch.setenv("ATTANCHOR_TRACE_EVERY_LAYER", "1" if every_layer else "0")
    loaded = load_checkpoint(str(folder))
    out.mkdir(parents=True, exist_ok=True)
    path, steps = out / "vision.onnx", []
    export_vision(loaded.family, loaded.model, loaded.family.vision_spec(), path, DEFAULT_OPSET,
                  steps=lambda name: steps.append(name) or nullcontext())
    return path, steps


def test_repeated_vision_layer_equals_every_layer_traced(deep_tower, tmp_path, monkeypatch):
    """vision.onnx traced at two tower layers with layer 1 repeated is the graph traced layer by layer: the
    same math op for op and the same features to the bit, for CLIP (CLS dropped, read at -2) and SigLIP."""
    repeated, steps = _export_vision(deep_tower, tmp_path / "repeated", False, monkeypatch)
    every, every_steps = _export_vision(deep_tower, tmp_path / "every", True, monkeypatch)
    depth = VISION_LAYERS - 1 if "clip" in deep_tower.name else VISION_LAYERS
    assert f"vision graph: layer 1 repeated to {depth} layers" in steps, steps
    assert not any("repeated" in s for s in every_steps)
    a, b = (onnx.load(str(p), load_external_data=False) for p in (repeated, every))
    math = {"MatMul", "Gemm", "Softmax", "Sigmoid", "Mul", "Div", "Pow", "Sqrt", "Erf", "Tanh", "LayerNormalization"}
    assert sorted(n.op_type for n in a.graph.node if n.op_type in math) == \
        sorted(n.op_type for n in b.graph.node if n.op_type in math)
    onnx.checker.check_model(str(repeated))
    sa, sb = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (repeated, every))
    (name, shape), = ((i.name, i.shape) for i in sb.get_inputs())
    pixels = np.random.default_rng(0).standard_normal((3, *shape[1:]), dtype=np.float32)
    x, y = sa.run(None, {name: pixels})[0], sb.run(None, {name: pixels})[0]
    assert x.shape == y.shape and np.array_equal(x, y)
