"""TensorRT's ONNX-parser operator support, as data, for the versions the lint targets.

Transcribed by hand from onnx-tensorrt ``docs/operators.md`` and ``docs/Changelog.md``:

* ``"11.5"`` (the newest the lint knows, alias ``"latest"`` and ``"11.x-latest"``) and ``"11.4"``
  (the first 11.x for Jetson: 11.4.1 on JetPack 7.2.2+): opsets 9-25 and 9-24, as their release
  notes give them. Their operator and type tables are the 10.15 ones carried forward: 11.0 removed
  builder and plugin APIs (weak typing, precision flags, the INT8 calibrator), not ONNX importers,
  and no 11.x operators.md was at hand to transcribe. An op 11.x added is therefore reported as
  unknown (a false error, never a false pass); extend ``_ADDED_IN_11`` when one is confirmed.
* ``"10.15"`` (the newest 10.x, alias ``"10.x-latest"``): the 10.15 table, opsets 9-24.
* ``"10.3"`` (JetPack 6.x on Jetson Orin): the 10.1 GA table (opsets 9-20) with the 10.2/10.3
  changelog applied (10.3: ``Slice`` takes tensor ``axes``). Everything the changelog adds later is
  left out: Pad tensor axes (10.4), Blackman/Hamming/HannWindow (10.4), STFT (10.5), dynamic
  Squeeze/Unsqueeze axes (10.7), FP4 and dynamic CumSum axis (10.8), integer Pow (10.12), Einsum
  ellipsis/diagonal/broadcast (10.12), Attention (10.14), RMSNormalization, RotaryEmbedding and
  TensorScatter (10.15).

Each op maps to ``(types, restriction)``: ``types`` is the "Supported Types" column as a tuple
(``None`` = the op is listed as unsupported, "N"), ``restriction`` is the column's text, abridged.
The machine-checked part of the restrictions lives in :mod:`attanchor_graphs.trt_lint`
(``CONST_INPUTS`` and the attribute checks); the text is shown to users next to a finding.
An op absent from a table is unknown to that parser version (newer than its table).
"""

from __future__ import annotations

FP = ("FP32", "FP16", "BF16")
FPI = FP + ("INT32", "INT64")
FPIB = FPI + ("BOOL",)
BOOL = ("BOOL",)
N = None

_AXES_INIT = "`axes` must be an initializer"

