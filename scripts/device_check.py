"""The TensorRT backend's CUDA half, for real, on a GPU without TensorRT: run by scripts/device_check.sh.

No TensorRT can be installed where this runs, but CUDA and NVIDIA's cuda-bindings can. So everything
attanchor_runtime.trt_backend does with device memory runs for real here: cudaMalloc'd buffers (input
staging, outputs, the KV cache's two sides per layer), async host-to-device and device-to-host copies on
one stream, the 2-D copy that fetches only the last position's logits, the memset of the masked slot,
the KV ping-pong between the sides, and the stream synchronisation before results are read. Only the
engines are fake: a toy model in numpy whose "execute_async_v3" synchronises the stream, copies its
inputs device -> host, computes, and copies its outputs host -> device into the buffers the backend
bound. The same toy model runs on host arrays as the reference, and both go through the runtime's one
decode loop (decode.decoder_calls) on the same feeds: every cached key, image feature and embedding
must agree exactly and every logit to 1e-5 (no arithmetic runs on the device; the masked slot only adds
a zero to a float64 sum; a wrong pointer, side, offset, length or missing sync shows up as a mismatch).

Imports only numpy, cuda-bindings and three torch-free runtime modules (not attanchor_runtime's package
__init__, which needs the runtime's full dependency set). `--dry-run` swaps the GPU for host memory
(a test runs it in CI, so the script itself stays correct where no GPU is lent).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# attanchor_runtime as a bare namespace: its modules load one by one, without the package's __init__.
_package = types.ModuleType("attanchor_runtime")
_package.__path__ = [str(ROOT / "runtime" / "attanchor_runtime")]
sys.modules.setdefault("attanchor_runtime", _package)

from attanchor_runtime.decode import SequentialStep, decoder_calls  # noqa: E402
from attanchor_runtime.manifest import Manifest  # noqa: E402
from attanchor_runtime.trt_backend import KVCache, TrtBackend  # noqa: E402

cupy = None  # imported in main() where a GPU is checked: an independent reader of the device buffers
FAKE_TRT_VERSION = "0.0.0-device-check"
BATCH, TEXT, IMAGE, IMAGE_TOKENS, HIDDEN, HEADS, HEAD_DIM, LAYERS, VOCAB = 2, 6, 8, 4, 16, 2, 4, 2, 32
BUDGET = 3  # static anchor budget: the embedding engine's output length is T - 1 + M + K
MAX_SEQ, MAX_INPUT, STEPS = 64, 24, 12


# ---- the toy model: numpy, one set of weights, used by the fake engines and by the host reference ------
class Toy:
    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.vision_w = (rng.standard_normal((3 * IMAGE * IMAGE, IMAGE_TOKENS * HIDDEN)) * 0.05).astype(np.float32)
        self.table = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
        self.kv_w = [(rng.standard_normal((HIDDEN, HEADS * HEAD_DIM)) * 0.3).astype(np.float32)
                     for _ in range(2 * LAYERS)]
        self.out_w = (rng.standard_normal((HIDDEN + HEADS * HEAD_DIM, VOCAB)) * 0.3).astype(np.float32)

    def vision(self, pixels):
        flat = pixels.reshape(len(pixels), -1)
        return np.tanh(flat @ self.vision_w).reshape(len(pixels), IMAGE_TOKENS, HIDDEN).astype(np.float32)

    def embed(self, ids, mask, features, threshold):
        """A budgeted embedding graph's outputs: text rows (image slot dropped), image rows, K zero rows."""
        batch, width = ids.shape
        length = width - 1 + IMAGE_TOKENS + BUDGET
        embeds = np.zeros((batch, length, HIDDEN), np.float32)
        embeds[:, : width - 1] = self.table[ids[:, 1:]] * float(threshold)
        embeds[:, width - 1 : width - 1 + IMAGE_TOKENS] = features
        out_mask = np.concatenate([mask[:, 1:], np.ones((batch, IMAGE_TOKENS + BUDGET), np.int64)], axis=1)
        positions = np.where(out_mask == 1, np.cumsum(out_mask, axis=1) - 1, 1).astype(np.int64)
        return embeds, out_mask, positions, np.tile(np.arange(length, dtype=np.int64), (batch, 1))

    def decode(self, embeds, mask, positions, past):
        """present = past + the new positions' keys (a function of embeddings and positions); logits read
        the whole masked cache, so a key out of place anywhere changes them."""
        batch, seq, _ = embeds.shape
        present = []
        for i, w in enumerate(self.kv_w):
            new = (embeds @ w + positions[..., None] * 0.01 * (i + 1)).astype(np.float32)
            new = new.reshape(batch, seq, HEADS, HEAD_DIM).transpose(0, 2, 1, 3)
            present.append(np.concatenate([past[i], new], axis=2))
        weights = mask[:, None, :, None].astype(np.float64)  # float64: the sum is exact to float32 either way
        context = sum((p * weights).sum(axis=2) for p in present).astype(np.float32).reshape(batch, 1, -1)
        context = np.broadcast_to(context, (batch, seq, HEADS * HEAD_DIM))
        logits = np.concatenate([embeds, context], axis=-1) @ self.out_w
        return logits.astype(np.float32), present


