"""--prefill-int8 (precision/prefill_int8.py): decoder.prefill.onnx beside the int4 decoder, the graph
onnxruntime runs prompts through. Its weights are the MatMulNBits weights read back exactly; the runtime
sends prompts there and steps to decoder.onnx on one KV cache; the gate judges the pair; bad option
combinations are one line."""

from __future__ import annotations

import copy
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from attanchor_graphs.specification import position_ids_from_mask
from attanchor_runtime.batch import left_pad
from attanchor_runtime.decode import SequentialStep
from attanchor_runtime.manifest import Manifest
from attanchor_runtime.ort_backend import OrtBackend
from attanchor_runtime.pipeline import Pipeline
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from attanchor_export.cli import main
from attanchor_export.errors import ExportError
from attanchor_export.exporter import ExportOptions, export_artifact
from attanchor_export.precision.prefill_int8 import PROMPT_CHUNKS, dequantize_nbits
from attanchor_export.precision.streamed_weights import int8_weight


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def int4_prefill(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("prefill-int8") / "int4"
    export_artifact(str(checkpoint("clip-llama")), ExportOptions(output=out, quant="int4", prefill_int8=True))
    return Manifest.load(out)


@pytest.mark.parametrize("bits", [4, 8])
def test_the_nbits_weights_read_back_as_onnxruntime_reads_them(bits):
    """dequantize_nbits against MatMulNBits itself (accuracy level 0: fp32 arithmetic on its weights), with
    zero points, a K that is no multiple of the block, and for int8_weight the round trip bound."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    k, n, block = 200, 48, 32
    rng = np.random.default_rng(bits)
    weight = rng.standard_normal((k, n)).astype(np.float32) + 0.3  # not centred: zero points are not the middle
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
                              [numpy_helper.from_array(weight, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=False, accuracy_level=0, bits=bits)
    quantizer = MatMulNBitsQuantizer(copy.deepcopy(model), algo_config=config)
    quantizer.process()
    qmodel = quantizer.model.model
    node = next(nd for nd in qmodel.graph.node if nd.op_type == "MatMulNBits")
    inits = {t.name: numpy_helper.to_array(t) for t in qmodel.graph.initializer}
    zero = inits[node.input[3]] if len(node.input) > 3 and node.input[3] else None
    read = dequantize_nbits(inits[node.input[1]], inits[node.input[2]], zero, bits, block, k, n)
    x = rng.standard_normal((3, k)).astype(np.float32)
    session = ort.InferenceSession(qmodel.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(x @ read.T, session.run(None, {"x": x})[0], atol=2e-4, rtol=1e-5)
    assert np.abs(read - weight.T).max() > 0  # it is the quantized weight, not the original
    q, scale = int8_weight(read.T)
    assert q.dtype == np.int8 and q.shape == (k, n) and np.abs(q).max() == 127
    assert np.abs(q.T * scale[:, None] - read).max() <= scale.max() / 2 + 1e-6


# ReduceMax's axes: an attribute before opset 18, an input from 18; MatMulNBits with and without a bias
@pytest.mark.parametrize(("opset", "bias"), [(17, False), (18, True)])
def test_one_linear_through_the_prompt_graph(tmp_path, opset, bias):
    """write_prefill_graph on a one-MatMulNBits graph: onnxruntime runs it, and its output is the linear of
    the dequantized weights up to 8-bit rounding, row by row ([batch, positions, K] as in a decoder, rows of
    very different scales: per token), bias included."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    from attanchor_export.precision.prefill_int8 import write_prefill_graph

    k, n = 128, 64
    rng = np.random.default_rng(opset)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, None, n])],
                              [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=False, accuracy_level=4, bits=4)
    quantizer = MatMulNBitsQuantizer(model, algo_config=config)
    quantizer.process()
    qmodel = quantizer.model.model
    if bias:  # MatMulNBits' optional 6th input
        node = next(nd for nd in qmodel.graph.node if nd.op_type == "MatMulNBits")
        node.input.extend([""] * (5 - len(node.input)) + ["b"])
        qmodel.graph.initializer.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32) * 5, "b"))
    onnx.save(qmodel, str(tmp_path / "d.onnx"))
    record = write_prefill_graph(tmp_path / "d.onnx", tmp_path / "d.prefill.onnx")
    assert record["replaced_nodes"] == 1
    x = rng.standard_normal((2, 3, k)).astype(np.float32) * np.array([[1e-3], [1.0], [30.0], [1e3], [0.1], [5.0]],
                                                                      np.float32).reshape(2, 3, 1)
    step = ort.InferenceSession(str(tmp_path / "d.onnx"), providers=["CPUExecutionProvider"])
    prompt = ort.InferenceSession(str(tmp_path / "d.prefill.onnx"), providers=["CPUExecutionProvider"])
    want, got = step.run(None, {"x": x})[0], prompt.run(None, {"x": x})[0]
    assert got.shape == want.shape == (2, 3, n)
    cos = (want * got).sum(-1) / np.linalg.norm(want, axis=-1) / np.linalg.norm(got, axis=-1)
    assert cos.min() > 0.999, cos
    if bias:  # rows of 1e-3 are all bias: the bias is added once, after the scales
        np.testing.assert_allclose(got[0, 0], want[0, 0], rtol=0, atol=1e-2)