# ---- the newest table (TensorRT 10.15) -------------------------------------------------------
_LATEST: dict[str, tuple[tuple[str, ...] | None, str]] = {
    "Abs": (FPI, ""),
    "Acos": (FP, ""),
    "Acosh": (FP, ""),
    "Add": (FPI, ""),
    "AffineGrid": (N, ""),
    "And": (BOOL, ""),
    "ArgMax": (FPI, ""),
    "ArgMin": (FPI, ""),
    "Asin": (FP, ""),
    "Asinh": (FP, ""),
    "Atan": (FP, ""),
    "Atanh": (FP, ""),
    "Attention": (FP + ("INT8", "FP8"), "Q, K, V and attn_mask 4-D; past_key/past_value/nonpad_kv_seqlen inputs "
                  "and present_key/present_value/qk_matmul_output outputs unsupported; no softcap"),
    "AveragePool": (FP, "2D or 3D pooling only; dilations empty or all ones"),
    "BatchNormalization": (FP, ""),
    "Bernoulli": (N, ""),
    "BitShift": (N, ""),
    "BitwiseAnd": (N, ""),
    "BitwiseNot": (N, ""),
    "BitwiseOr": (N, ""),
    "BitwiseXor": (N, ""),
    "BlackmanWindow": (("FP32", "FP16"), ""),
    "Cast": (FPI + ("UINT8", "BOOL"), ""),
    "CastLike": (FPI + ("UINT8", "BOOL"), ""),
    "Ceil": (FP, ""),
    "Col2Im": (N, ""),
    "Celu": (FP, ""),
    "CenterCropPad": (N, ""),
    "Clip": (FP, ""),
    "Compress": (N, ""),
    "Concat": (FPIB, ""),
    "ConcatFromSequence": (N, ""),
    "Constant": (FP + ("FP8", "FP4", "INT4", "INT32", "INT64", "BOOL"),
                 "sparse_value, value_string and value_strings unsupported"),
    "ConstantOfShape": (FP + ("FP8", "FP4", "INT4", "INT32", "INT64", "BOOL"), ""),
    "Conv": (FP, ""),
    "ConvInteger": (N, ""),
    "ConvTranspose": (FP, ""),
    "Cos": (FP, ""),
    "Cosh": (FP, ""),
    "CumSum": (FP, "`axis` must be a build-time constant"),
    "DFT": (N, ""),
    "DeformConv": (("FP32", "FP16"), "1D or 2D spatial input; symmetric pads"),
    "DepthToSpace": (FPI, ""),
    "DequantizeLinear": (("INT8", "FP8", "FP4", "INT4"), "`x_zero_point` must be zero"),
    "Det": (N, ""),
    "Div": (FPI, ""),
    "Dropout": (FP, "`is_training` must be an initializer and evaluate to False"),
    "DynamicQuantizeLinear": (N, ""),
    "Einsum": (FP, ""),
    "Elu": (FP, ""),
    "Equal": (FPI, ""),
    "Erf": (FP, ""),
    "Exp": (FP, ""),
    "Expand": (FPIB, ""),
    "EyeLike": (FPIB, "`input` must have static dimensions"),
    "Flatten": (FPIB, ""),
    "Floor": (FP, ""),
    "Gather": (FPIB, ""),
    "GatherElements": (FPIB, ""),
    "GatherND": (FPIB, ""),
    "Gelu": (FP + ("INT8", "INT32", "INT64"), ""),
    "Gemm": (FP, ""),
    "GlobalAveragePool": (FP, ""),
    "GlobalLpPool": (FP, ""),
    "GlobalMaxPool": (FP, ""),
    "Greater": (FPI, ""),
    "GreaterOrEqual": (FPI, ""),
    "GridSample": (("FP32", "FP16"), "4-D input"),
    "GroupNormalization": (FP, ""),
    "GRU": (FP, "bidirectional: same activations both ways"),
    "HammingWindow": (("FP32", "FP16"), ""),
    "HannWindow": (("FP32", "FP16"), ""),
    "HardSigmoid": (FP, ""),
    "HardSwish": (FP, ""),
    "Hardmax": (FP, "`axis` dimension must be a build-time constant"),
    "Identity": (FPIB, ""),
    "If": (FPIB, "branch outputs must have the same rank and different names"),
    "ImageScaler": (FP, ""),
    "ImageDecoder": (N, ""),
    "InstanceNormalization": (FP, ""),
    "IsInf": (FP, ""),
    "IsNaN": (FPI, ""),
    "LayerNormalization": (FP, "only the first output Y is supported"),
    "LeakyRelu": (FP, ""),
    "Less": (FPI, ""),
    "LessOrEqual": (FPI, ""),
    "Log": (FP, ""),
    "LogSoftmax": (FP, ""),
    "Loop": (FPIB, "scan output length cannot be dynamic; loop-carried shapes fixed across iterations"),
    "LRN": (FP, ""),
    "LSTM": (FP, "input_forget and layout must be 0"),
    "LpNormalization": (FP, ""),
    "LpPool": (FP, "dilations empty or all ones"),
    "MatMul": (FP, ""),
    "MatMulInteger": (N, ""),
    "Max": (FPI, ""),
    "MaxPool": (FP, "2D or 3D only; the Indices output is unsupported; dilations empty or all ones"),
    "MaxRoiPool": (N, ""),
    "MaxUnpool": (N, ""),
    "Mean": (FP + ("FP8", "INT32", "INT64"), ""),
    "MeanVarianceNormalization": (FP, ""),
    "MelWeightMatrix": (N, ""),
    "Min": (FPI, ""),
    "Mish": (("FP32", "FP16"), ""),
    "Mod": (FPI, ""),
    "Mul": (FPI, ""),
    "Multinomial": (N, ""),
    "Neg": (FPI, ""),
    "NegativeLogLikelihoodLoss": (N, ""),
    "NonMaxSuppression": (("FP32", "FP16"), ""),
    "NonZero": (("FP32", "FP16"), ""),
    "Not": (BOOL, ""),
    "OneHot": (FPIB, "`depth` must be a build-time constant"),
    "Optional": (N, ""),
    "OptionalGetElement": (N, ""),
    "OptionalHasElement": (N, ""),
    "Or": (BOOL, ""),
    "Pad": (FPI, ""),
    "ParametricSoftplus": (FP, ""),
    "Pow": (FPI, ""),
    "PRelu": (FP, ""),
    "QLinearConv": (N, ""),
    "QLinearMatMul": (N, ""),
    "QuantizeLinear": (FP, "`y_zero_point` must be 0"),
    "RandomNormal": (FP, "seed ignored"),
    "RandomNormalLike": (FP, "seed ignored"),
    "RandomUniform": (FP, "seed ignored"),
    "RandomUniformLike": (FP, "seed ignored"),
    "Range": (FPI, ""),
    "Reciprocal": (FP, ""),
    **{f"Reduce{k}": (FPI, _AXES_INIT) for k in (
        "L1", "L2", "LogSum", "LogSumExp", "Max", "Mean", "Min", "Prod", "Sum", "SumSquare")},
    "RegexFullMatch": (N, ""),
    "Relu": (FPI, ""),
    "Reshape": (FPIB, ""),
    "Resize": (FP, "modes nearest/linear; no cubic, no antialias; aspect ratio policy stretch"),
    "ReverseSequence": (FPIB, ""),
    "RMSNormalization": (FP, ""),
    "RNN": (FP, "bidirectional: same activations both ways"),
    "RoiAlign": (("FP32", "FP16"), ""),
    "RotaryEmbedding": (FP, "`position_ids` must be INT64"),
    "Round": (FP, ""),
    "STFT": (("FP32",), "`frame_step` and `window` must be initializers; real input"),
    "ScaledTanh": (FP, ""),
    "Scan": (FP, ""),
    "Scatter": (FPI, ""),
    "ScatterElements": (FPI, ""),
    "ScatterND": (FPI, "`reduction` other than none unsupported"),
    "Selu": (FP, ""),
    **{name: (N, "") for name in (
        "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert",
        "SequenceLength", "SequenceMap", "SoftmaxCrossEntropyLoss", "SplitToSequence", "StringConcat",
        "StringNormalizer", "StringSplit", "TfIdfVectorizer", "Unique")},
    "Shape": (FPIB, ""),
    "Shrink": (FPI, ""),
    "Sigmoid": (FP, ""),
    "Sign": (FPI, ""),
    "Sin": (FP, ""),
    "Sinh": (FP, ""),
    "Size": (FPIB, ""),
    "Slice": (FPIB, ""),
    "Softmax": (FP, ""),
    "Softplus": (FP, ""),
    "Softsign": (FP, ""),
    "SpaceToDepth": (FPI, ""),
    "Split": (FPIB, ""),
    "Sqrt": (FP, ""),
    "Squeeze": (FPIB, "`axes` must be resolvable to a constant"),
    "Sub": (FPI, ""),
    "Sum": (FPI, ""),
    "Tan": (FP, ""),
    "Tanh": (FP, ""),
    "TensorScatter": (FP + ("INT32",), "`past_cache` and `update` 4-D; `axis` must be -2"),
    "ThresholdedRelu": (FP, ""),
    "Tile": (FPIB, ""),
    "TopK": (FPI, "`sorted` must be 1; K < 3840"),
    "Transpose": (FPIB, ""),
    "Trilu": (FPIB, ""),
    "Unsqueeze": (FPIB, "`axes` must be resolvable to a constant"),
    "Upsample": (FP, ""),
    "Where": (FPIB, ""),
    "Xor": (BOOL, ""),
}

