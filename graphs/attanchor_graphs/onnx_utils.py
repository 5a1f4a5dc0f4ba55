"""Small ONNX helpers shared by the graph builders (onnx + numpy only)."""

from __future__ import annotations

import re

import onnx

__all__ = ["MIN_IR_VERSION", "ir_version_for_runtime"]

# Model-local functions need IR >= 8 (and so does opset 17).
MIN_IR_VERSION = 8

# onnxruntime refuses models whose IR version is newer than the onnx library it was built
# with, while the installed onnx package writes its own (possibly newer) IR version: e.g.
# onnx 1.23 writes IR 14, which onnxruntime 1.31 rejects. Highest IR version each
# onnxruntime release loads, from the onnx version it bundles; versions in between use the
# nearest lower entry, which is safe because loaders accept every older IR version.
_ORT_MAX_IR = (
    ((1, 14), 8),
    ((1, 15), 9),
    ((1, 18), 10),
    ((1, 22), 11),
    ((1, 31), 13),  # verified: 1.31.1 loads IR 13, refuses IR 14
)
_FALLBACK_IR = 10


def _parse_version(text: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def ir_version_for_runtime(ort_version: str | None = None) -> int:
    """Highest ONNX IR version that both the installed onnx and onnxruntime handle.

    ``ort_version`` defaults to the installed onnxruntime's; without onnxruntime (or with an
    unparsable version) the answer is IR 10, which every onnxruntime since 1.18 loads.
    """
    if ort_version is None:
        try:
            import onnxruntime  # lazy: the graphs package must import without it

            ort_version = onnxruntime.__version__
        except ImportError:
            ort_version = ""
    parsed = _parse_version(ort_version)
    if parsed is None:
        ir = _FALLBACK_IR
    elif parsed < _ORT_MAX_IR[0][0]:
        ir = MIN_IR_VERSION
    else:
        ir = max(v for ver, v in _ORT_MAX_IR if ver <= parsed)
    return max(MIN_IR_VERSION, min(ir, onnx.IR_VERSION))
