"""The streamed int8 QDQ writer (precision.quantize.write_int8_qdq) against onnxruntime's quantize_static,
which wrote the TensorRT int8 forms before it: the same tensors under the same names, the weights equal
to the bit, the calibrated activation scales equal up to float rounding (onnxruntime calibrates on an
unoptimized session, the writer on an optimized one), and graphs that compute the same thing."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from attanchor_runtime.manifest import Manifest
from attanchor_runtime.sessions import ort_session
from onnx import TensorProto, numpy_helper

from attanchor_export.load.datasets import builtin_samples
from attanchor_export.options import ARTIFACT_IR_VERSION
from attanchor_export.precision.calibration import DecoderCalibrationReader, VisionCalibrationReader
from attanchor_export.precision.gate import gate_pipeline
from attanchor_export.precision.graph_files import save_model
from attanchor_export.precision.quantize import write_int8_qdq
from attanchor_export.precision.streamed_weights import int8_weight, linear_nodes
from attanchor_export.precision.weights import int8_static_qdq


def test_int8_weight_is_quantize_static_per_channel():
    """Column by column against onnxruntime's own quantize_data (symmetric int8), with the columns that
    take its special cases: all zeros (scale 1), all negative, one huge value."""
    from onnxruntime.quantization.quant_utils import quantize_data

    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 7)).astype(np.float32)
    w[:, 1] = 0.0
    w[:, 2] = -np.abs(w[:, 2])
    w[5, 3] = 1e4
    q, scale = int8_weight(w)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and q.shape == w.shape and scale.shape == (7,)
    for c in range(w.shape[1]):
        zero, s, want = quantize_data(w[:, c], TensorProto.INT8, True, False)
        assert int(zero) == 0 and np.float32(s) == scale[c], c
        np.testing.assert_array_equal(q[:, c], want, err_msg=f"column {c}")
    assert scale[1] == 1.0 and not q[:, 1].any()


def _initializers(path):
    return {t.name: numpy_helper.to_array(t, str(path.parent)) for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("graph", ["decoder", "vision"])
def test_streamed_int8_qdq_matches_quantize_static(artifact, tmp_path, graph):
    folder = artifact("clip-t2i")
    manifest = Manifest.load(folder)
    pipe = gate_pipeline(manifest)
    samples = builtin_samples(3)
    reader = (DecoderCalibrationReader if graph == "decoder" else VisionCalibrationReader).from_samples(pipe, samples)
    src = folder / f"{graph}.onnx"
    logits = manifest.graphs.decoder.output_names[0] if graph == "decoder" else None
    names = [n.name for n in linear_nodes(ir.load(str(src)).graph, False, logits)[0]]

    ours, theirs = tmp_path / f"{graph}.streamed.onnx", tmp_path / f"{graph}.quantize_static.onnx"
    proto = write_int8_qdq(src, ours, names, reader)
    save_model(int8_static_qdq(src, theirs, names, reader, "MinMax"), theirs)
    # returned without its weights: every int8 weight lives in the data file, none inline
    weights = [t for t in proto.graph.initializer if t.name.endswith("_quantized")]
    assert proto.ir_version == ARTIFACT_IR_VERSION and len(weights) == len(names)
    assert all(t.data_location == TensorProto.EXTERNAL and not t.raw_data for t in weights)
    a, b = _initializers(ours), _initializers(theirs)
    assert set(a) == set(b)
    activation_scales = 0
    for name, want in b.items():
        got = a[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        if name.endswith("_scale") and want.ndim == 0:  # a calibrated activation's scale
            np.testing.assert_allclose(got, want, rtol=2e-6, err_msg=name)
            activation_scales += 1
        else:
            np.testing.assert_array_equal(got, want, err_msg=name)
    assert activation_scales >= 2
    ops = [Counter(n.op_type for n in onnx.load(str(p), load_external_data=False).graph.node) for p in (ours, theirs)]
    assert ops[0] == ops[1] and ops[0]["DequantizeLinear"] == len(names) + ops[0]["QuantizeLinear"]

    reader.rewind()
    feeds = reader.get_next()
    got, want = (ort_session(p).run(None, feeds) for p in (ours, theirs))
    for x, y in zip(got, want):
        assert np.abs(x - y).max() <= 1e-3 * max(1.0, float(np.abs(y).max()))
