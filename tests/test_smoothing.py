"""SmoothQuant (precision.smoothing) on tiny random decoders of both families: the smoothed fp32 graph
computes what the original does (logits and KV cache to 1e-5, prefill and a cached step, before any
quantization), every norm-fed and SwiGLU-fed linear is smoothed, the outlier spread of their inputs
shrinks, and a linear whose input has another reader is left alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from attanchor_runtime.decode import decoder_calls
from attanchor_runtime.manifest import Manifest
from attanchor_runtime.ort_backend import OrtDecoder
from attanchor_runtime.sessions import ort_session
from onnx import TensorProto, helper, numpy_helper

from attanchor_export.load.datasets import builtin_samples
from attanchor_export.options import ARTIFACT_IR_VERSION
from attanchor_export.precision import smoothing
from attanchor_export.precision.calibration import DecoderCalibrationReader, channel_absmax
from attanchor_export.precision.gate import gate_pipeline
from attanchor_export.precision.streamed_weights import linear_nodes, save_beside


@pytest.mark.parametrize("name", ["clip-t2i", "siglip-t2i-k4"])  # Llama; Qwen2 (q/k/v biases)
def test_smoothing_is_exact_in_fp32(artifact, tmp_path, name):
    folder = artifact(name)
    manifest = Manifest.load(folder)
    dims = manifest.dims
    pipe = gate_pipeline(manifest)
    reader = DecoderCalibrationReader.from_samples(pipe, builtin_samples(3))

    model = ir.load(str(folder / "decoder.onnx"))
    nodes, _ = linear_nodes(model.graph, False, manifest.graphs.decoder.output_names[0])
    inputs = sorted({n.inputs[0].name for n in nodes})
    before = channel_absmax(folder / "decoder.onnx", reader, inputs)
    record = smoothing.smooth(model, [n.name for n in nodes], before, alpha=0.5)
    layers = dims.num_layers
    # q/k/v and gate/up fold into their RMSNorm gains, down_proj into up_proj; o_proj is not smoothed
    assert record.folded_into == {"norm": 5 * layers, "linear": layers}, record
    assert len(record.not_smoothed) == layers and record.smoothed_linears == 6 * layers
    assert record.alpha == 0.5
    smoothed = tmp_path / "decoder.smoothed.onnx"
    save_beside(model, smoothed, ARTIFACT_IR_VERSION)
    del model

    # The smoothed inputs are flatter: max/median of the channel maxima drops for every smoothed input.
    after = channel_absmax(smoothed, reader, inputs)
    spread = {k: (v.max() / np.median(v), after[k].max() / np.median(after[k])) for k, v in before.items()
              if not np.allclose(v, after[k])}
    assert len(spread) == 3 * layers and all(a < b for b, a in spread.values()), spread

    # Same function: a left-padded batch of 2 real prompts, prefill then one cached step through the
    # runtime's decode loop, logits and every KV cache tensor to 1e-5.
    samples = builtin_samples(2, seed=7)
    front = pipe.front_end([pipe.prompt_ids(s.prompt) for s in samples],
                           np.concatenate([pipe.images(s.image) for s in samples], axis=0))
    assert not front.attention_mask.all()  # the two prompts differ in length: one row is padded
    decoders = [OrtDecoder.of_session(ort_session(path), dims.max_position_embeddings)
                for path in (folder / "decoder.onnx", smoothed)]

    def next_embeds(call):  # the original's greedy token, fed to both
        return pipe.embed(call.logits[:, -1].argmax(-1)) if call.index < 1 else None

    first = pipe.family.first_step(front.attention_mask, front.position_ids)
    runs = [decoder_calls(d, first, front.inputs_embeds, next_embeds) for d in decoders]
    calls = 0
    for want, got in zip(*runs):
        for key, a, b in [("logits", want.logits, got.logits), *zip(decoders[0].present_names, want.cache,
                                                                     got.cache)]:
            scale = max(1.0, float(np.abs(a).max()))
            assert np.abs(b - a).max() <= 1e-5 * scale, (want.index, key, np.abs(b - a).max())
        calls += 1
    assert calls == 2  # prefill, then one cached decode step


def test_an_input_with_another_reader_is_not_smoothed():
    """X = RMSNorm-like Mul(x, gain) read by a linear and by a residual Add: dividing the gain would change
    the Add, so the linear is left alone; the second linear's own norm is smoothed."""
    k, n = 4, 3
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a.astype(np.float32), name) for name, a in (
        ("g1", rng.uniform(0.5, 2, k)), ("g2", rng.uniform(0.5, 2, k)),
        ("w1", rng.normal(size=(k, n))), ("w2", rng.normal(size=(k, n))))]
    nodes = [
        helper.make_node("Mul", ["x", "g1"], ["h1"], name="norm1"),
        helper.make_node("MatMul", ["h1", "w1"], ["y1"], name="lin1"),
        helper.make_node("Add", ["h1", "x"], ["r"], name="residual"),
        helper.make_node("Mul", ["r", "g2"], ["h2"], name="norm2"),
        helper.make_node("MatMul", ["h2", "w2"], ["y2"], name="lin2"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
                              [helper.make_tensor_value_info(v, TensorProto.FLOAT, None) for v in ("y1", "y2")],
                              inits)
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    groups, left = smoothing.plan(model.graph, [nd for nd in model.graph if nd.op_type == "MatMul"])
    assert [g.linears[0].name for g in groups] == ["lin2"] and [nd.name for nd in left] == ["lin1"]
    assert groups[0].fold == "norm" and [v.name for v in groups[0].targets] == ["g2"]

    x = rng.normal(size=(2, k)).astype(np.float32)
    x[:, 1] *= 50  # an outlier channel
    proto = onnx.shape_inference.infer_shapes(ir.serde.serialize_model(model))

    def run(p):
        import onnxruntime as ort

        return ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})

    want = run(proto)
    act = {"h2": np.abs((x + x * numpy_helper.to_array(inits[0])) * numpy_helper.to_array(inits[1])).max(0)}
    record = smoothing.smooth(model, ["lin1", "lin2"], act, alpha=0.5)
    assert record.smoothed_linears == 1 and record.not_smoothed == ("lin1",)
    got = run(ir.serde.serialize_model(model))
    for a, b in zip(want, got):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
