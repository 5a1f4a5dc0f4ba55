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
