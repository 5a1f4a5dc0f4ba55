"""--vision-quant int8: the vision tower's own precision (int8 weights and activations), whatever --quant
gives the decoder. Usage errors before any work; an int4 decoder behind an int8 vision tower on a tiny
random checkpoint (both forms of both graphs, the manifest's record, the gate, the runtime answering);
an fp32 decoder behind it through the precision stage. tiny-vqa's answers: tests/test_tiny_vqa.py."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from attanchor_runtime import Pipeline
from attanchor_runtime.manifest import Manifest
from click.testing import CliRunner
from helpers import read_manifest

from attanchor_export.cli import main
from attanchor_export.load.datasets import builtin_samples
from attanchor_export.load.tiny_random import RANDOM_CHECKPOINT_FLOORS
from attanchor_export.precision.quantize import quantize_artifact
from attanchor_export.precision.weights import count_quantized


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _features(folder) -> np.ndarray:
    """Image features of two builtin images through `folder`'s onnxruntime vision graph, one row per token."""
    pipe = Pipeline.load(folder)
    pixels = np.concatenate([pipe.images(s.image) for s in builtin_samples(2)])
    features = pipe.backend.vision(pipe.family.vision_feeds(pixels, 2))
    return features.reshape(-1, features.shape[-1])


def _cos(a, b) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("Error:")]


@pytest.mark.parametrize("args, says", [
    (("--vision-quant", "int4"), "unknown --vision-quant 'int4': choose one of none, int8 (a weight-only int4"),
    (("--vision-quant", "fp8"), "unknown --vision-quant 'fp8': choose one of none, int8"),
    (("--vision-quant", "int8", "--quantize-vision"), "--quantize-vision"),
    (("--vision-quant", "int8", "--dtype", "fp16"), "--dtype fp16 with --vision-quant int8 is not supported"),
])
def test_bad_vision_quant_is_a_one_line_usage_error(checkpoint, tmp_path, args, says):
    out = tmp_path / "x"
    result = run_cli(checkpoint("clip-llama"), "-o", out, "--quant", "int4", *args)
    assert result.exit_code == 2
    (line,) = _error_lines(result)
    assert says in line, line
    assert not out.exists() and "Traceback" not in result.output


def test_int4_decoder_with_int8_vision(checkpoint, artifact, tmp_path):
    out = tmp_path / "q4v8"
    result = run_cli(checkpoint("clip-llama"), "-o", out, "--quant", "int4", "--vision-quant", "int8", "--json")
    assert result.exit_code == 0, result.output
    precision = read_manifest(out)["precision"]
    assert (precision["quant"], precision["vision_quant"], precision["vision_quantized"]) == ("int4", "int8", True)
    graphs = precision["graphs"]
    # the decoder: int4 as with --quant int4 alone
    assert graphs["decoder.onnx"]["format"] == "MatMulNBits" and graphs["decoder.onnx"]["bits"] == 4
    assert graphs["decoder.trt.onnx"]["bits"] == 4
    # the vision tower: int8 weights and activations in both forms, every linear layer
    ort, trt = graphs["vision.onnx"], graphs["vision.trt.onnx"]
    assert (ort["format"], ort["bits"], ort["backend"]) == ("MatMulInteger", 8, ["ort"])
    assert (trt["format"], trt["bits"], trt["backend"], trt["tensorrt_compatible"]) == ("QDQ", 8, ["trt"], True)
    dynamic = onnx.load(str(out / "vision.onnx"), load_external_data=False)
    qdq = onnx.load(str(out / "vision.trt.onnx"), load_external_data=False)
    assert count_quantized(dynamic)["MatMulInteger"] == ort["linear_layers"] > 0
    assert any(n.op_type == "DynamicQuantizeLinear" for n in dynamic.graph.node)  # activations: per call
    assert count_quantized(qdq)["QDQ_int8"] == trt["linear_layers"] == ort["linear_layers"]
    # activations too: each int8 linear reads its input through Q/DQ (linears sharing an input share one)
    made_by = {o: n.op_type for n in qdq.graph.node for o in n.output}
    linears = [n for n in qdq.graph.node if n.op_type == "MatMul" and made_by.get(n.input[1]) == "DequantizeLinear"]
    assert len(linears) == trt["linear_layers"] and all(made_by[n.input[0]] == "DequantizeLinear" for n in linears)
    assert not any(n.domain == "com.microsoft" for n in qdq.graph.node)  # standard ops: TensorRT reads them
    assert "vision" in precision["calibration"]["graphs"] and precision["calibration"]["images"] >= 4
    assert precision["backends"]["ort"]["vision"] == "vision.onnx"
    assert precision["backends"]["trt"]["vision"] == "vision.trt.onnx"
    # gated: the decoder at int4's floors, the image features at int8's
    gate = precision["gate"]
    assert gate["passed"] and gate["format"] == "int4"
    assert gate["floors"]["vision_cos_mean"] == RANDOM_CHECKPOINT_FLOORS["int8"]["vision_cos_mean"]
    assert gate["floors"]["cos_mean"] == RANDOM_CHECKPOINT_FLOORS["int4"]["cos_mean"]
    assert {r["vision"] for r in gate["results"]} == {"vision.onnx", "vision.trt.onnx"}
    assert all(r["vision_changed"] and r["vision_cos_mean"] >= 0.99 for r in gate["results"])
    # the runtime opens it and answers; its image features are the fp32 artifact's within int8's floor
    answer = Pipeline.load(out).chat("What is in the image?", builtin_samples(1)[0].image, max_new_tokens=4)
    assert isinstance(answer, str)
    assert _cos(_features(out), _features(artifact("clip-t2i"))).min() >= 0.99
    check = run_cli("check", out, "--json")
    assert check.exit_code == 0, check.output
    rows = [r for r in json.loads(check.stdout)["checks"] if r["metric"].startswith("vision_cos_mean")]
    assert rows and all(r["limit"] == 0.99 and r["passed"] for r in rows)


def test_fp32_decoder_with_int8_vision_rewrites_only_the_vision_tower(artifact, tmp_path):
    folder = tmp_path / "v8"
    shutil.copytree(artifact("clip-t2i"), folder)
    decoder = (folder / "decoder.onnx").read_bytes()
    precision = quantize_artifact(Manifest.load(folder, verify="none"), vision_quant="int8", forms=("QDQ",),
                                  floors=RANDOM_CHECKPOINT_FLOORS)
    assert precision.quant == "none" and precision.vision_int8 and precision.quantized
    assert precision.format == "int8" and precision.gate.format == "int8" and precision.gate.passed
    assert precision.label == "fp32/none + int8 vision"
    assert set(precision.graphs) == {"vision.onnx"} and (folder / "decoder.onnx").read_bytes() == decoder
    # one form asked for: the QDQ file is vision.onnx, and both backends open it
    assert precision.backends["ort"]["vision"] == precision.backends["trt"]["vision"] == "vision.onnx"
    assert precision.graphs["vision.onnx"].backend == ("ort", "trt") and not (folder / "vision.trt.onnx").exists()
    assert count_quantized(onnx.load(str(folder / "vision.onnx"), load_external_data=False))["QDQ_int8"] > 0
