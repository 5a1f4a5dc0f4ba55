"""attanchor_runtime.sessions: the session options every backend opens its graphs with."""

import numpy as np
import onnx
import pytest
from attanchor_runtime.errors import ArtifactError
from attanchor_runtime.sessions import _options, ort_session
from onnx import TensorProto, helper


def _add_model(path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_spinning_is_onnxruntimes_default_unless_asked(monkeypatch):
    monkeypatch.delenv("ATTANCHOR_ORT_SPINNING", raising=False)
    with pytest.raises(RuntimeError, match="does not have configuration"):  # not set: onnxruntime's default
        _options(2, True).get_session_config_entry("session.intra_op.allow_spinning")
    monkeypatch.setenv("ATTANCHOR_ORT_SPINNING", "0")
    assert _options(2, True).get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_spinning_off_session_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTANCHOR_ORT_SPINNING", "0")
    _add_model(tmp_path / "add.onnx")
    session = ort_session(tmp_path / "add.onnx", threads=2)
    (y,) = session.run(None, {"x": np.array([1.0, 2.0], np.float32)})
    assert y.tolist() == [2.0, 4.0]


@pytest.mark.parametrize("value", ["yes", "", "2"])
def test_a_bad_spinning_value_is_one_clear_error(monkeypatch, value):
    monkeypatch.setenv("ATTANCHOR_ORT_SPINNING", value)
    with pytest.raises(ArtifactError, match="ATTANCHOR_ORT_SPINNING must be 0 or 1"):
        _options(None, True)


def _matmul_model(path, rows: int = 64, cols: int = 48):
    from onnx import numpy_helper

    weight = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", rows])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", cols])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y],
                              [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return weight


def test_a_session_without_prepacking_computes_the_same(tmp_path):
    """prepack=False (what parity checks open their float graphs with) reaches onnxruntime, and its GEMMs
    give what the prepacked session gives, at one row and at many."""
    weight = _matmul_model(tmp_path / "mm.onnx")
    packed = ort_session(tmp_path / "mm.onnx", threads=2)
    unpacked = ort_session(tmp_path / "mm.onnx", threads=2, prepack=False)
    assert unpacked.get_session_options().get_session_config_entry("session.disable_prepacking") == "1"
    with pytest.raises(RuntimeError, match="does not have configuration"):  # the default: onnxruntime prepacks
        packed.get_session_options().get_session_config_entry("session.disable_prepacking")
    for batch in (1, 3, 200):
        x = np.random.default_rng(batch).standard_normal((batch, weight.shape[0])).astype(np.float32)
        (a,), (b,) = packed.run(None, {"x": x}), unpacked.run(None, {"x": x})
        np.testing.assert_allclose(b, x @ weight, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