class HostDecoder:
    """The toy decoder on host arrays: the reference side of every comparison (decode.Decoder)."""

    def __init__(self, toy: Toy):
        self.toy = toy

    def empty_cache(self, batch):
        return [np.zeros((batch, HEADS, 0, HEAD_DIM), np.float32)] * (2 * LAYERS)

    def copy_cache(self, cache):
        return list(cache)

    def decode(self, embeds, mask, positions, cache):
        return self.toy.decode(embeds, mask, positions, cache)


# ---- a fake tensorrt module whose engines run the toy model on the device buffers --------------------
def fake_tensorrt(cuda, toy: Toy, masked_slot: bool):
    """Just the part of the tensorrt module TrtBackend uses (the build is not under test here)."""
    trt = types.SimpleNamespace(__version__=FAKE_TRT_VERSION)
    trt.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")
    trt.nptype = lambda dtype: dtype
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=2: None})
    kv = [f"{p}.{i}.{k}" for p in ("past_key_values", "present") for i in range(LAYERS) for k in ("key", "value")]
    past, present = kv[: 2 * LAYERS], kv[2 * LAYERS :]
    f32, i64 = np.dtype(np.float32), np.dtype(np.int64)
    io = {  # graph -> ({input: (dtype, shape)}, {output: dtype})
        "vision": ({"pixel_values": (f32, (-1, 3, IMAGE, IMAGE))}, {"image_features": f32}),
        "embedding": ({"input_ids": (i64, (-1, -1)), "text_attention_mask": (i64, (-1, -1)),
                       "image_features": (f32, (-1, IMAGE_TOKENS, HIDDEN)), "threshold": (f32, ())},
                      {"inputs_embeds": f32, "attention_mask": i64, "position_ids": i64, "gather_index": i64}),
        "decoder": ({"inputs_embeds": (f32, (-1, -1, HIDDEN)), "attention_mask": (i64, (-1, -1)),
                     "position_ids": (i64, (-1, -1)), **{n: (f32, (-1, HEADS, -1, HEAD_DIM)) for n in past}},
                    {"logits": f32, **dict.fromkeys(present, f32)}),
    }

    def compute(graph, x):
        if graph == "vision":
            return {"image_features": toy.vision(x["pixel_values"])}
        if graph == "embedding":
            outputs = toy.embed(x["input_ids"], x["text_attention_mask"], x["image_features"], x["threshold"])
            return dict(zip(io[graph][1], outputs))
        logits, cache = toy.decode(x["inputs_embeds"], x["attention_mask"], x["position_ids"], [x[n] for n in past])
        return {"logits": logits, **dict(zip(present, cache))}

    def output_shapes(graph, shapes):
        if graph == "vision":
            return {"image_features": (shapes["pixel_values"][0], IMAGE_TOKENS, HIDDEN)}
        if graph == "embedding":
            b, t = shapes["input_ids"]
            length = t - 1 + IMAGE_TOKENS + BUDGET
            return {"inputs_embeds": (b, length, HIDDEN), **{n: (b, length) for n in io[graph][1] if n !=
                                                             "inputs_embeds"}}
        b, s, _ = shapes["inputs_embeds"]
        total = shapes["attention_mask"][1]
        return {"logits": (b, s, VOCAB), **dict.fromkeys(present, (b, HEADS, total, HEAD_DIM))}

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addr = engine, {}, {}

        def set_optimization_profile_async(self, index, stream):
            return True

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr
            return True

        def get_tensor_shape(self, name):
            inputs, _ = io[self.engine.graph]
            if name in inputs:
                return self.shapes.get(name, inputs[name][1])
            return output_shapes(self.engine.graph, {n: self.shapes.get(n, s) for n, (_, s) in inputs.items()})[name]

        def execute_async_v3(self, stream):
            assert int(stream) == cuda.stream, "the backend's one stream"
            inputs, outputs = io[self.engine.graph]
            cuda.synchronize()  # the backend's host-to-device copies are queued on the stream
            x = {}
            for name, (dtype, declared) in inputs.items():
                x[name] = np.zeros(self.shapes.get(name, declared), dtype)
                cuda.dtoh(x[name], self.addr[name])
            cuda.synchronize()
            for name, value in compute(self.engine.graph, x).items():
                value = np.ascontiguousarray(value, outputs[name])
                assert value.shape == tuple(self.get_tensor_shape(name)), (name, value.shape)
                cuda.htod(self.addr[name], value)
                cuda.synchronize()  # `value` is a temporary: the copy must be done before it goes
            self.engine.runs += 1
            return True

    class Engine:
        def __init__(self, data):
            self.graph, self.runs = json.loads(bytes(data))["graph"], 0
            inputs, outputs = io[self.graph]
            self.names = [*inputs, *outputs]
            self.num_io_tensors = len(self.names)
            self.num_optimization_profiles = 2 if self.graph == "decoder" else 1
            engines.append(self)

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name in io[self.graph][0] else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            inputs, outputs = io[self.graph]
            return inputs[name][0] if name in inputs else outputs[name]

        def get_tensor_shape(self, name):
            inputs, outputs = io[self.graph]
            if name in inputs:
                return inputs[name][1]
            return (-1,) * (2 if outputs[name] == i64 else (4 if name in present else 3))

        def create_execution_context(self, strategy=None):
            return Context(self)

    engines: list = []
    trt.Runtime = type("Runtime", (), {"__init__": lambda self, logger: None,
                                      "deserialize_cuda_engine": lambda self, data: Engine(data)})
    trt.engines = engines
    return trt


