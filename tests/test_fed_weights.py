"""FedWeightsSession: an fp16 graph on onnxruntime's CPU provider without an fp32 copy of its weights.

The provider has no fp16 MatMul and widens every fp16 initializer when a session opens (2x the fp16
bytes). Fed from the mapped data file as inputs, the weights are widened inside each run, one at a
time. These tests hold it to the ordinary session's outputs and measure both sessions' peak memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from attanchor_runtime.errors import ArtifactError
from attanchor_runtime.manifest import Manifest
from attanchor_runtime.ort_backend import empty_past
from attanchor_runtime.sessions import FedWeightsSession, ort_session
from onnx import TensorProto, helper, numpy_helper

WIDTH = 1024


def _chain(folder: Path, layers: int, width: int = WIDTH, head: int = 40) -> Path:
    """x (fp32) -> Cast fp16 -> `layers` fp16 MatMuls with Relu between -> Cast fp32 -> fp32 MatMul head."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16)]
    inits = []
    for i in range(layers):
        weight = rng.standard_normal((width, width), dtype=np.float32) / np.sqrt(width)
        inits.append(numpy_helper.from_array(weight.astype(np.float16), f"w{i}"))
        nodes += [helper.make_node("MatMul", ["h" if i == 0 else f"r{i - 1}", f"w{i}"], [f"m{i}"]),
                  helper.make_node("Relu", [f"m{i}"], [f"r{i}"])]
    inits.append(numpy_helper.from_array(rng.standard_normal((width, head)).astype(np.float32), "head"))
    nodes += [helper.make_node("Cast", [f"r{layers - 1}"], ["h32"], to=TensorProto.FLOAT),
              helper.make_node("MatMul", ["h32", "head"], ["y"])]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", head])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "chain.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="chain.onnx.data")
    return path


def test_fed_session_matches_the_ordinary_session(tmp_path):
    path = _chain(tmp_path, layers=3)
    x = np.random.default_rng(1).standard_normal((3, WIDTH)).astype(np.float32)
    expected = ort_session(path).run(["y"], {"x": x})[0]
    fed = FedWeightsSession(path)
    got = fed.run(["y"], {"x": x})[0]
    assert sorted(fed.weights) == ["w0", "w1", "w2"]  # the fp16 weights are fed; the fp32 head is not
    assert [i.name for i in fed.get_inputs()] == ["x"]
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


def test_fed_session_names_a_missing_data_file(tmp_path):
    path = _chain(tmp_path, layers=1)
    (tmp_path / "chain.onnx.data").unlink()
    with pytest.raises(ArtifactError, match=r"chain\.onnx\.data is missing"):
        FedWeightsSession(path)


_MEASURE = """
import json, sys
from attanchor_runtime.sessions import FedWeightsSession, ort_session
import numpy as np
def rss(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
kind, path, width = sys.argv[1], sys.argv[2], int(sys.argv[3])
before = rss("VmRSS")
session = FedWeightsSession(path) if kind == "fed" else ort_session(path, memory_arena=False)
session.run(["y"], {"x": np.ones((1, width), np.float32)})
print(json.dumps({"growth": rss("VmHWM") - before}))
"""


def test_fed_session_holds_about_the_fp16_bytes_not_an_fp32_copy(tmp_path):
    """Peak memory of opening and running each session (fresh interpreters), 8 fp16 weights of 32 MiB.
    Measured here (x the 256 MiB of fp16 weights): the ordinary session 2.4 (its fp32 copies, and the
    fp16 bytes while it reads them), the fed one 1.4 (the mapped fp16 pages the run touches, one
    widened weight, and onnxruntime's own ~30 MB)."""
    layers, width = 8, 4096
    path = _chain(tmp_path, layers=layers, width=width)
    fp16_bytes = layers * width * width * 2
    growth = {}
    for kind in ("ordinary", "fed"):
        run = subprocess.run([sys.executable, "-c", _MEASURE, kind, str(path), str(width)], capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        growth[kind] = json.loads(run.stdout.strip().splitlines()[-1])["growth"] / fp16_bytes
    assert growth["ordinary"] > 2.0, growth
    assert growth["fed"] < 1.6, growth


def _widened_alive_peak(session: FedWeightsSession, optimized: Path, feeds: dict) -> tuple[int, int]:
    """Run once with onnxruntime's profiler and replay its node order on the session's optimized graph:
    the most widened (fp32) weights alive at one time, and how many there are."""
    session.run(None, feeds)
    events = json.loads(Path(session.session.end_profiling()).read_text())
    order = [e["name"][: -len("_kernel_time")] for e in events
             if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    graph = onnx.load(str(optimized), load_external_data=False).graph
    widened = {out for node in graph.node if set(node.input) & set(session.weights) for out in node.output}
    readers: dict = {}
    for node in graph.node:
        for name in set(node.input) & widened:
            readers.setdefault(name, set()).add(node.name)
    outputs = {node.name: node.output for node in graph.node}
    done, alive, peak = set(), set(), 0
    for name in order:
        done.add(name)
        alive = {t for t in alive | (set(outputs.get(name, ())) & set(readers)) if not readers[t] <= done}
        peak = max(peak, len(alive))
    return peak, len(readers)


def test_fed_decoder_widens_one_weight_at_a_time(checkpoint, tmp_path, monkeypatch):
    """A real fp16 decoder: each weight's fp32 copy dies before the next one is made. With onnxruntime's
    graph optimizations on, the casts of a 7B decoder all ran first (OOM in its gate at 24 GB); on this
    tiny decoder that showed as 11 of 14 widened weights alive at once."""
    import attanchor_runtime.sessions as sessions

    from attanchor_export.exporter import ExportOptions, export_artifact

    export_artifact(str(checkpoint("clip-llama")), ExportOptions(output=tmp_path / "art", dtype="fp16"))
    optimized = tmp_path / "optimized.onnx"
    real = sessions._options

    def profiled(threads, memory_arena, profile=None):
        options = real(threads, memory_arena, profile=str(tmp_path / "profile"))
        options.optimized_model_filepath = str(optimized)
        return options

    monkeypatch.setattr(sessions, "_options", profiled)
    session = FedWeightsSession(tmp_path / "art" / "decoder.onnx", threads=1)
    manifest = Manifest.load(tmp_path / "art")
    dims, spec = manifest.dims, manifest.graphs.decoder
    embeds = np.random.default_rng(0).standard_normal((1, 5, dims.hidden_size), dtype=np.float32)
    feeds = {"inputs_embeds": embeds, "attention_mask": np.ones((1, 5), np.int64), "position_ids": np.arange(5)[None],
             **empty_past(spec.past_names, 1, dims.num_kv_heads, dims.head_dim)}
    peak, widened = _widened_alive_peak(session, optimized, feeds)
    assert widened >= 8, widened  # the decoder's fp16 weights were found and widened in the run
    assert peak <= 2, f"{peak} of {widened} widened weights alive at once"