def test_the_codes_are_per_row_rint_and_a_merged_linear_is_one_product_per_part(tmp_path):
    """The prompt graph's arithmetic against numpy's: codes rint(x / s) with s = max|x| / 127 per row, an
    exact integer product with the int8 weights, then both scales; and a merged linear (MatMulNBits +
    Split, as streamed_weights.py writes q/k/v) gives each part as its own product: no Split left, the
    parts equal to the unmerged linear's columns bit for bit, each with its slice of the bias."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    from attanchor_export.precision.prefill_int8 import write_prefill_graph

    k, n, sizes = 128, 64, [32, 16, 16]
    rng = np.random.default_rng(3)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, None, n])],
                              [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "W")])
    quantizer = MatMulNBitsQuantizer(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]),
                                     algo_config=DefaultWeightOnlyQuantConfig(block_size=32, accuracy_level=4, bits=4))
    quantizer.process()
    whole = quantizer.model.model
    node = next(nd for nd in whole.graph.node if nd.op_type == "MatMulNBits")
    node.input.extend([""] * (5 - len(node.input)) + ["b"])
    bias = rng.standard_normal(n).astype(np.float32)
    whole.graph.initializer.append(numpy_helper.from_array(bias, "b"))
    merged = copy.deepcopy(whole)
    merged.graph.node[0].output[0] = "qkv"
    merged.graph.node.append(helper.make_node("Split", ["qkv", "sizes"], ["q", "k", "v"], axis=-1))
    merged.graph.initializer.append(numpy_helper.from_array(np.array(sizes, np.int64), "sizes"))
    del merged.graph.output[:]
    merged.graph.output.extend(helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in "qkv")
    for name, model in (("whole", whole), ("merged", merged)):
        (tmp_path / name).mkdir()
        onnx.save(model, str(tmp_path / name / "d.onnx"))
        write_prefill_graph(tmp_path / name / "d.onnx", tmp_path / name / "d.prefill.onnx")
    x = rng.standard_normal((2, 5, k)).astype(np.float32) * rng.choice([1e-3, 1.0, 50.0], (2, 5, 1)).astype(np.float32)
    got = {name: ort.InferenceSession(str(tmp_path / name / "d.prefill.onnx"), providers=["CPUExecutionProvider"])
           .run(None, {"x": x}) for name in ("whole", "merged")}
    prompt = onnx.load(str(tmp_path / "merged" / "d.prefill.onnx"))
    ops = [nd.op_type for nd in prompt.graph.node]
    assert "Split" not in ops and ops.count("MatMulIntegerToFloat") == 3
    np.testing.assert_array_equal(np.concatenate(got["merged"], axis=-1), got["whole"][0])
    # numpy: the codes, an exact integer product, then the scales and the bias
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "whole" / "d.prefill.onnx")).graph.initializer}
    w8 = next(v for name, v in weights.items() if name.endswith("/int8"))
    w_scale = next(v for name, v in weights.items() if name.endswith("/int8_scale"))
    s = np.maximum(np.abs(x).max(-1, keepdims=True) * np.float32(1 / 127), np.float32(1e-12))
    codes = np.clip(np.rint(x / s), -128, 127).astype(np.int64)
    want = (codes @ w8.astype(np.int64)).astype(np.float32) * s * w_scale + bias
    np.testing.assert_allclose(got["whole"][0], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_the_prompt_graph_is_recorded_and_holds_int8_linears(int4_prefill):
    record = int4_prefill.precision.graphs["decoder.onnx"]
    assert record.prefill["file"] == "decoder.prefill.onnx" == int4_prefill.precision.prefill_file("decoder.onnx")
    assert record.prefill["replaced_nodes"] == record.quantized_nodes
    assert record.prefill["attention_over_whole_cache"] == int4_prefill.dims.num_layers  # prompts join K/V
    folder = int4_prefill.folder
    prompt = onnx.load(str(folder / "decoder.prefill.onnx"), load_external_data=False)
    step = onnx.load(str(folder / "decoder.onnx"), load_external_data=False)
    ops = {nd.op_type for nd in prompt.graph.node}
    assert "MatMulNBits" not in ops and "MatMulIntegerToFloat" in ops
    # each layer's prompt attention runs as query chunks, one Softmax each (decoder.onnx: one per layer)
    assert record.prefill["attention_causal_chunks"] == PROMPT_CHUNKS > 1
    softmaxes = [sum(nd.op_type == "Softmax" for nd in g.graph.node) for g in (prompt, step)]
    assert softmaxes == [PROMPT_CHUNKS * int4_prefill.dims.num_layers, int4_prefill.dims.num_layers]
    assert [i.name for i in prompt.graph.input] == [i.name for i in step.graph.input]
    assert [o.name for o in prompt.graph.output] == [o.name for o in step.graph.output]
    locations = {e.value for t in prompt.graph.initializer for e in t.external_data if e.key == "location"}
    # its own data file holds the int8 weights and their scales only; the rest is read where it is
    assert "decoder.prefill.onnx.data" in locations and locations <= {"decoder.onnx.data", "decoder.prefill.onnx.data"}
    own = [t for t in prompt.graph.initializer
           if any(e.key == "location" and e.value == "decoder.prefill.onnx.data" for e in t.external_data)]
    assert own and all(re.search(r"/int8(/part\d+)?(_scale)?$", t.name) for t in own)
    # a merged linear (q/k/v, gate/up) is one MatMulNBits + Split in decoder.onnx, one product per part here
    splits = [sum(nd.op_type == "Split" for nd in g.graph.node) for g in (prompt, step)]
    assert splits[1] > 0 and splits[0] == 0, splits
    assert "decoder.prefill.onnx.data" in int4_prefill.files  # listed and hashed like every file


def test_prompts_go_to_the_prompt_graph_and_steps_continue_its_cache(int4_prefill):
    """A prefill runs decoder.prefill.onnx, the steps decoder.onnx on the cache it wrote; its logits and KV
    cache agree closely with the int4 graph's own prefill (random tiny weights: cosine, not equality)."""
    backend = OrtBackend(int4_prefill)
    decoder = backend.decoder
    assert decoder.prefill_session is not None
    ran = []
    for name in ("session", "prefill_session"):
        session = getattr(decoder, name)
        real = session.run
        setattr(decoder, name, type("Spy", (), {"run": lambda self, *a, real=real, name=name: ran.append(name) or
                                                real(*a), "__getattr__": lambda self, attr, s=session: getattr(s, attr)})())
    dims = int4_prefill.dims
    rng = np.random.default_rng(0)
    _, mask = left_pad([np.zeros(n, np.int64) for n in (6, 11)], 0)
    embeds = rng.standard_normal((2, mask.shape[1], dims.hidden_size)).astype(np.float32)
    positions = position_ids_from_mask(mask)
    cache = decoder.empty_cache(2)
    logits, cache = decoder.decode(embeds, mask, positions, cache)
    assert ran == ["prefill_session"]
    step = SequentialStep.after_prefill(mask, positions).advance()
    decoder.binds = False  # through session.run, so the spy sees the step too
    decoder.decode(rng.standard_normal((2, 1, dims.hidden_size)).astype(np.float32), step.attention_mask,
                   step.position_ids, cache)
    assert ran == ["prefill_session", "session"]
    plain = OrtBackend(int4_prefill).decoder
    plain.prefill_session = None
    reference, ref_cache = plain.decode(embeds, mask, positions, plain.empty_cache(2))
    valid = mask.astype(bool)
    a, b = logits[valid], reference[valid]
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() > 0.99, cos.min()
    assert np.abs(logits - reference).max() > 0  # a different graph really ran


