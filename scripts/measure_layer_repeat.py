"""Is a traced decoder one layer repeated? The question behind tracing once at a small depth.

    python scripts/measure_layer_repeat.py DECODER.onnx [DECODER.onnx ...]

Tracing costs 1.6-2.3 s per decoder layer whatever the width (torch.export plus onnxscript's optimizer:
70 s for tiny-vqa's 30 layers, 47 s for TinyLLaVA-1B's 22, 51 s for LLaVA-1.5-7B's 32; docs/PERFORMANCE.md,
"Export time"). Tracing
two layers and repeating the second would remove most of that, but only if every layer of the full
trace is the same subgraph as layer 1 up to names. This checks that on an exported fp32 decoder.onnx
(the trace as written, before any quantization): nodes are grouped by the decoder layer in their
torch.onnx name scope, and each layer is reduced to a signature that names nothing layer-specific: per
node in graph order, its op, domain, attributes, and each input as one of
    a value made inside the layer (its position there), the previous layer's output (its position
    counted from that layer's end), an initializer of
    this layer (its name with the layer index taken out), a graph input of this layer (the same), or a
    constant (made from no input, wherever it was made: its name), or another value shared by all
    layers (its name: masks, rotary tables).
Printed per file: the layers found, how many match layer 1, the first difference of any that do not,
and the nodes outside the layers. Reads the graph only (no weights). Not in CI.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from pathlib import Path

import onnx
import onnx.numpy_helper

LAYER = re.compile(r"\.layers\.(\d+)(?=\.|$|')")
INDEX = re.compile(r"(layers\.|past_key_values\.|present\.)(\d+)(?=\.|$)")


UNSCOPED = -1  # a node the optimizer made: no name scope at all


def layer_of(node: onnx.NodeProto) -> int | None:
    """The decoder layer in the node's torch.onnx name scope; None outside the layers (embeddings, final
    norm, lm_head); UNSCOPED where the node has no scope."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            found = LAYER.findall(prop.value)
            return int(found[-1]) if found else None
    return UNSCOPED


def _strip(name: str, layer: int) -> str:
    """A name with this layer's index replaced by '#' (only where the index is the layer's)."""
    return INDEX.sub(lambda m: m.group(1) + ("#" if int(m.group(2)) == layer else m.group(2)), name)


def _content(tensor: onnx.TensorProto) -> tuple:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return ("external", tensor.name)
    return (tensor.data_type, tuple(tensor.dims), hashlib.sha1(onnx.numpy_helper.to_array(tensor).tobytes()).hexdigest())


def signatures(model: onnx.ModelProto) -> tuple[dict[int, list], int]:
    graph = model.graph
    # An initializer named after its layer is that layer's weight; any other (a scale, a shape the
    # optimizer made once per layer under a counter name) is known by its contents.
    initializers = {i.name: _strip(i.name, -1) if LAYER.search("." + i.name) else _content(i)
                    for i in graph.initializer}
    inputs = {i.name for i in graph.input}
    producer: dict[str, tuple[int | None, int]] = {}  # value -> (layer of its node, position in that layer)
    by_layer: dict[int, list] = {}
    outside = 0
    # Values that depend on no input (Constant nodes and what is computed from them and initializers
    # only): the optimizer keeps one copy where the first layer made it, and every layer reads that one.
    constants: set[str] = set()
    for node in graph.node:
        if all(not i or i in initializers or i in constants for i in node.input):
            constants.update(node.output)
    # A value one layer made and several later layers read is shared (the optimizer merged the layers'
    # identical shape computations into the first one); the residual stream is read by the next only.
    # Nodes the optimizer made (fusions, folded attention) carry no scope: they belong to the layer whose
    # values they read.
    made_in: dict[str, int | None] = {}
    node_layer = []
    for node in graph.node:
        layer = layer_of(node)
        if layer == UNSCOPED:
            layer = max((made_in[i] for i in node.input if made_in.get(i) is not None), default=None)
        node_layer.append(layer)
        for out in node.output:
            made_in[out] = layer
    readers: dict[str, set] = {}
    for node, layer in zip(graph.node, node_layer):
        for name in node.input:
            readers.setdefault(name, set()).add(layer)
    for node, layer in zip(graph.node, node_layer):
        if layer is None:
            outside += 1
            for out in node.output:
                producer[out] = (None, -1)
            continue
        nodes = by_layer.setdefault(layer, [])
        refs = []
        for name in node.input:
            if not name:
                refs.append(("none",))
            elif name in producer and producer[name][0] == layer:
                refs.append(("here", producer[name][1]))
            elif name in constants:
                refs.append(("shared constant", name))
            elif name in producer and producer[name][0] == layer - 1 and \
                    len(readers[name] - {layer - 1, None}) == 1:
                # counted from the previous layer's end: layer 0 may hold extra nodes (rotary, masks)
                refs.append(("previous layer, from its end", len(by_layer[layer - 1]) - producer[name][1]))
            elif name in initializers:
                refs.append(("weight", _strip(name, layer)) if LAYER.search("." + name) else
                            ("constant", initializers[name]))
            elif name in inputs:
                refs.append(("input", _strip(name, layer)))
            else:
                refs.append(("shared", name))
        attrs = tuple(sorted((a.name, onnx.helper.get_attribute_value(a).__repr__()) for a in node.attribute))
        nodes.append((node.op_type, node.domain, attrs, tuple(refs), len(node.output)))
        for out in node.output:
            producer[out] = (layer, len(nodes) - 1)
    return by_layer, outside


def check(path: Path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    by_layer, outside = signatures(model)
    if not by_layer:
        print(f"{path}: no node carries a decoder-layer name scope (not a torch.onnx dynamo trace?)")
        return False
    layers = sorted(by_layer)
    reference = by_layer[layers[1]] if len(layers) > 1 else by_layer[layers[0]]
    same = [k for k in layers[1:] if by_layer[k] == reference]
    print(f"{path}: {len(layers)} layers, {sum(len(v) for v in by_layer.values())} nodes in them, {outside} outside; "
          f"nodes per layer {sorted({len(v) for v in by_layer.values()})}")
    print(f"  layers 1..{layers[-1]} equal to layer 1 up to names: {len(same)} of {len(layers) - 1}")
    print(f"  layer 0 equal to layer 1: {by_layer[layers[0]] == reference} (layer 0 reads the embeddings, "
          "not a previous layer, so some difference is expected)")
    for k in layers[1:]:
        if by_layer[k] != reference:
            a, b = reference, by_layer[k]
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            print(f"  layer {k} differs first at node {first}: {a[first] if first < len(a) else None} vs "
                  f"{b[first] if first < len(b) else None}")
            break
    return len(same) == len(layers) - 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("decoders", nargs="+", type=Path)
    args = parser.parse_args(argv)
    results = [check(p) for p in args.decoders]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
