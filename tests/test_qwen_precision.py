"""Qwen2.5-VL at reduced precision and on TensorRT: the tiny random checkpoint exported by the CLI with
`--dtype fp16` and `--quant int8` (both int8 forms: MatMulNBits for onnxruntime, SmoothQuant + calibrated
QDQ for TensorRT), gated, run and checked; the TensorRT lint of every precision for 10.3, 11.4 and 11.5
(the ops the 3-D rotary needs included); the TensorRT build plan and engines on the fake TensorRT of
both API generations.

The artifacts are the session fixtures of conftest.py (one export per precision per run, shared with
tests/test_qwen_runtime.py); the gate floors are the checkpoint's (load/tiny_random.RANDOM_CHECKPOINT_FLOORS
in its attanchor_config.json).
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter

import numpy as np
import onnx
import pytest
from attanchor_graphs.trt_ops import TABLES
from attanchor_runtime import Pipeline
from attanchor_runtime.manifest import Manifest
from attanchor_runtime.ort_backend import OrtBackend
from click.testing import CliRunner
from fake_tensorrt import generations_fixture
from qwen_helpers import pil_image

from attanchor_export.cli import main
from attanchor_export.load.tiny_random import RANDOM_CHECKPOINT_FLOORS
from attanchor_export.trt.build import build_engines
from attanchor_export.trt.lint import lint_artifact
from attanchor_export.trt.plan import BuildOptions, make_plan, profile_problems

QUESTIONS = ["What color is the car?", "How many people are there in the picture on the left?", "Is it day?"]
SIDE = 112  # the tiny checkpoint's export grid
THRESHOLD = 0.1  # anchors on most rows of the random checkpoint
TARGETS = ("10.3", "11.4", "11.5")
# The decoder's M-RoPE angle path (docs/QUANTIZATION.md, "Qwen2.5-VL"): [3, B, S] positions expanded,
# cast, times the inverse frequencies, Cos and Sin, split into the (t, h, w) sections, the section's
# axis gathered, concatenated back; then applied to q and k by rotate-half (Slice, Neg, Concat, Mul, Add).
MROPE_ANGLE_OPS = {"Expand", "Unsqueeze", "Cast", "Mul", "Cos", "Sin", "Split", "Gather", "Concat"}

fake = generations_fixture()


@pytest.fixture(scope="module")
def artifacts(qwen_artifact, qwen_artifact_fp16, qwen_artifact_int8, qwen_artifact_int4):
    return {"fp32": qwen_artifact, "fp16": qwen_artifact_fp16, "int8": qwen_artifact_int8, "int4": qwen_artifact_int4}


def _rows(pipe, images=4):
    """Every question about each of `images` images: prompt rows and pixels, one row per pair."""
    pairs = [(q, seed) for seed in range(images) for q in QUESTIONS]
    ids = [pipe.prompt_ids(q) for q, _ in pairs]
    return ids, np.concatenate([pipe.images(pil_image(SIDE, SIDE, seed)) for _, seed in pairs])


def _gate_meets_floors(result, floors):
    assert result.finite and result.cos_mean >= floors["cos_mean"] and result.top1 >= floors["top1"], result
    if result.vision_changed:
        assert result.vision_cos_mean >= floors["vision_cos_mean"], result


# ------------------------------------------------------------------------------------------ fp16


def test_fp16_passes_its_gate_with_the_rope_angles_in_fp32(qwen_artifact_fp16):
    precision = Manifest.load(qwen_artifact_fp16).precision
    assert (precision.dtype, precision.quant) == ("fp16", "none")
    gate = precision.gate
    assert gate.format == "fp16" and gate.passed and dict(gate.floors) == RANDOM_CHECKPOINT_FLOORS["fp16"]
    (result,) = gate.results  # one file per graph, both backends open it
    assert set(result.backends) == {"ort", "trt"} and result.vision_changed
    _gate_meets_floors(result, gate.floors)
    # Positions * inverse frequencies, Cos and Sin stay fp32 (fp16 cannot hold large angles exactly).
    kept = precision.graphs["decoder.onnx"].fp16["kept_fp32_nodes"]
    assert kept["rope"] >= 4 and kept["logits"] == 1, kept


def test_fp16_answers_as_fp32(qwen_artifact, qwen_artifact_fp16):
    """Same anchors on every row; the same 8 greedy tokens on nearly every row. A random checkpoint has
    near-ties that fp16 rounding flips (then the rest of the row differs: greedy is a cliff), which the
    gate's teacher-forced top-1 (0.994 here) measures; a broken rotary or conversion changes most rows."""
    fp32, fp16 = Pipeline.load(qwen_artifact), Pipeline.load(qwen_artifact_fp16)
    ids, pixels = _rows(fp32)
    want = fp32.generate(ids, pixels, max_new_tokens=8, threshold=THRESHOLD)
    got = fp16.generate(ids, pixels, max_new_tokens=8, threshold=THRESHOLD)
    assert got.anchors == want.anchors and sum(map(bool, want.anchors)) >= len(ids) - 1
    same = [np.array_equal(a, b) for a, b in zip(got.tokens, want.tokens, strict=True)]
    assert sum(same) >= 9, f"{sum(same)} of {len(ids)} rows equal"  # 10 of 12 measured (onnxruntime 1.32, CPU)


