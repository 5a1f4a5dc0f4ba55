"""scripts/bench_peers.py (attanchor_export/bench_peers/) without its peers: parsing child lines, the summary's
figures, the table, the JSON, and the project's own runner on conftest's tiny artifact through the child
protocol."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import numpy as np
import pytest
from helpers import SCRIPTS

from attanchor_export.bench_peers import build as build_step
from attanchor_export.bench_peers.cli import main, write_json
from attanchor_export.bench_peers.common import BenchError, parse_child_output
from attanchor_export.bench_peers.rounds import round_order, run_child, run_record
from attanchor_export.bench_peers.stats import summarize
from attanchor_export.bench_peers.systems import BASELINE, BY_NAME, REFERENCE
from attanchor_export.bench_peers.table import format_table
from attanchor_export.bench_peers.weight_bytes import onnx_weight_bytes, safetensors_weight_bytes

SCRIPT = SCRIPTS / "bench_peers.py"


def _line(system: str, prefill: float, tok_s: float, tokens=(5, 6, 7), hwm: int = 2_000_000_000) -> str:
    return json.dumps({"bench_peers": 1, "task": system.split("-")[0], "prefill_s": prefill, "decode_tok_s": tok_s,
                       "decode_s": 64 / tok_s, "tokens": list(tokens), "load_s": 0.5, "vm_hwm_bytes": hwm})


# Per round: (project-int4, project-fp32, llama-q4_0) decode tok/s, chosen so that the median of the
# same-round ratios (llama/int4: 1.5, 1.0, 2.0 -> 1.5) differs from the ratio of the medians (40/30).
INT4 = [20.0, 30.0, 40.0]
FP32 = [9.0, 8.0, 10.0]
Q4 = [30.0, 30.0, 80.0]
BANDWIDTH = [30e9, 40e9, 35e9]
BUILDS = {
    "project-int4": {"weight_bytes_per_token": 800_000_000, "file_bytes": 1_100_000_000},
    "project-fp32": {"weight_bytes_per_token": 4_100_000_000, "file_bytes": 4_500_000_000},
    "llama-q4_0": {"weight_bytes_per_token": 600_000_000, "file_bytes": 640_000_000},
    "transformers-fp32": {"weight_bytes_per_token": 4_100_000_000, "file_bytes": 4_400_000_000},
}


def _runs(tmp_path, fp32_tokens=(5, 6, 7)):
    runs = []
    for r in range(3):
        log = tmp_path / f"r{r}.log"
        noisy = "llama_model_loader: some library chatter\n{not json}\n{\"other\": 1}\n"
        runs.append(run_record("project-int4", r + 1, 0, noisy + _line("project-int4", 3.0 + r, INT4[r]) + "\n",
                               3_000_000_000, 10.0, log))
        runs.append(run_record("project-fp32", r + 1, 0, _line("project-fp32", 5.0, FP32[r]), 0, 10.0, log))
        runs.append(run_record("llama-q4_0", r + 1, 0, _line("llama-q4_0", 4.0, Q4[r], tokens=(5, 9, 9)),
                               0, 10.0, log))
        runs.append(run_record("transformers-fp32", r + 1, 0,
                               _line("transformers-fp32", 6.0, 4.0, tokens=fp32_tokens), 0, 10.0, log))
        bw = json.dumps({"bench_peers": 1, "task": "bandwidth", "bytes_per_s": BANDWIDTH[r], "method": "dot"})
        runs.append(run_record("bandwidth", r + 1, 0, bw, 0, 1.0, log))
    # a failed run: a crash with a traceback on stdout and no result line
    runs.append(run_record("llama-q4_0", 4, 1, "Traceback (most recent call last):\n", 0, 2.0,
                           tmp_path / "failed.log"))
    return runs


def test_parse_child_output_takes_the_marked_line():
    out = "loading...\n" + _line("project-int4", 1.0, 2.0) + "\n{\"bench_peers\": 2}\nbye\n"
    assert parse_child_output(out)["decode_tok_s"] == 2.0
    assert parse_child_output("no result\n{broken\n") is None
    assert parse_child_output('{"prefill_s": 1}') is None  # JSON, but not a result line


def test_run_record_failed_and_rss(tmp_path):
    ok = run_record("project-int4", 1, 0, _line("project-int4", 1.0, 2.0, hwm=123), 999, 1.0, tmp_path / "a")
    assert ok["ok"] and ok["peak_rss_bytes"] == 123 and "bench_peers" not in ok
    crashed = run_record("genai-int4", 1, 0, "segfault-ish garbage", 999, 1.0, tmp_path / "b")
    assert not crashed["ok"]
    nonzero = run_record("genai-int4", 1, 3, _line("genai-int4", 1.0, 2.0), 999, 1.0, tmp_path / "c")
    assert not nonzero["ok"] and nonzero["returncode"] == 3  # a result line does not rescue a failed exit


def test_summary_figures(tmp_path):
    s = summarize(_runs(tmp_path), BUILDS)
    int4, q4, fp32 = (s["systems"][n] for n in ("project-int4", "llama-q4_0", "project-fp32"))
    assert int4["prefill_s"] == {"min": 3.0, "median": 4.0, "max": 5.0, "n": 3}
    assert q4["decode_tok_s"] == {"min": 30.0, "median": 30.0, "max": 80.0, "n": 3}
    assert q4["runs"] == 3 and q4["failed"] == 1 and q4["failed_logs"] == [str(tmp_path / "failed.log")]
    assert q4["decode_ratio_to_baseline"] == pytest.approx(1.5)  # median of 1.5, 1.0, 2.0 (not 30 / 30)
    assert int4["decode_ratio_to_baseline"] == pytest.approx(1.0)
    assert fp32["decode_ratio_to_baseline"] == pytest.approx(statistics.median([9 / 20, 8 / 30, 10 / 40]))
    assert s["bandwidth"]["median"] == 35e9 and s["bandwidth"]["max"] == 40e9
    # fraction of the bound: median tok/s * bytes per token / median bandwidth
    assert int4["fraction_of_bound"] == pytest.approx(30.0 * 800e6 / 35e9)
    assert fp32["fraction_of_bound"] == pytest.approx(9.0 * 4.1e9 / 35e9)
    assert int4["peak_rss_bytes"] == 2_000_000_000  # the child's VmHWM, not the fork-inflated ru_maxrss
    assert s["fp32_systems"] == ["project-fp32", "transformers-fp32"] and s["fp32_tokens_agree"] is True
    assert q4["agree_with_reference"] == 1 and fp32["agree_with_reference"] == 3


def test_fp32_disagreement_is_reported(tmp_path):
    s = summarize(_runs(tmp_path, fp32_tokens=(5, 6, 8)), BUILDS)
    assert s["fp32_tokens_agree"] is False
    assert s["systems"]["project-fp32"]["agree_with_reference"] == 2
    assert "fp32 greedy tokens: DISAGREE" in format_table(s)


def test_table_text(tmp_path):
    s = summarize(_runs(tmp_path), BUILDS)
    table = format_table(s, prompt_len=512)
    lines = table.splitlines()
    assert lines[0].startswith("| system | prefill 512 tok (s) | decode tok/s | decode vs project-int4 |")
    q4 = next(line for line in lines if line.startswith("| llama.cpp Q4_0 |"))
    assert q4 == ("| llama.cpp Q4_0 | 4.00 / 4.00 / 4.00 | 30.0 / 30.0 / 80.0 | 1.50x | 600 MB | 51% | 2.0 GB | "
                  "640 MB | 3 (1 failed) |")
    int4 = next(line for line in lines if line.startswith("| this project int4"))
    assert "| 3.00 / 4.00 / 5.00 | 20.0 / 30.0 / 40.0 | 1.00x | 800 MB | 69% |" in int4
    assert "memory read bandwidth: median 35.0 GB/s, max 40.0 GB/s, min 30.0 GB/s (3 probes" in table
    assert "fp32 greedy tokens: all agree across project-fp32, transformers-fp32" in table
    assert f"llama-q4_0: 1 failed run(s), first log: {tmp_path / 'failed.log'}" in table


def test_json_output_round_trips(tmp_path):
    runs = _runs(tmp_path)
    s = summarize(runs, BUILDS)
    result = {"settings": {"rounds": 3}, "summary": s, "builds": BUILDS, "runs": runs, "table": format_table(s)}
    write_json(tmp_path / "out" / "peers.json", result)
    back = json.loads((tmp_path / "out" / "peers.json").read_text())
    assert back["summary"]["systems"]["llama-q4_0"]["decode_ratio_to_baseline"] == pytest.approx(1.5)
    assert back["summary"]["bandwidth"]["median"] == 35e9
    assert len(back["runs"]) == 16 and sum(not r["ok"] for r in back["runs"]) == 1


def test_round_order_and_systems():
    names = [f"s{i}" for i in range(8)]
    orders = [round_order(names, r) for r in range(6)]
    assert all(sorted(o) == names for o in orders)
    assert orders == [round_order(names, r) for r in range(6)]  # seeded: a rerun measures the same order
    # every system gets other neighbours from round to round (a rotation would keep them)
    followers = {tuple(o[o.index("s1") + 1:o.index("s1") + 2]) for o in orders}
    assert len(followers) > 2
    assert BASELINE in BY_NAME and REFERENCE in BY_NAME
    with pytest.raises(BenchError, match="unknown system"):
        main(["--systems", "project-int4,nope"])


def test_derived_systems_are_built_from_their_source_once(tmp_path, monkeypatch):
    """build() builds a system's source first (llama-f32 for llama-q4_0), hands the builder its build.json,
    and afterwards answers both from the cache without building again."""
    calls = []

    def fake_builder(system, out, cache, ckpt, source):
        calls.append((system.name, source))
        (out / "weights.bin").write_bytes(b"x" * (10 if source is None else 3))
        return {"model": str(out / "weights.bin"), "weight_bytes_per_token": 1}

    monkeypatch.setitem(build_step.BUILDERS, "llama", fake_builder)
    info = build_step.build(BY_NAME["llama-q4_0"], tmp_path, tmp_path / "ckpt", "small", 0)
    f32 = build_step.model_dir(tmp_path, "small", 0, "llama-f32")
    assert [name for name, _ in calls] == ["llama-f32", "llama-q4_0"]
    assert calls[0][1] is None and calls[1][1]["model"] == str(f32 / "weights.bin")
    assert calls[1][1] == json.loads((f32 / "build.json").read_text())
    q4 = build_step.model_dir(tmp_path, "small", 0, "llama-q4_0")
    assert info["model"] == str(q4 / "weights.bin") and info["file_bytes"] == 3  # staging paths renamed
    assert not q4.with_name("llama-q4_0.partial").exists()
    assert build_step.build(BY_NAME["llama-q4_0"], tmp_path, tmp_path / "ckpt", "small", 0) == info
    assert len(calls) == 2


def test_entry_point_imports_with_the_standard_library_alone():
    """The peers venv, which has no attanchor_export installed, runs its children through the entry point: it
    and every module of the package it loads must import with the standard library alone (-S: no site)."""
    proc = subprocess.run([sys.executable, "-S", str(SCRIPT), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--systems" in proc.stdout and "llama-q4_k_m" in proc.stdout


def test_weight_bytes_skip_the_embedding(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.zeros((10, 4), np.float32), "embed")
    weight = numpy_helper.from_array(np.zeros((4, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["embed", "ids"], ["x"]), helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [table, weight])
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    assert onnx_weight_bytes(tmp_path / "m.onnx") == 4 * 3 * 4

    from safetensors.numpy import save_file

    save_file({"model.embed_tokens.weight": np.zeros((10, 4), np.float32), "lm_head.weight": np.zeros((10, 4), np.float16)},
              str(tmp_path / "model.safetensors"))
    assert safetensors_weight_bytes(tmp_path) == 10 * 4 * 2


def test_project_runner_end_to_end(artifact, tmp_path):
    """The project's runner in a fresh child on the tiny exported artifact: one result line whose tokens are
    the runtime's own greedy tokens."""
    from attanchor_runtime.decode import SequentialStep, generate
    from attanchor_runtime.manifest import Manifest
    from attanchor_runtime.ort_backend import OrtDecoder
    from attanchor_runtime.sessions import ort_session

    folder = artifact("clip-t2i")
    manifest = Manifest.load(folder)
    dims, table = manifest.dims, np.asarray(manifest.embed_table_memmap(), np.float32)
    np.save(tmp_path / "embed_tokens.npy", table)
    prompt = np.random.default_rng(0).integers(3, dims.vocab_size - 8, 24).tolist()
    spec = {"model": str(manifest.graph_path("decoder")), "embed": str(tmp_path / "embed_tokens.npy"),
            "dims": dims.to_json(),
            "prompt": prompt, "new_tokens": 6, "threads": 1, "warmup": 1}
    rc, stdout, rss, wall = run_child([sys.executable, str(SCRIPT), "--child", "project", "--spec",
                                       json.dumps(spec)], tmp_path / "child.log", 120, 1)
    run = run_record("project-fp32", 1, rc, stdout, rss, wall, tmp_path / "child.log")
    assert run["ok"], (tmp_path / "child.log").read_text()[-2000:]
    assert run["prefill_s"] > 0 and run["decode_tok_s"] > 0 and run["peak_rss_bytes"] > 10 << 20
    assert len(run["tokens"]) == 7

    decoder = OrtDecoder.of_session(ort_session(spec["model"], threads=1), dims.max_position_embeddings)
    ids = np.array([prompt], np.int64)
    step = SequentialStep.after_prefill(np.ones_like(ids), np.arange(len(prompt))[None])
    *_, generated = generate(decoder, step, table[ids], lambda t: table[t][:, None, :], 7)
    expected = generated.tokens[0].tolist()
    assert run["tokens"] == expected


