"""ONNX graph files of an artifact with their external data (`NAME.onnx` + `NAME.onnx.data`): written
whole or not at all, named, removed and measured in one place."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import onnx

from attanchor_export.options import ARTIFACT_IR_VERSION

TRT_SUFFIX = ".trt.onnx"


def data_file(path: Path) -> Path:
    return path.with_name(path.name + ".data")


@contextmanager
def replacing(path: Path, tag: str = "writing"):
    """Yields (tmp graph file, tmp data file) beside `path`; when the block ends without error both replace
    `path` and its data file, else both are removed. `path` may be the file being read meanwhile."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{tag}.onnx")
    tmp_data = data_file(tmp)
    try:
        yield tmp, tmp_data
        if tmp_data.exists():
            os.replace(tmp_data, data_file(path))
        os.replace(tmp, path)
    finally:
        for p in (tmp, tmp_data):
            if p.exists():
                p.unlink()


EXTERNAL_ALIGN = 4096  # tensors of a page or more start on a page: onnxruntime can map them in place


def append_external(tensor: onnx.TensorProto, raw: bytes, data, location: str) -> None:
    """Write `raw` at the end of the open data file `data` (on a page boundary when it fills a page or
    more) and make `tensor` an external reference to it, in the file named `location`."""
    if len(raw) >= EXTERNAL_ALIGN:
        data.write(b"\0" * (-data.tell() % EXTERNAL_ALIGN))
    offset = data.tell()
    data.write(raw)
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
        tensor.external_data.add(key=key, value=value)
    tensor.data_location = onnx.TensorProto.EXTERNAL


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Write `model` to `path` + its data file (external data), replacing both, IR pinned, checked."""
    path = Path(path)
    remove_model(path)
    model.ir_version = ARTIFACT_IR_VERSION
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_file(path).name, size_threshold=1024, convert_attribute=False)
    onnx.checker.check_model(str(path))


def remove_model(path: Path) -> None:
    for p in (path, data_file(path)):
        if p.exists():
            p.unlink()


def trt_name(file: str) -> str:
    """The TensorRT form's file beside `file`: decoder.onnx -> decoder.trt.onnx."""
    return file[: -len(".onnx")] + TRT_SUFFIX if file.endswith(".onnx") else file + TRT_SUFFIX


def opsets(model: onnx.ModelProto) -> dict[str, int]:
    return {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import}


__all__ = ["EXTERNAL_ALIGN", "TRT_SUFFIX", "append_external", "data_file", "opsets", "remove_model", "replacing", "save_model", "trt_name"]