# ---- TensorRT 10.3: 10.1 GA table + 10.2/10.3 changelog ------------------------------------
_ADDED_AFTER_10_3 = ("Attention", "RMSNormalization", "RotaryEmbedding", "TensorScatter")
_10_3 = {k: v for k, v in _LATEST.items() if k not in _ADDED_AFTER_10_3}
_10_3.update({
    "BlackmanWindow": (N, ""),
    "HammingWindow": (N, ""),
    "HannWindow": (N, ""),
    "STFT": (N, ""),
    "Constant": (FPIB, "sparse_value, value_string and value_strings unsupported"),
    "ConstantOfShape": (FPIB, ""),
    "CumSum": (FP, "`axis` must be an initializer"),
    "DequantizeLinear": (("INT8", "FP8", "INT4"), "`x_zero_point` must be zero"),
    "Einsum": (FP, "no ellipsis, diagonal or broadcasting (added in 10.12)"),
    "Pad": (FPI, "`axes` must be an initializer"),
    "Pow": (FP, ""),
    "ScatterND": (FPI, "`reduction` is not supported"),
    "Squeeze": (FPIB, "`axes` must be an initializer"),
    "Unsqueeze": (FPIB, "`axes` must be a constant tensor"),
})

# ---- TensorRT 11.x: the 10.15 table carried forward (see the module docstring) ----------------
_11_X = dict(_LATEST)