# ---- the artifact the backend opens: a manifest and an engine folder, no ONNX file --------------------
def write_artifact(folder: Path, toy: Toy, sm: str, masked_slot: bool) -> Path:
    slot = 1 if masked_slot else 0
    kv = lambda prefix: [f"{prefix}.{i}.{k}" for i in range(LAYERS) for k in ("key", "value")]  # noqa: E731
    spec = lambda name, dtype, shape: {"name": name, "dtype": dtype, "shape": shape}  # noqa: E731
    seq = f"text_len - 1 + {IMAGE_TOKENS} + {BUDGET}"
    manifest = {
        "format": "attanchor-artifact", "format_version": 2, "source": {},
        "family": {"name": "llava", "architecture": "LlavaForConditionalGeneration",
                   "model_types": {"vision": "toy", "text": "toy"}},
        "dims": {"hidden_size": HIDDEN, "num_layers": LAYERS, "num_heads": HEADS, "num_kv_heads": HEADS,
                 "head_dim": HEAD_DIM, "vocab_size": VOCAB, "image_tokens": IMAGE_TOKENS, "image_size": IMAGE,
                 "patch_size": 4, "vision_hidden_size": 8, "max_position_embeddings": MAX_SEQ},
        "anchor": {"mode": "t2i", "threshold": 0.5, "max_anchors": BUDGET},
        "text": {"image_token_id": VOCAB - 1, "pad_token_id": 0},
        "graphs": {
            "vision": {"file": "vision.onnx", "inputs": [spec("pixel_values", "float32", ["batch", 3, IMAGE, IMAGE])],
                       "outputs": [spec("image_features", "float32", ["batch", IMAGE_TOKENS, HIDDEN])]},
            "embedding": {"file": "embedding.onnx",
                          "inputs": [spec("input_ids", "int64", ["batch", "text_len"]),
                                     spec("text_attention_mask", "int64", ["batch", "text_len"]),
                                     spec("image_features", "float32", ["batch", IMAGE_TOKENS, HIDDEN]),
                                     spec("threshold", "float32", [])],
                          "outputs": [spec(n, "float32" if n == "inputs_embeds" else "int64",
                                           ["batch", seq, HIDDEN] if n == "inputs_embeds" else ["batch", seq])
                                      for n in ("inputs_embeds", "attention_mask", "position_ids", "gather_index")]},
            "decoder": {"file": "decoder.onnx",
                        "inputs": [spec("inputs_embeds", "float32", ["batch", "seq_len", HIDDEN]),
                                   spec("attention_mask", "int64", ["batch", "total_len"]),
                                   spec("position_ids", "int64", ["batch", "seq_len"]),
                                   *(spec(n, "float32", ["batch", HEADS, "past_len", HEAD_DIM]) for n in kv("past_key_values"))],
                        "outputs": [spec("logits", "float32", ["batch", "seq_len", VOCAB]),
                                    *(spec(n, "float32", ["batch", HEADS, "total_len", HEAD_DIM]) for n in kv("present"))]},
        },
        "embed_table": {"file": "embed_tokens.bin", "dtype": "float32", "shape": [VOCAB, HIDDEN]},
        "onnx": {"opset": 18, "ir_version": 10},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    toy.table.tofile(folder / "embed_tokens.bin")

    def shapes(names_dims, dims):
        return {n: {k: [dims[d][i] if isinstance(d, str) else d for d in shape] for i, k in enumerate(("min", "opt", "max"))}
                for n, shape in names_dims}

    def profile(name, dims, names_dims):
        return {"name": name, "dims": dims, "shapes": shapes(names_dims, dims)}

    batch = [1, BATCH, BATCH]
    decoder_io = [("inputs_embeds", ["batch", "seq_len", HIDDEN]), ("attention_mask", ["batch", "total_len"]),
                  ("position_ids", ["batch", "seq_len"]), *((n, ["batch", HEADS, "past_len", HEAD_DIM]) for n in kv("past_key_values"))]
    prefill = {"batch": batch, "seq_len": [1, MAX_INPUT, MAX_INPUT], "past_len": [slot] * 3}
    decode = {"batch": batch, "seq_len": [1, 1, 1], "past_len": [1 + slot, 8, MAX_SEQ - 1 + slot]}
    for d in (prefill, decode):
        d["total_len"] = [p + s for p, s in zip(d["past_len"], d["seq_len"])]
    embed_dims = {"batch": batch, "text_len": [2, TEXT, MAX_INPUT]}
    records = {
        "vision": [profile("all", {"batch": batch}, [("pixel_values", ["batch", 3, IMAGE, IMAGE])])],
        "embedding": [profile("all", embed_dims, [("input_ids", ["batch", "text_len"]),
                                                  ("text_attention_mask", ["batch", "text_len"]),
                                                  ("image_features", ["batch", IMAGE_TOKENS, HIDDEN])])],
        "decoder": [profile("prefill", prefill, decoder_io), profile("decode", decode, decoder_io)],
    }
    engine_dir = folder / "engines" / f"device-check-sm{sm}"
    engine_dir.mkdir(parents=True)
    engines = {}
    for graph, profiles in records.items():
        (engine_dir / f"{graph}.plan").write_text(json.dumps({"graph": graph}))
        engines[graph] = {"backend": "tensorrt", "file": f"{graph}.plan", "onnx": f"{graph}.onnx", "sources": {},
                          "profiles": profiles, "precision": "fp32"}
    meta = {"format": "attanchor-engines", "format_version": 1, "tensorrt": FAKE_TRT_VERSION, "gpu": "device check",
            "sm": sm, "compute_capability": "", "gpu_memory_bytes": 0, "built_at": "", "build_seconds": 0.0,
            "plan": {"options": {"empty_past": "masked-slot" if masked_slot else "zero"}}, "engines": engines}
    (engine_dir / "engine.json").write_text(json.dumps(meta))
    return engine_dir


# ---- host memory standing in for the GPU (--dry-run) ---------------------------------------------------
class HostCuda:
    """cuda_util.Cuda's methods over host bytes, for a dry run of the script itself."""

    stream = 1

    def __init__(self):
        self.mem, self._next = {}, 1 << 20

    def device_info(self):
        from attanchor_runtime.cuda_util import DeviceInfo

        return DeviceInfo(0, "host memory (dry run)", 0, 0, 0)

    def malloc(self, nbytes):
        ptr, self._next = self._next, self._next + (max(int(nbytes), 1) // 256 + 2) * 256
        self.mem[ptr] = np.zeros(max(int(nbytes), 1), np.uint8)
        return ptr

    def free(self, ptr):
        del self.mem[ptr]

    def _view(self, ptr, nbytes):
        for base, buf in self.mem.items():
            if base <= ptr and ptr + nbytes <= base + len(buf):
                return buf[ptr - base : ptr - base + nbytes]
        raise AssertionError(f"out of bounds: {ptr:#x}+{nbytes}")

    def htod(self, dst, array):
        if array.nbytes:
            self._view(dst, array.nbytes)[:] = np.ascontiguousarray(array).reshape(-1).view(np.uint8)

    def dtoh(self, array, src):
        if array.nbytes:
            array.reshape(-1).view(np.uint8)[:] = self._view(src, array.nbytes)

    def dtoh_rows(self, array, src, src_pitch, row_bytes, rows):
        flat = array.reshape(-1).view(np.uint8)
        for r in range(rows):
            flat[r * row_bytes : (r + 1) * row_bytes] = self._view(src + r * src_pitch, row_bytes)

    def memset(self, dst, nbytes, value=0):
        if nbytes:
            self._view(dst, nbytes)[:] = value

    def synchronize(self):
        pass


class Poisoned:
    """Every new buffer filled with 0xFF bytes (float32 NaN, int64 -1) before the backend sees it: a byte the
    backend reads without having written it (a masked slot it did not zero, a length off by one) then
    turns a result into NaN instead of passing by luck on zeroed memory."""

    def __init__(self, cuda):
        self.cuda = cuda

    def __getattr__(self, name):
        return getattr(self.cuda, name)

    def malloc(self, nbytes):
        ptr = self.cuda.malloc(nbytes)
        self.cuda.memset(ptr, max(int(nbytes), 1), 0xFF)
        self.cuda.synchronize()
        return ptr


# ---- the checks -----------------------------------------------------------------------------------------
def equal(name, got, want, results, rtol: float = 0.0):
    got, want = np.asarray(got), np.asarray(want)
    ok = got.shape == want.shape and (np.array_equal(got, want) if not rtol else
                                      np.allclose(got, want, rtol=rtol, atol=rtol))
    detail = "" if ok else (f"shape {got.shape} != {want.shape}" if got.shape != want.shape else
                            f"max |diff| {np.abs(got.astype(np.float64) - want).max():.3g}")
    results.append((name, ok, detail))
    return ok


def cupy_view(cache: KVCache, index: int) -> np.ndarray:
    """The current side of past tensor `index`, read from the device through CuPy (a dense [B, H, t, D]
    tensor at the buffer's start, as the backend binds it), the masked slot dropped."""
    shape = cache.shape()
    nbytes = int(np.prod(shape)) * cache.dtype.itemsize
    memory = cupy.cuda.UnownedMemory(cache.ptr(index, cache.side), nbytes, owner=None)
    array = cupy.ndarray(shape, cache.dtype, cupy.cuda.MemoryPointer(memory, 0))
    return cupy.asnumpy(array)[:, :, cache.slot :]


def run_case(cuda, masked_slot: bool, results: list) -> None:
    """One empty-past mode: vision, embedding, then prefill + STEPS cached steps through the decode loop,
    last-position logits (2-D copy) and full logits, the cache read back, and an uploaded host cache."""
    mode = "masked-slot" if masked_slot else "zero"
    toy, rng = Toy(), np.random.default_rng(1)
    with tempfile.TemporaryDirectory(prefix="attanchor-device-check-") as tmp:
        folder = Path(tmp)
        sm = cuda.device_info().sm
        write_artifact(folder, toy, sm, masked_slot)
        manifest = Manifest.load(folder, verify="none")
        trt = fake_tensorrt(cuda, toy, masked_slot)
        for full_logits in (False, True):
            label = f"{mode}, {'all' if full_logits else 'last-position'} logits"
            backend = TrtBackend(manifest, trt=trt, cuda=cuda, full_logits=full_logits)
            pixels = rng.standard_normal((BATCH, 3, IMAGE, IMAGE)).astype(np.float32)
            features = backend.vision({"pixel_values": pixels})
            equal(f"{label}: vision image_features", features, toy.vision(pixels), results)
            ids = rng.integers(1, VOCAB - 1, (BATCH, TEXT))
            mask = np.ones_like(ids)
            mask[1, :2] = 0  # a left-padded row
            got = backend.embed({"input_ids": ids, "text_attention_mask": mask, "image_features": features,
                                 "threshold": np.asarray(0.5, np.float32)})
            want = toy.embed(ids, mask, features, np.float32(0.5))
            for name, value in zip(("inputs_embeds", "attention_mask", "position_ids", "gather_index"), want):
                equal(f"{label}: embedding {name}", got[name], value, results)
            embeds, amask, positions = (got[n] for n in ("inputs_embeds", "attention_mask", "position_ids"))
            steps = [toy.table[rng.integers(0, VOCAB, BATCH)][:, None, :] for _ in range(STEPS)]
            def next_embeds(call, steps=steps):
                return steps[call.index] if call.index < STEPS else None

            first = SequentialStep.after_prefill(amask, positions)
            host = HostDecoder(toy)
            for ours, ref in zip(decoder_calls(backend, first, embeds, next_embeds),
                                 decoder_calls(host, first, embeds, next_embeds)):
                want = ref.logits if full_logits else ref.logits[:, -1:]
                equal(f"{label}: decoder call {ours.index} logits", ours.logits, want, results, rtol=1e-5)
                last = (ours, ref)
            ours, ref = last
            assert isinstance(ours.cache, KVCache)
            cached = ours.cache.to_numpy()
            for i, (a, b) in enumerate(zip(cached, ref.cache)):
                equal(f"{label}: KV cache {i} after {STEPS} steps", a, b, results)
            if cupy is not None:  # the same device buffers read by another library: our copies are not the judge
                for i, b in enumerate(ref.cache):
                    equal(f"{label}: KV cache {i} read through CuPy", cupy_view(ours.cache, i), b, results)
            # A host cache (OrtBackend's form) uploaded into the device cache, then one more step.
            step = ref.step.advance()
            token = steps[0]
            got_logits, _ = backend.decode(token, step.attention_mask, step.position_ids, backend.copy_cache(ours.cache))
            want_logits, _ = host.decode(token, step.attention_mask, step.position_ids, ref.cache)
            equal(f"{label}: step on an uploaded cache", got_logits, want_logits if full_logits else want_logits[:, -1:],
                  results, rtol=1e-5)
            runs = {e.graph: e.runs for e in trt.engines}
            results.append((f"{label}: every engine ran (vision, embedding, decoder)",
                            min(runs.values()) > 0 and set(runs) == {"vision", "embedding", "decoder"}, str(runs)))
            backend.close()
            trt.engines.clear()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="host memory instead of a GPU (CI)")
    args = parser.parse_args(argv)
    global cupy
    started = time.perf_counter()
    if args.dry_run:
        cuda, where = Poisoned(HostCuda()), "host memory (dry run, no GPU)"
    else:
        from attanchor_runtime.cuda_util import Cuda, CudaUnavailable

        try:
            cuda = Cuda()
        except CudaUnavailable as e:
            if "not installed" in str(e):  # a GPU machine without the bindings the backend uses: not a skip
                print(f"FAIL: {e}")
                return 1
            print(f"SKIP: no CUDA GPU here ({e}); nothing was checked")
            return 0
        info = cuda.device_info()
        where = f"{info.name} (sm{info.sm}, {info.total_memory / (1 << 30):.0f} GiB), cuda-bindings"
        cuda = Poisoned(cuda)
        try:
            import cupy
        except ImportError:
            print("  (CuPy is not installed: the KV cache is read back through cuda-bindings only)")
    print(f"device check: TensorRT backend's CUDA half on {where}")
    results: list = []
    try:
        for masked_slot in (False, True):
            run_case(cuda, masked_slot, results)
    except Exception as e:  # noqa: BLE001 - a crash is a FAIL with its reason, not a traceback-only exit
        traceback.print_exc()
        results.append(("the run itself", False, f"{type(e).__name__}: {e}"))
    failed = [r for r in results if not r[1]]
    for name, _, detail in failed[:20]:
        print(f"  FAIL {name}{': ' + detail if detail else ''}")
    seconds = time.perf_counter() - started
    verdict = "PASS" if results and not failed else "FAIL"
    print(f"{verdict}: {len(results) - len(failed)} of {len(results)} checks passed in {seconds:.1f} s "
          f"(empty past zero and masked-slot; last-position and full logits; {STEPS} cached steps each)")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