# ------------------------------------------------------------------------------------------ int8


def test_int8_gates_both_forms(qwen_artifact_int8):
    """decoder.onnx: MatMulNBits bits=8 (onnxruntime, fused, the M-RoPE rotary left unfused);
    decoder.trt.onnx: SmoothQuant-smoothed, calibrated int8 QDQ (TensorRT). Each judged on its own."""
    manifest = Manifest.load(qwen_artifact_int8)
    precision = manifest.precision
    assert precision.quant == "int8" and precision.backends["trt"]["decoder"] == "decoder.trt.onnx"
    assert precision.calibration["samples"] > 0
    ort_form, trt_form = precision.graphs["decoder.onnx"], precision.graphs["decoder.trt.onnx"]
    assert (ort_form.format, ort_form.bits, trt_form.format, trt_form.bits) == ("MatMulNBits", 8, "QDQ", 8)
    assert trt_form.quantized_nodes == trt_form.linear_layers == 7 * manifest.dims.num_layers
    assert trt_form.smoothing.alpha == pytest.approx(0.7) and trt_form.smoothing.smoothed_linears > 0
    assert ort_form.ort_fusions["fused"]["RotaryEmbedding"] == 0  # its kernel takes 1-D positions only
    gate = precision.gate
    assert gate.format == "int8" and gate.passed and dict(gate.floors) == RANDOM_CHECKPOINT_FLOORS["int8"]
    assert {r.decoder: tuple(r.backends) for r in gate.results} == {"decoder.onnx": ("ort",),
                                                                    "decoder.trt.onnx": ("trt",)}
    for result in gate.results:
        _gate_meets_floors(result, gate.floors)


@pytest.mark.parametrize("backend", ["ort", "trt"])
def test_int8_forms_answer_with_anchors(qwen_artifact_int8, backend):
    """Each form's files through the runtime (onnxruntime CPU runs the QDQ form too): anchors as fp32's
    (vision and embedding are not quantized), tokens of the vocabulary."""
    manifest = Manifest.load(qwen_artifact_int8)
    pipe = Pipeline(manifest, OrtBackend(manifest, files=dict(manifest.precision.backends[backend])))
    ids, pixels = _rows(pipe, images=1)
    out = pipe.generate(ids, pixels, max_new_tokens=4, threshold=THRESHOLD)
    reference = Pipeline.load(qwen_artifact_int8).generate(ids, pixels, max_new_tokens=1, threshold=THRESHOLD)
    assert out.anchors == reference.anchors and all(out.anchors)
    assert out.tokens.shape == (len(ids), 4) and (out.tokens < manifest.dims.vocab_size).all()


