"""What a decode step's attention costs in onnxruntime on this CPU, and whether another form of it is faster.

    python scripts/measure_attention.py FOLDER [--positions 128,512,1536] [--rounds 7] [--threads 2]

FOLDER: an artifact whose decoder.onnx is the fused onnxruntime form (int4/int8, KV cache read in place).
Two comparisons per context length, all sessions in one process, rounds interleaved, medians printed:

1. block: the decoder's own attention block, from the qkv Split to the o_proj input of every layer
   (reshapes, rotary, the two score MatMuls over the past buffer and the new position, Softmax, the two
   value MatMuls, back to [B, S, hidden]), extracted from decoder.onnx, against the same layers written
   as one onnxruntime GroupQueryAttention each (rotary inside, fed position_ids; past and present bound
   to one buffer, so nothing is copied). Its output matches the block's (max |diff| printed).
2. core: softmax(q K^T + bias) V alone on random tensors at the artifact's dims, every layer, grouped
   queries [B, kv_heads, group, D], in four forms: V1 = FusedMatMul(q, K, transB) ... MatMul(p, V), the
   form the decoder uses; V2 = scores as K q^T (K as the GEMM's first operand), softmax on
   axis 2, FusedMatMul(p, V, transA); V3 = V2 with the output as V^T p then a Transpose; V4 = V2's scores
   transposed back before a last-axis Softmax.

Batch 1, one new position, random weights: speed only. Not in CI.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from attanchor_runtime.manifest import Dims, Manifest
from onnx import TensorProto, helper, numpy_helper

MS = "com.microsoft"


def options(threads: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.log_severity_level = 3
    return so


def value(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def attention_block(model: onnx.ModelProto):
    """(the extracted block as a model, its qkv Split nodes, the o_proj input names) of a fused decoder."""
    graph = model.graph
    splits = [n for n in graph.node if n.op_type == "Split" and len(n.output) == 3]
    o_inputs = [n.input[0] for n in graph.node if n.op_type == "MatMulNBits" and "o_proj" in n.input[1]]
    if not splits or len(splits) != len(o_inputs):
        raise SystemExit(
            "decoder.onnx is not the fused onnxruntime form with merged q/k/v (an int4 or int8 export)"
        )
    inits = {i.name: i for i in graph.initializer if i.data_location != TensorProto.EXTERNAL}
    producer = {o: n for n in graph.node for o in n.output}
    stop = {o for n in splits for o in n.output} | {i.name for i in graph.input}
    needed, stack, seen = set(), list(o_inputs), set()
    while stack:
        name = stack.pop()
        if name in seen or name in stop or name in inits or not name:
            continue
        seen.add(name)
        node = producer[name]
        needed.add(id(node))
        stack.extend(node.input)
    nodes = [n for n in graph.node if id(n) in needed]
    used = {i for n in nodes for i in n.input}
    graph_inputs = [i for i in graph.input if i.name in used]
    graph_inputs += [value(o, ["batch", "seq", None]) for n in splits for o in n.output if o in used]
    block = helper.make_model(
        helper.make_graph(
            nodes,
            "attention_block",
            graph_inputs,
            [value(o, None) for o in o_inputs],
            [inits[i] for i in sorted(used) if i in inits],
        ),
        opset_imports=model.opset_import,
    )
    block.ir_version = model.ir_version
    return block, splits, o_inputs


def gqa_block(model: onnx.ModelProto, splits, o_inputs, dims: Dims) -> onnx.ModelProto:
    """The same layers as one GroupQueryAttention each (causal; batch 1 needs no padding bias)."""
    inits = {i.name: i for i in model.graph.initializer}
    cos, sin = inits["attanchor_ort/rotary_cos_cache"], inits["attanchor_ort/rotary_sin_cache"]
    consts = [
        numpy_helper.from_array(np.array(1, np.int64), "one"),
        numpy_helper.from_array(np.array(1, np.int32), "one32"),
        numpy_helper.from_array(np.array([0], np.int64), "zero_1d"),
    ]
    nodes = [
        helper.make_node("Shape", ["attention_mask"], ["mask_shape"]),
        helper.make_node("Gather", ["mask_shape", "one"], ["total_64"], axis=0),
        helper.make_node("Cast", ["total_64"], ["total"], to=TensorProto.INT32),
        helper.make_node("Sub", ["total", "one32"], ["last"]),
        helper.make_node("Gather", ["mask_shape", "zero_1d"], ["batch"], axis=0),
        helper.make_node("Expand", ["last", "batch"], ["seqlens_k"]),
    ]
    inputs = [
        value("attention_mask", ["batch", "total"], TensorProto.INT64),
        value("position_ids", ["batch", "seq"], TensorProto.INT64),
    ]
    outputs = []
    for layer, (split, out) in enumerate(zip(splits, o_inputs)):
        past = [f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"]
        present = [f"present.{layer}.key", f"present.{layer}.value"]
        nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                [*split.output, *past, "seqlens_k", "total", cos.name, sin.name, "position_ids"],
                [out, *present],
                domain=MS,
                num_heads=dims.num_heads,
                kv_num_heads=dims.num_kv_heads,
                do_rotary=1,
                scale=float(dims.head_dim) ** -0.5,
            )
        )
        inputs += [value(o, ["batch", "seq", None]) for o in split.output]
        inputs += [value(p, ["batch", dims.num_kv_heads, "capacity", dims.head_dim]) for p in past]
        outputs += [value(out, None)] + [value(p, None) for p in present]
    gqa = helper.make_model(
        helper.make_graph(nodes, "gqa", inputs, outputs, [cos, sin, *consts]),
        opset_imports=model.opset_import,
    )
    gqa.ir_version = model.ir_version
    return gqa


def core_form(
    form: str, layers: int, kv_heads: int, group: int, head_dim: int, capacity: int
) -> onnx.ModelProto:
    nodes = []
    inputs = [
        value("q", [1, kv_heads, group, head_dim]),
        value("bias_row", [1, 1, 1, capacity]),
        value("bias_col", [1, 1, capacity, 1]),
    ]
    outputs = []
    for layer in range(layers):
        k, v, out, p = f"k{layer}", f"v{layer}", f"out{layer}", f"l{layer}/"
        inputs += [value(k, [1, kv_heads, capacity, head_dim]), value(v, [1, kv_heads, capacity, head_dim])]
        if form == "V1":
            nodes += [
                helper.make_node("FusedMatMul", ["q", k], [p + "s"], domain=MS, transB=1),
                helper.make_node("Add", [p + "s", "bias_row"], [p + "sb"]),
                helper.make_node("Softmax", [p + "sb"], [p + "p"], axis=-1),
                helper.make_node("MatMul", [p + "p", v], [out]),
            ]
        else:
            nodes += [
                helper.make_node("Transpose", ["q"], [p + "qt"], perm=[0, 1, 3, 2]),
                helper.make_node("MatMul", [k, p + "qt"], [p + "s"]),
                helper.make_node("Add", [p + "s", "bias_col"], [p + "sb"]),
            ]
            if form == "V2":
                nodes += [
                    helper.make_node("Softmax", [p + "sb"], [p + "p"], axis=2),
                    helper.make_node("FusedMatMul", [p + "p", v], [out], domain=MS, transA=1),
                ]
            elif form == "V3":
                nodes += [
                    helper.make_node("Softmax", [p + "sb"], [p + "p"], axis=2),
                    helper.make_node("FusedMatMul", [v, p + "p"], [p + "ot"], domain=MS, transA=1),
                    helper.make_node("Transpose", [p + "ot"], [out], perm=[0, 1, 3, 2]),
                ]
            else:  # V4
                nodes += [
                    helper.make_node("Transpose", [p + "sb"], [p + "st"], perm=[0, 1, 3, 2]),
                    helper.make_node("Softmax", [p + "st"], [p + "p"], axis=-1),
                    helper.make_node("MatMul", [p + "p", v], [out]),
                ]
        outputs.append(value(out, None))
    model = helper.make_model(
        helper.make_graph(nodes, form, inputs, outputs),
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS, 1)],
    )
    model.ir_version = 9
    return model


def interleaved(runs: dict, rounds: int, calls: int) -> dict:
    """Median ms per call of each runner, rounds interleaved so a swing hits every runner alike."""
    for run in runs.values():
        run()
        run()
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(calls):
                run()
            times[name].append((time.perf_counter() - start) / calls * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def measure_block(block, gqa, splits, dims: Dims, positions: int, rounds: int, threads: int) -> dict:
    capacity = positions + 32  # the runtime's KVBuffer grows 32 positions at a time
    rng = np.random.default_rng(0)
    a = ort.InferenceSession(block.SerializeToString(), options(threads), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(gqa.SerializeToString(), options(threads), providers=["CPUExecutionProvider"])
    shape = (1, dims.num_kv_heads, capacity, dims.head_dim)
    buffers = {
        f"past_key_values.{i}.{kv}": rng.standard_normal(shape).astype(np.float32)
        for i in range(len(splits))
        for kv in ("key", "value")
    }
    feeds = {
        "attention_mask": np.ones((1, positions + 1), np.int64),
        "position_ids": np.array([[positions]], np.int64),
        "inputs_embeds": np.zeros((1, 1, dims.hidden_size), np.float32),
    }
    for split in splits:
        q, k, v = split.output
        width = {q: dims.num_heads, k: dims.num_kv_heads, v: dims.num_kv_heads}
        for name in (q, k, v):
            feeds[name] = rng.standard_normal((1, 1, width[name] * dims.head_dim)).astype(np.float32)
    feeds_a = {i.name: feeds.get(i.name, buffers.get(i.name)) for i in a.get_inputs()}
    out_a = a.run(None, feeds_a)
    binding = b.io_binding()
    values = {}
    for i in b.get_inputs():
        if i.name in buffers:
            values[i.name] = ort.OrtValue.ortvalue_from_numpy(buffers[i.name].copy())
            binding.bind_ortvalue_input(i.name, values[i.name])
        else:
            binding.bind_cpu_input(i.name, feeds[i.name])
    for o in b.get_outputs():
        if o.name.startswith("present."):
            layer, kv = o.name.split(".")[1:]
            binding.bind_ortvalue_output(o.name, values[f"past_key_values.{layer}.{kv}"])
        else:
            binding.bind_output(o.name, "cpu")
    b.run_with_iobinding(binding)
    out_b = [binding.get_outputs()[i].numpy() for i in range(0, len(b.get_outputs()), 3)]
    diff = max(float(np.abs(x - y).max()) for x, y in zip(out_a, out_b))
    for name, buffer in buffers.items():  # the bound runs wrote this position: restore the buffers
        values[name].update_inplace(buffer)
    result = interleaved(
        {"block": lambda: a.run(None, feeds_a), "gqa": lambda: b.run_with_iobinding(binding)}, rounds, 30
    )
    return {**result, "max_diff": diff}


def measure_core(dims: Dims, positions: int, rounds: int, threads: int) -> dict:
    capacity, kv_heads = positions + 32, dims.num_kv_heads
    group = dims.num_heads // kv_heads
    rng = np.random.default_rng(0)
    feeds = {"q": rng.standard_normal((1, kv_heads, group, dims.head_dim)).astype(np.float32) * 0.1}
    bias = np.zeros(capacity, np.float32)
    bias[positions + 1 :] = np.finfo(np.float32).min  # the buffer's unused slots, masked
    feeds["bias_row"], feeds["bias_col"] = bias.reshape(1, 1, 1, -1), bias.reshape(1, 1, -1, 1)
    for layer in range(dims.num_layers):
        for kv in ("k", "v"):
            feeds[f"{kv}{layer}"] = rng.standard_normal((1, kv_heads, capacity, dims.head_dim)).astype(
                np.float32
            )
    sessions = {
        form: ort.InferenceSession(
            core_form(form, dims.num_layers, kv_heads, group, dims.head_dim, capacity).SerializeToString(),
            options(threads),
            providers=["CPUExecutionProvider"],
        )
        for form in ("V1", "V2", "V3", "V4")
    }
    fed = {f: {i.name: feeds[i.name] for i in s.get_inputs()} for f, s in sessions.items()}
    reference = sessions["V1"].run(None, fed["V1"])
    for form, session in sessions.items():
        out = session.run(None, fed[form])
        assert max(float(np.abs(x - y).max()) for x, y in zip(reference, out)) < 1e-4, form
    return interleaved({f: (lambda s=s, f=f: s.run(None, fed[f])) for f, s in sessions.items()}, rounds, 30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--positions", default="128,512,1536")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    dims = Manifest.load(args.folder).dims
    model = onnx.load(str(args.folder / "decoder.onnx"), load_external_data=False)
    block, splits, o_inputs = attention_block(model)
    gqa = gqa_block(model, splits, o_inputs, dims)
    print(
        f"{len(splits)} layers; the block has {len(block.graph.node)} nodes, GroupQueryAttention {len(gqa.graph.node)}"
    )
    print(
        "| positions | block ms | GroupQueryAttention ms | block / GQA | max diff | V1 (decoder's) ms | V2 ms | V3 ms | V4 ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for positions in (int(p) for p in args.positions.split(",")):
        b = measure_block(block, gqa, splits, dims, positions, args.rounds, args.threads)
        c = measure_core(dims, positions, args.rounds, args.threads)
        print(
            f"| {positions} | {b['block']:.2f} | {b['gqa']:.2f} | {b['block'] / b['gqa']:.2f}x | {b['max_diff']:.1e} | "
            f"{c['V1']:.2f} | {c['V2']:.2f} | {c['V3']:.2f} | {c['V4']:.2f} |"
        )


if __name__ == "__main__":
    main()
