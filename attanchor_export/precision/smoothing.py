"""SmoothQuant for the int8 TensorRT form: move activation outliers into the weights, exactly.

A W8A8 linear Y = X W quantizes X with one scale per tensor (all TensorRT takes for activations). A few
input channels with large magnitudes (SmolLM2/Llama have channels 10-100x the median after their RMSNorms
and in the SwiGLU product) set that scale, and every other channel is left with a handful of int8 levels.
SmoothQuant (Xiao et al. 2023, arXiv 2211.10438) rescales channel j of X by 1/s_j and row j of W by s_j:

    Y = (X diag(1/s)) (diag(s) W),   s_j = max|X_j|^alpha / max_n |W_jn|^(1 - alpha)

so X's channels become even (quantized per tensor) and W absorbs the spread (quantized per output
channel, where row scaling costs little). `alpha` moves difficulty from activations (0) to weights (1).

The 1/s must be folded into whatever produces X, or the graph would need an extra Mul per linear. Where
it goes (`plan`), for the linears reading one tensor X (one s for all of them, from the max over their
weights' rows: q/k/v share the input norm, gate/up the post-attention norm):

- "norm": X = Mul(normalised, gain) with a constant 1-D gain that nothing else reads (RMSNorm,
  LayerNorm's gain; a LayerNorm bias Add after it is divided too): gain /= s.
- "linear": X is a linear's output, directly or through an elementwise Mul with another tensor (SwiGLU's
  act(gate) * up): that linear's weight columns (and bias) /= s. Per-output-channel weight
  quantization of that linear is unchanged by the column scaling.
- anything else is left as it is (Llama's o_proj: its input is attention's output, whose previous
  linear v_proj also writes the KV cache the runtime carries between steps).

The result is the same function in fp32 (up to rounding; tests/test_smoothing.py holds it to 1e-5), done
on onnx-ir: only the smoothed weights and gains are read and rewritten.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
from attanchor_runtime.manifest import OutlierRatio, Smoothing, freeze

from attanchor_export.precision.calibration import channel_absmax

EPS = 1e-5  # floor for a channel's max |x| or max |w|: dead channels keep s = 1


@dataclass
class Group:
    """Linears that read the same activation, and where their smoothing scale is folded."""

    activation: str  # the value X the linears read
    linears: list  # ir.Node MatMul(X, W)
    fold: str  # "norm" | "linear"
    targets: list  # ir.Value initializers to divide by s along their last axis (gain, bias, weight)


def _const(value: ir.Value | None) -> bool:
    return value is not None and value.is_initializer() and value.const_value is not None


def _only_reader(value: ir.Value, node: ir.Node) -> bool:
    return all(user is node for user, _ in value.uses()) and not value.is_graph_output()


def _bias_add(node: ir.Node) -> ir.Value | None:
    """The constant bias of an Add(x, b) or Add(b, x)."""
    if node.op_type != "Add":
        return None
    return next((v for v in node.inputs if _const(v) and len(v.const_value.shape) == 1), None)


def _norm_fold(x: ir.Value, k: int) -> list | None:
    """[gain(, bias)] when X is Mul(normalised, gain) (+ Add(bias)) with gain/bias constant [K], read once."""
    node = x.producer()
    if node is None:
        return None
    targets = []
    bias = _bias_add(node)
    if bias is not None:  # LayerNorm decomposed: ... * gain + bias
        if bias.const_value.shape[0] != k or len(bias.uses()) != 1:
            return None
        targets.append(bias)
        inner = next(v for v in node.inputs if v is not bias)
        if len(inner.uses()) != 1:
            return None
        node = inner.producer()
        if node is None:
            return None
    if node.op_type in ("LayerNormalization", "RMSNormalization"):  # the one-node norms: scale (, bias)
        if targets or len(node.outputs) != 1 and any(o.uses() for o in node.outputs[1:]):
            return None
        folded = [v for v in node.inputs[1:3] if v is not None]
        if not all(_const(v) and tuple(v.const_value.shape) == (k,) and len(v.uses()) == 1 for v in folded):
            return None
        return folded
    if node.op_type != "Mul":
        return None
    gain = next((v for v in node.inputs if _const(v) and tuple(v.const_value.shape) == (k,)), None)
    if gain is None or len(gain.uses()) != 1:
        return None
    return [gain, *targets]


def _linear_fold(x: ir.Value, k: int, skip: set) -> list | None:
    """[weight(, bias)] of the linear whose output (or one factor of an elementwise Mul) is X."""
    node = x.producer()
    if node is None:
        return None
    candidates = [x]
    if node.op_type == "Mul":  # SwiGLU: act(gate) * up; scaling one factor scales the product
        candidates = [v for v in node.inputs if v is not None and _only_reader(v, node)]
    for value in candidates:
        producer = value.producer()
        targets = []
        bias = _bias_add(producer) if producer is not None else None
        if bias is not None:
            if bias.const_value.shape[0] != k or len(bias.uses()) != 1:
                continue
            inner = next(v for v in producer.inputs if v is not bias)
            if not _only_reader(inner, producer):
                continue
            targets.append(bias)
            producer = inner.producer()
        if producer is None or producer.op_type != "MatMul" or id(producer) in skip:
            continue
        w = producer.inputs[1]
        if not _const(w) or len(w.const_value.shape) != 2 or w.const_value.shape[1] != k or len(w.uses()) != 1:
            continue
        return [w, *targets]
    return None


def plan(graph: ir.Graph, linears: list) -> tuple[list[Group], list]:
    """Group `linears` (MatMul nodes with constant weights) by their input and find each group's fold.
    Returns (groups that can be smoothed, linears left as they are)."""
    by_input: dict[str, list] = {}
    values: dict[str, ir.Value] = {}
    for node in linears:
        by_input.setdefault(node.inputs[0].name, []).append(node)
        values[node.inputs[0].name] = node.inputs[0]
    groups, left = [], []
    for name, nodes in by_input.items():
        x = values[name]
        k = int(nodes[0].inputs[1].const_value.shape[0])
        # Every reader of X must be one of the group (scaling X would change anything else), and no weight
        # may be shared with another node.
        readers = {id(user) for user, _ in x.uses()}
        if x.is_graph_output() or readers != {id(n) for n in nodes} or any(len(n.inputs[1].uses()) != 1 for n in nodes):
            left += nodes
            continue
        targets = _norm_fold(x, k)
        fold = "norm"
        if targets is None:
            targets, fold = _linear_fold(x, k, {id(n) for n in nodes}), "linear"
        if targets is None:
            left += nodes
            continue
        groups.append(Group(name, nodes, fold, targets))
    return groups, left


def scales(act_max: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), max over every weight's row j; 1 where a channel is dead."""
    w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0).astype(np.float64)
    s = np.power(np.maximum(act_max, EPS), alpha) / np.power(np.maximum(w_max, EPS), 1.0 - alpha)
    s = np.where((act_max > EPS) & (w_max > EPS), s, 1.0)
    return s


