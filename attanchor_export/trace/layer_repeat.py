"""Trace two decoder layers, then repeat the second: the decoder graph without tracing every layer.

torch.export and onnxscript's optimizer cost 1.6-2.3 s per decoder layer whatever its width, so a
30-layer decoder spends ~70 s there. Every layer after the first traces to the same subgraph up to
names (scripts/measure_layer_repeat.py on tiny-vqa and tiny-vqa-qwen: layers 1..29 equal layer 1; layer
0 differs only in also making the shape values every later layer reads). So the exporter traces the
decoder cut to TRACED_DEPTH layers, optimizes that, and copies layer 1's nodes once per further layer:

- a value made inside layer 1 gets a new name in each copy;
- what layer 1 reads from layer 0's residual stream (found as the positions, counted from the layer's
  end, of what the final norm reads from layer 1) is read from the previous copy;
- `layers.1.` initializers become the copy's own, bound lazily to that layer's weights as the trace's
  own are (read from the checkpoint only when written);
- `past_key_values.1.*` / `present.1.*` become each copy's own graph input and output;
- everything else (masks, rotary tables, shapes, constants) is shared, as in a full trace.

Where the trace is not shaped that way (no name scopes, a node with a subgraph, a weight named other
than its layer's parameter), LayerRepeatUnavailable is raised and the caller traces every layer.
Parity against PyTorch judges the result like any other decoder graph.

The vision graph of a family whose tower is a plain stack of alike layers (LLaVA's CLIP and SigLIP
towers, read at the last layer run) is grown the same way, without the KV cache (trace/vision.py).
ATTANCHOR_TRACE_EVERY_LAYER=1 traces every layer of both graphs.
"""

from __future__ import annotations

import ast
import os
import re
from contextlib import contextmanager

import onnx_ir as ir
from attanchor_runtime.manifest import PAST_PREFIX, PRESENT_PREFIX, GraphSpec

from attanchor_export.trace.torch_onnx import transposed_copy

TRACED_DEPTH = 2
_SCOPES = "pkg.torch.onnx.name_scopes"
_LAYER = re.compile(r"\.layers\.(\d+)$")


class LayerRepeatUnavailable(Exception):
    """The traced graph is not two regular layers; trace every layer instead."""


def every_layer() -> bool:
    """ATTANCHOR_TRACE_EVERY_LAYER=1: no layer repeat, every layer traced (a check, or a way around)."""
    return os.environ.get("ATTANCHOR_TRACE_EVERY_LAYER") == "1"


def layers_prefix(module, layers) -> str:
    """The initializer names' prefix of `layers` in a trace of `module`: their module path + '.'."""
    for name, sub in module.named_modules():
        if sub is layers:
            return f"{name}."
    raise LayerRepeatUnavailable("the layers are not a submodule of the traced module")


def layer_weights(full_layers, prefix: str, streamed=None):
    """`weight(name, like)` for repeat_layer: initializer `name` of layer k (k >= TRACED_DEPTH), as the
    trace binds its own: the parameter read lazily (from the checkpoint when streamed), transposed where
    the name ends in '.T'."""

    def weight(name: str, like: ir.Value) -> ir.Value:
        index, _, relative = name[len(prefix):].partition(".")
        transposed = relative.endswith(".T")
        relative = relative[:-2] if transposed else relative
        try:
            parameter = full_layers[int(index)].get_parameter(relative)
        except (AttributeError, ValueError, IndexError):
            raise LayerRepeatUnavailable(f"{name} is no parameter of layer {index}") from None
        if transposed and len(like.shape) != 2:
            raise LayerRepeatUnavailable(f"{name}: a transposed weight of rank {len(like.shape)}")
        if parameter.is_meta:
            if streamed is None:
                raise LayerRepeatUnavailable(f"{name} has no values (meta) and no checkpoint to read")
            key = streamed.key(parameter)

            def read():
                return streamed.store.numpy(key)
        else:
            def read():
                return parameter.detach().numpy()

        def compute():
            array = read()
            return ir.tensor(transposed_copy(array) if transposed else array, name=name)

        tensor = ir.LazyTensor(compute, dtype=like.dtype, shape=like.shape, name=name)
        return ir.Value(name=name, shape=like.shape, type=like.type, const_value=tensor)

    return weight