# ------------------------------------------------------------------------------------------ CLI


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_check_and_run(artifacts, precision, tmp_path):
    folder = artifacts[precision]
    result = CliRunner().invoke(main, ["check", str(folder)])
    assert result.exit_code == 0, result.output
    assert re.search(r"all \d+ checks passed", result.output) and "accuracy-gate" in result.output, result.output
    pil_image(SIDE, SIDE, 3).save(tmp_path / "in.png")
    result = CliRunner().invoke(main, ["run", str(folder), "--image", str(tmp_path / "in.png"), "--prompt",
                                       QUESTIONS[0], "--threshold", str(THRESHOLD), "--max-new-tokens", "4", "--json"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert len(answer["tokens"]) == 4 and answer["anchors"], answer


# ------------------------------------------------------------------------------------------ TensorRT lint


def _angle_path_ops(path) -> Counter:
    """Ops downstream of the decoder's position_ids that read no activation (the rotary angles), shapes
    not followed (Shape(position_ids) only sizes the causal mask)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)

    def downstream(starts):
        seen, stack = {}, list(starts)
        while stack:
            for node in readers.get(stack.pop(), []):
                if id(node) not in seen and node.op_type != "Shape":
                    seen[id(node)] = node
                    stack.extend(node.output)
        return seen

    positions = downstream(["position_ids"])
    activations = downstream([i.name for i in graph.input if i.name != "position_ids"])
    return Counter(n.op_type for k, n in positions.items() if k not in activations)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "int4"])
def test_lint_every_precision_for_tensorrt_10_3_and_11(artifacts, precision):
    """No errors on any target; the only warning is int4's opset-21 QDQ decoder on 10.3 (its blocked INT4
    DequantizeLinear needs opset 21, which 10.x imports). The linted decoder is the TensorRT form, and
    its M-RoPE angle path is the documented ops, each in every target's table."""
    folder = artifacts[precision]
    manifest = Manifest.load(folder, verify="none")
    decoder = manifest.graph_file("decoder", "trt")
    assert decoder == ("decoder.trt.onnx" if precision in ("int8", "int4") else "decoder.onnx")
    angle_ops = _angle_path_ops(folder / decoder)
    assert set(angle_ops) == MROPE_ANGLE_OPS and angle_ops["Cos"] == angle_ops["Sin"] == 1, angle_ops
    for target in TARGETS:
        report = lint_artifact(folder, target)
        assert report.ok and not any(r.errors for r in report.values()), report.format_table()
        assert report["decoder"].name == decoder
        warnings = [(graph, f.code) for graph, r in report.items() for f in r.warnings]
        assert warnings == ([("decoder", "opset")] if (precision, target) == ("int4", "10.3") else []), warnings
        for op in MROPE_ANGLE_OPS | {"Slice", "Neg", "Add"}:
            assert TABLES[target]["ops"][op][0], (target, op)


# ------------------------------------------------------------------------------------------ TensorRT plan and build


def test_plan_sizes_the_patch_rows_and_the_3d_positions(qwen_artifact):
    """pixel_values [batch * N, 1176] gets N..max_batch * N rows; position_ids [3, batch, seq_len] keeps
    its leading 3 in every decoder profile; an edited range is caught axis by axis."""
    manifest = Manifest.load(qwen_artifact, verify="none")
    n = (SIDE // 14) ** 2  # patches per image
    plan = make_plan(manifest, BuildOptions(max_batch=3, max_input_len=64, max_seq_len=96))
    assert plan.engines["vision"].profiles[0].shapes["pixel_values"] == {
        "min": [n, 1176], "opt": [n, 1176], "max": [3 * n, 1176]}
    for profile in plan.engines["decoder"].profiles:
        shape = profile.shapes["position_ids"]
        assert [shape[k][0] for k in ("min", "opt", "max")] == [3, 3, 3]
        assert [shape[k][1] for k in ("min", "opt", "max")] == profile.dims["batch"]
    axes = {t.name: t.shape for t in manifest.graphs.vision.inputs}
    vision = plan.engines["vision"]
    assert profile_problems(vision, axes) == []
    vision.profiles[0].shapes["pixel_values"]["max"][0] += 1
    assert any("pixel_values axis 0" in p for p in profile_problems(vision, axes))


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_engines_build_and_generate_on_fake_tensorrt(fake, artifacts, precision, tmp_path):
    """Strongly typed engines from the TensorRT files (int8: decoder.trt.onnx), the build's gate passed,
    and the trt backend's tokens equal onnxruntime's on the same files, with the 3-D positions."""
    from attanchor_runtime.trt_backend import TrtBackend

    trt, cuda = fake
    folder = tmp_path / "art"
    shutil.copytree(artifacts[precision], folder)
    result = build_engines(folder, max_batch=2, max_input_len=96, max_seq_len=128)  # chat prompts + anchors
    records = result.meta.engines
    assert records["decoder"]["onnx"] == ("decoder.trt.onnx" if precision == "int8" else "decoder.onnx")
    assert records["decoder"]["precision"] == {"fp16": "fp16", "int8": "fp32 + int8 QDQ"}[precision]
    assert result.meta.gate["passed"], result.meta.gate
    assert {c["case"] for c in result.meta.gate["checks"] if c["graph"] == "decoder"} == {"prefill", "decode step"}
    manifest = Manifest.load(folder)
    trt_pipe = Pipeline(manifest, TrtBackend(manifest, trt=trt, cuda=cuda))
    ort_pipe = Pipeline(manifest, OrtBackend(manifest, files=dict(manifest.precision.backends["trt"])))
    ids, pixels = _rows(ort_pipe, images=1)
    ids, pixels = ids[:2], pixels[:2]
    got = trt_pipe.generate(ids, pixels, max_new_tokens=5, threshold=THRESHOLD)
    want = ort_pipe.generate(ids, pixels, max_new_tokens=5, threshold=THRESHOLD)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    assert got.anchors == want.anchors and all(got.anchors)
    trt_pipe.backend.close()
    assert not cuda.mem, "every device buffer is freed"