# ONNX TensorProto data type names TensorRT can hold as tensors, per target.
_DTYPES_10_3 = ("FLOAT", "FLOAT16", "BFLOAT16", "INT32", "INT64", "INT8", "INT4", "FLOAT8E4M3FN", "UINT8", "BOOL")
_DTYPES_LATEST = _DTYPES_10_3 + ("FLOAT4E2M1",)

TABLES = {
    "10.3": {
        "trt_version": "10.3",
        "opset_min": 9,
        "opset_max": 20,
        "onnx_ir_max": 10,  # onnx 1.16 submodule (10.0 - 10.5)
        "dtypes": _DTYPES_10_3,
        "ops": _10_3,
        "source": "onnx-tensorrt docs/operators.md @ 10.1-GA + docs/Changelog.md 10.2, 10.3",
    },
    "10.15": {
        "trt_version": "10.15",
        "opset_min": 9,
        "opset_max": 24,
        "onnx_ir_max": 11,  # onnx 1.18 submodule since 10.11
        "dtypes": _DTYPES_LATEST,
        "ops": _LATEST,
        "source": "onnx-tensorrt docs/operators.md @ 10.15 GA",
    },
    "11.4": {
        "trt_version": "11.4",
        "opset_min": 9,
        "opset_max": 24,
        "onnx_ir_max": 11,  # at least what 10.15 reads; the artifact pins IR 10
        "dtypes": _DTYPES_LATEST,
        "ops": _11_X,
        "source": "opset range from the TensorRT 11.4 release notes; ops and types: the 10.15 table",
    },
    "11.5": {
        "trt_version": "11.5",
        "opset_min": 9,
        "opset_max": 25,
        "onnx_ir_max": 11,
        "dtypes": _DTYPES_LATEST,
        "ops": _11_X,
        "source": "opset range from the TensorRT 11.5 release notes; ops and types: the 10.15 table",
    },
}

ALIASES = {"latest": "11.5", "11.x-latest": "11.5", "10.x-latest": "10.15", "jetpack6": "10.3"}

# ONNX type name -> the name the tables use.
ONNX_TO_TRT_TYPE = {
    "FLOAT": "FP32", "FLOAT16": "FP16", "BFLOAT16": "BF16", "INT32": "INT32", "INT64": "INT64",
    "INT8": "INT8", "UINT8": "UINT8", "INT4": "INT4", "BOOL": "BOOL", "FLOAT8E4M3FN": "FP8",
    "FLOAT4E2M1": "FP4",
}


def table(target: str) -> dict:
    """The table for an alias, "X.Y", or a full version string such as tensorrt.__version__ ("10.3.0.30")."""
    key = ALIASES.get(target, target)
    if key not in TABLES:
        key = ".".join(str(target).split(".")[:2])
    if key not in TABLES:
        raise ValueError(f"unknown TensorRT target {target!r}: choose one of {', '.join([*TABLES, *ALIASES])}")
    return TABLES[key]


__all__ = ["ALIASES", "ONNX_TO_TRT_TYPE", "TABLES", "table"]
