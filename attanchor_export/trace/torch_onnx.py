"""One way to trace a torch module to ONNX, shared by the vision and decoder exports.

torch.onnx's dynamo exporter, always: the TorchScript exporter cannot trace DynamicCache and bakes
traced lengths into graphs that then match only at the traced shape.

Memory: the exported program's initializers are views of the module's own tensors, but its
optimizer folds every `Transpose(weight)` (how nn.Linear lowers) into a new constant, so the whole
model existed twice in memory before the first byte was written. Here those transposes become lazy
initializers instead, computed one at a time while the external data file is written; the same
optimizer (onnxscript's, as torch.onnx runs it) then does everything else, so the graph is the one
`optimize=True` gives, without the second copy of the weights. After saving, the in-memory graph
lets go of the weights, so freeing the model frees them (see the end of trace_to_onnx).

A streamed model (load/streamed.py) is traced on the meta device: no weight exists while the tracer
and optimizer run, and each initializer is bound to a lazy tensor that reads its checkpoint tensor
(converted to fp32) only when the external data file is written, one tensor at a time.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from attanchor_runtime.manifest import PAST_LEN, GraphSpec
from torch.export import Dim

from attanchor_export.load.streamed import on_meta
from attanchor_export.options import no_steps


def dynamic_axes(spec: GraphSpec, name: str, dims: dict | None = None) -> dict[int, Dim]:
    """torch.export's dynamic shape of input `name`: one Dim per symbolic axis of its spec, shared through
    `dims` (symbol -> Dim) across inputs so equal names are equal sizes. A past may be empty (min 0)."""
    dims = {} if dims is None else dims
    axes = {}
    for i, axis in enumerate(spec.input(name).shape):
        if isinstance(axis, str):
            if axis not in dims:
                dims[axis] = Dim(axis, min=0) if axis == PAST_LEN else Dim(axis)
            axes[i] = dims[axis]
    return axes


def trace_to_onnx(module: torch.nn.Module, args: tuple, dynamic_shapes: dict, spec: GraphSpec, path: Path,
                  opset: int, streamed=None, steps=None, what: str = "graph", grow=None) -> None:
    """Export with the spec's input/output names; weights go to `<file>.data` (external data).
    `streamed` (a load.streamed.StreamedModel): trace on meta, weights read from its store when written.
    `steps`: the export's progress reporter; the three phases are reported apart (where an export's
    time goes: the tracer, onnxscript's optimizer, or reading, widening and writing the weights).
    `grow`: (step label, function of the optimized ir.Model) run before the graph is written (the
    decoder's layer repeat, trace/layer_repeat.py)."""
    import onnxscript.optimizer
    import onnxscript.rewriter.onnx_fusions

    steps = steps or no_steps
    module.eval()
    with steps(f"trace {what} (torch.export)"), torch.no_grad(), _quiet_exporter(), \
            _traced_on_meta(module, streamed) as originals:
        if originals is not None:
            args = _to_meta(args)
        program = torch.onnx.export(
            module,
            args,
            dynamic_shapes=dynamic_shapes,
            dynamo=True,
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            opset_version=opset,
            optimize=False,
            verbose=False,
        )
    with steps(f"{what}: onnxscript optimizer and fusions"), torch.no_grad(), _quiet_exporter():
        if originals is not None:
            bind_streamed_weights(program.model, originals, streamed)
        lazy_weight_transposes(program.model)
        onnxscript.optimizer.optimize_ir(program.model)
        onnxscript.rewriter.onnx_fusions.fuse(program.model)
    if grow is not None:
        label, function = grow
        with steps(label):
            function(program.model)
    with steps(f"write {what} and its weights"):
        program.save(str(path), external_data=True)
    # onnxscript's module-level rewrite rules keep a reference to the last graph they matched; without
    # this the graph would pin every weight of the traced model for the rest of the export.
    for value in program.model.graph.initializers.values():
        value.const_value = None


@contextmanager
def _traced_on_meta(module, streamed):
    if streamed is None:
        yield None
        return
    paused = streamed.streamer.paused() if streamed.streamer is not None else nullcontext()
    with paused, on_meta(module) as originals:
        yield originals


def _to_meta(args):
    if isinstance(args, torch.Tensor):
        return args.to("meta")
    return type(args)(_to_meta(a) for a in args)


def bind_streamed_weights(model: ir.Model, originals: dict, streamed) -> None:
    """Give each initializer of a meta trace its value: a real tensor it was traced from (buffers, the
    materialised small parts), or a lazy read of the checkpoint tensor behind a meta parameter."""
    for name, value in model.graph.initializers.items():
        original = originals.get(name)
        if original is None:
            raise RuntimeError(f"meta trace: initializer {name} is no parameter or buffer of the traced module")
        shape = ir.Shape(list(original.shape))
        if original.is_meta:
            value.const_value = ir.LazyTensor(_reader(streamed.store, streamed.key(original)), dtype=ir.DataType.FLOAT,
                                              shape=shape, name=name)
        else:
            value.const_value = ir.tensor(original.detach().numpy(), name=name)


def _reader(store, key):
    def read():
        return ir.tensor(store.numpy(key))

    return read


def lazy_weight_transposes(model: ir.Model) -> int:
    """Replace each Transpose of an initializer it alone reads by an initializer holding the transposed
    tensor, computed only when written. Returns how many were replaced."""
    graph = model.graph
    replaced = 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        source = node.inputs[0]
        if source is None or not source.is_initializer() or source.const_value is None or len(source.uses()) != 1:
            continue
        perm_attr = node.attributes.get("perm")
        perm = tuple(perm_attr.as_ints()) if perm_attr is not None else tuple(reversed(range(len(source.shape))))
        tensor = source.const_value
        shape = ir.Shape([tensor.shape[p] for p in perm])
        lazy = ir.LazyTensor(_transposed(tensor, perm), dtype=tensor.dtype, shape=shape, name=f"{source.name}.T")
        value = ir.Value(name=f"{source.name}.T", shape=shape, type=ir.TensorType(tensor.dtype), const_value=lazy)
        graph.initializers.add(value)
        node.outputs[0].replace_all_uses_with(value)
        graph.remove(node, safe=True)
        graph.initializers.pop(source.name)
        source.const_value = None  # the lazy tensor holds it now; nothing else may (see trace_to_onnx)
        replaced += 1
    return replaced


def _transposed(tensor, perm):
    def compute():
        array = tensor.numpy()
        if perm == (1, 0):
            return ir.tensor(transposed_copy(array))
        return ir.tensor(np.ascontiguousarray(np.transpose(array, perm)))

    return compute


STRIP_ROWS = 16


def transposed_copy(array: np.ndarray) -> np.ndarray:
    """A 2-D array's transpose, contiguous. numpy's one-shot copy of a transposed view strides through
    memory a whole column at a time (0.3-1.1 GB/s on the weights of a 1B-7B decoder); copying strips of
    16 rows keeps both sides in cache: 1.3-6.8x faster in fp32 and fp16 (scripts/measure_transpose.py)."""
    out = np.empty(array.shape[::-1], array.dtype)
    for start in range(0, array.shape[0], STRIP_ROWS):
        out[:, start:start + STRIP_ROWS] = array[start:start + STRIP_ROWS].T
    return out


@contextmanager
def _quiet_exporter():
    """The exporter's warnings (torchvision ops skipped, axis renames, deprecations) say nothing to a
    user of this tool; real failures still raise."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