def test_the_gate_judged_the_pair_and_answers_run(int4_prefill):
    gate = int4_prefill.precision.gate
    assert gate.passed and any(r.decoder == "decoder.onnx" for r in gate.results)
    ids = [[int4_prefill.text.bos_token_id, int4_prefill.text.image_token_id, 5, 9, 11]]
    pixels = np.random.default_rng(1).random((1, 3, int4_prefill.dims.image_size, int4_prefill.dims.image_size),
                                             np.float32)
    out = Pipeline(int4_prefill, OrtBackend(int4_prefill)).generate(ids, pixels, max_new_tokens=6)
    assert out.tokens.shape == (1, 6)


def test_bad_combinations_are_one_line(checkpoint, tmp_path):
    for extra, needle in ((["--prefill-int8"], "add --quant int4"),
                          (["--prefill-int8", "--quant", "int4", "--dtype", "fp16"], "fp32 activations")):
        result = run_cli(checkpoint("clip-llama"), "-o", tmp_path / "x", *extra)
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        assert result.exit_code == 2 and len(errors) == 1 and needle in errors[0], result.stderr  # click's usage error
        assert not (tmp_path / "x").exists()
    with pytest.raises(ExportError, match="add --quant int4"):
        export_artifact(str(checkpoint("clip-llama")), ExportOptions(output=tmp_path / "y", prefill_int8=True))