def test_llama_cpp_build_leaves_out_amx_only_where_the_cpu_lists_it():
    import shlex

    from attanchor_export.bench_peers.venvs import default_cmake_args

    plain = default_cmake_args("flags\t: fpu avx2 avx512f avx512_vnni")
    assert plain == "-DGGML_NATIVE=ON"
    amx = shlex.split(default_cmake_args("flags\t: avx512f amx_bf16 amx_tile amx_int8"))
    assert amx[0] == "-DGGML_NATIVE=ON"
    # each flags option stays one argument after the shell-style split scikit-build-core applies
    assert "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" in amx
    assert "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" in amx


def test_block_256_system_is_the_default_build_with_256_blocks(artifact, tmp_path):
    """project-int4-b256 (what --block-size 256 exports) is project-int4's recipe with blocks of 256: the
    same MatMulNBits nodes, every one with block_size 256, recorded in the build's notes."""
    import shutil

    import onnx
    from attanchor_runtime.manifest import Manifest
    from onnx import helper

    from attanchor_export.bench_peers.build_project import build_project

    folder = artifact("clip-t2i")
    manifest = Manifest.load(folder)
    src = tmp_path / "fp32"
    src.mkdir()
    for f in folder.glob("decoder.onnx*"):
        shutil.copy(f, src / f.name)
    np.save(src / "embed_tokens.npy", np.asarray(manifest.embed_table_memmap(), np.float32))
    source = {"model": str(src / "decoder.onnx"), "dims": manifest.dims.to_json()}
    blocks, notes = {}, {}
    for name in ("project-int4", "project-int4-b256"):
        out = tmp_path / name
        out.mkdir()
        build = build_project(BY_NAME[name], out, tmp_path, tmp_path / "ckpt", source)
        graph = onnx.load(build["model"], load_external_data=False).graph
        nodes = [n for n in graph.node if n.op_type == "MatMulNBits"]
        blocks[name] = [{a.name: helper.get_attribute_value(a) for a in n.attribute}["block_size"] for n in nodes]
        notes[name] = build["notes"]["block_size"]
    assert len(blocks["project-int4"]) == len(blocks["project-int4-b256"]) > 0
    assert set(blocks["project-int4"]) == {128} and set(blocks["project-int4-b256"]) == {256}
    assert notes == {"project-int4": 128, "project-int4-b256": 256}