def smooth(model: ir.Model, names: list[str], act_max: dict[str, np.ndarray], alpha: float) -> Smoothing:
    """Fold SmoothQuant scales into the linears `names` of `model` (in place) and their producers.
    `act_max`: channel_absmax of the linears' inputs. Returns the manifest's record of what was done
    (precision.graphs[FILE].smoothing)."""
    wanted = set(names)
    linears = [n for n in model.graph if n.name in wanted]
    groups, left = plan(model.graph, linears)
    folds = {"norm": 0, "linear": 0}
    ratios_before, ratios_after = [], []
    for group in groups:
        x_max = act_max[group.activation]
        weights = [np.asarray(n.inputs[1].const_value.numpy(), np.float32) for n in group.linears]
        s = scales(x_max, weights, alpha)
        for node, w in zip(group.linears, weights):
            _replace(node.inputs[1], w * s[:, None].astype(np.float32))
        for target in group.targets:
            _replace(target, np.asarray(target.const_value.numpy(), np.float32) / s.astype(np.float32))
        folds[group.fold] += len(group.linears)
        live = x_max > EPS
        ratios_before.append(float(x_max[live].max() / np.median(x_max[live])))
        smoothed = x_max / s
        ratios_after.append(float(smoothed[live].max() / np.median(smoothed[live])))
    return Smoothing(
        method="SmoothQuant (scales folded into the preceding norm gain or linear)", alpha=float(alpha),
        smoothed_linears=sum(folds.values()), folded_into=freeze(folds),
        not_smoothed=tuple(sorted(n.name for n in left)),
        # max / median of the per-channel max |x| over each smoothed input: the outlier spread per tensor
        outlier_ratio_max=OutlierRatio(before=round(max(ratios_before, default=1.0), 1),
                                       after=round(max(ratios_after, default=1.0), 1)),
    )


def smooth_file(src: Path, dst: Path, names: list[str], reader, alpha: float, ir_version: int) -> Smoothing:
    """`src` with SmoothQuant folded into the linears `names` (activation maxima from `reader`), written
    to `dst` (+ .data); returns the record of `smooth`."""
    from attanchor_export.precision.streamed_weights import save_beside

    model = ir.load(str(src))
    inputs = sorted({n.inputs[0].name for n in model.graph if n.name in set(names)})
    record = smooth(model, names, channel_absmax(Path(src), reader, inputs), alpha)
    save_beside(model, Path(dst), ir_version)
    # The graph's nodes and values refer to each other: only the cycle collector frees it, and with it
    # the smoothed weights (3.4 GB left resident after a TinyLLaVA-1B decoder until then).
    del model
    gc.collect()
    return record


def _replace(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(np.ascontiguousarray(array), name=value.name)


__all__ = ["EPS", "Group", "plan", "scales", "smooth", "smooth_file"]