def spec_at_depth(spec: GraphSpec, depth: int) -> GraphSpec:
    """The decoder spec with the KV cache of the first `depth` layers only."""
    keep = {f"{prefix}.{i}.{kv}" for prefix in (PAST_PREFIX, PRESENT_PREFIX) for i in range(depth)
            for kv in ("key", "value")}
    inputs = tuple(t for t in spec.inputs if t.name in keep or t.name not in spec.past_names)
    outputs = tuple(t for t in spec.outputs if t.name in keep or t.name not in spec.present_names)
    return GraphSpec(spec.file, inputs, outputs, spec.notes)


@contextmanager
def fewer_layers(language_model, depth: int):
    """The language model with only its first `depth` decoder layers, as transformers' loop reads them."""
    config = language_model.config
    layers, count = language_model.layers, config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    language_model.layers = type(layers)(list(layers)[:depth])
    config.num_hidden_layers = depth
    if types is not None:
        config.layer_types = list(types)[:depth]
    try:
        yield
    finally:
        language_model.layers, config.num_hidden_layers = layers, count
        if types is not None:
            config.layer_types = types


def _layer(node: ir.Node) -> int | None | str:
    scopes = node.metadata_props.get(_SCOPES)
    if scopes is None:
        return "unscoped"
    for scope in reversed(ast.literal_eval(scopes)):
        match = _LAYER.search(scope)
        if match:
            return int(match.group(1))
    return None


def _layers_of(graph: ir.Graph) -> dict[ir.Node, int | None]:
    """Each node's decoder layer; a node the optimizer made (no scope) belongs to the layer it reads."""
    made_in: dict[ir.Value, int | None] = {}
    layers = {}
    for node in graph:
        layer = _layer(node)
        if layer == "unscoped":
            layer = max((made_in[v] for v in node.inputs if v is not None and made_in.get(v) is not None),
                        default=None)
        layers[node] = layer
        for value in node.outputs:
            made_in[value] = layer
    return layers


def order_io(model: ir.Model, spec: GraphSpec) -> None:
    """Graph inputs and outputs in the spec's order (the copies' KV cache was appended as it was made)."""
    graph = model.graph
    for values, names in ((graph.inputs, spec.input_names), (graph.outputs, spec.output_names)):
        by_name = {v.name: v for v in values}
        if set(by_name) != set(names):
            raise LayerRepeatUnavailable(f"graph IO {sorted(set(by_name) ^ set(names))[:4]} differ from the spec")
        values.clear()
        values.extend(by_name[n] for n in names)


def repeat_layer(model: ir.Model, num_layers: int, layer_prefix: str, weight) -> None:
    """Grow a graph traced at TRACED_DEPTH layers to `num_layers` by copying layer 1 (module doc).
    `layer_prefix`: the initializer prefix of the layers ("language_model.layers."); `weight(name, like)`
    gives the initializer value `name` of a further layer, shaped like layer 1's `like`."""
    graph = model.graph
    layers = _layers_of(graph)
    if set(layers.values()) - {None} != {0, 1}:
        raise LayerRepeatUnavailable(f"layers found: {sorted(v for v in set(layers.values()) if v is not None)}")
    first = [n for n in graph if layers[n] == 0]
    second = [n for n in graph if layers[n] == 1]
    if any(isinstance(a.value, ir.Graph) or a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
           for n in second for a in n.attributes.values()):
        raise LayerRepeatUnavailable("a node of the layer holds a subgraph")
    in_second = set(second)
    made = {v: (len(second) - i, j) for i, n in enumerate(second) for j, v in enumerate(n.outputs)}
    made_first = {(len(first) - i, j): v for i, n in enumerate(first) for j, v in enumerate(n.outputs)}
    tail = [n for n in graph if layers[n] is None and any(v in made for v in n.inputs)]
    # The residual stream: what the nodes after the layers read from layer 1, by position from its end.
    residual = {made[v]: v for n in tail for v in n.inputs if v in made}
    if not residual:
        raise LayerRepeatUnavailable("nothing after the layers reads layer 1")
    if any(v in residual.values() for v in graph.outputs):  # checked before the graph is changed
        raise LayerRepeatUnavailable("a graph output is layer 1's residual stream")
    stream = {}  # layer 0's residual value -> layer 1's value at the same position
    for position, value in residual.items():
        if position not in made_first:
            raise LayerRepeatUnavailable("layer 0 and layer 1 end differently")
        stream[made_first[position]] = value
    past = {v: v.name for v in graph.inputs if v.name.startswith(f"{PAST_PREFIX}.1.")}
    presents = {v: v.name for v in graph.outputs if v.name.startswith(f"{PRESENT_PREFIX}.1.")}
    reads = list(dict.fromkeys(v for n in second for v in n.inputs if v is not None))  # in order: same file every run
    # Layer 1's weights by their name inside a layer. onnxscript's optimizer keeps one initializer of
    # equal contents, so a layer-1 weight equal to layer 0's (zero biases of a fresh model) is read under
    # layer 0's name; each copy still gets its own layer's weight.
    relative = {}
    for value in reads:
        if value.is_initializer() and value.name.startswith(layer_prefix):
            index, _, rest = value.name[len(layer_prefix):].partition(".")
            if index not in ("0", "1"):
                raise LayerRepeatUnavailable(f"layer 1 reads layer {index}'s weight {value.name}")
            relative[value] = rest

    # Nodes of layer 1 that read nothing of the layer's own (no stream, cache, weight or value of a node
    # that does): shape arithmetic on the graph's inputs. A full trace computes these once for every layer
    # after the first, so the copies read layer 1's instead of repeating them.
    varying = set(stream) | set(past) | set(relative)
    invariant = set()
    for node in second:
        if any(v is not None and (v in varying or v.producer() in in_second and v.producer() not in invariant)
               for v in node.inputs):
            continue
        invariant.add(node)
    previous = dict(stream)  # layer 1's view: layer 0's stream value -> this copy's input
    copies, new_inputs, new_outputs = [], [], []
    for k in range(TRACED_DEPTH, num_layers):
        mapping: dict[ir.Value, ir.Value] = {}
        for value in reads:
            if value in stream:
                mapping[value] = previous[value]
            elif value in past:
                copy = ir.Value(name=past[value].replace(f"{PAST_PREFIX}.1.", f"{PAST_PREFIX}.{k}."),
                                shape=value.shape, type=value.type)
                new_inputs.append(copy)
                mapping[value] = copy
            elif value in relative:
                copy = weight(f"{layer_prefix}{k}.{relative[value]}", value)
                graph.register_initializer(copy)
                mapping[value] = copy
        for node in second:
            if node in invariant:
                continue
            inputs = [None if v is None else mapping.get(v, v) for v in node.inputs]
            scopes = node.metadata_props.get(_SCOPES)
            meta = {_SCOPES: scopes.replace(f"{layer_prefix}1", f"{layer_prefix}{k}")} if scopes else {}
            clone = ir.Node(node.domain, node.op_type, inputs,
                            [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()],
                            overload=node.overload, num_outputs=len(node.outputs), version=node.version,
                            name=f"{node.name}.layer{k}" if node.name else None, metadata_props=meta)
            for old, new in zip(node.outputs, clone.outputs):
                new.name = (presents[old].replace(f"{PRESENT_PREFIX}.1.", f"{PRESENT_PREFIX}.{k}.")
                            if old in presents else f"{old.name}.layer{k}")
                new.shape, new.type = old.shape, old.type
                mapping[old] = new
                if old in presents:
                    new_outputs.append(new)
            copies.append(clone)
        previous = {v0: mapping[v1] for v0, v1 in stream.items()}
    graph.insert_after(second[-1], copies)
    last = {v1: previous[v0] for v0, v1 in stream.items()}
    for node in tail:
        for i, value in enumerate(node.inputs):
            if value in last:
                node.replace_input_with(i, last[value])
    graph.inputs.extend(new_inputs)
    graph.outputs.extend(new_outputs)


__all__ = ["TRACED_DEPTH", "LayerRepeatUnavailable", "every_layer", "fewer_layers", "layer_weights", "layers_prefix",
           "order_io", "repeat_layer", "spec_at_depth"]
