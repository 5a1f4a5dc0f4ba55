"""int8 vision tower on the CPU: static QDQ vs dynamic quantization vs fp32, by speed and by feature cosine.

    python scripts/measure_vision_int8.py ARTIFACT --calib easy-vqa   # an fp32 artifact's vision.onnx (tiny-vqa)
    python scripts/measure_vision_int8.py --clip-layers 4             # a random CLIP tower at TinyLLaVA-1B dims

Writes, in a temporary folder, the vision graph four ways: fp32 (as exported); int8 static QDQ
(quantize_static as the int8 decoder's TensorRT form, calibrated on images), with and without SmoothQuant
0.7; int8 dynamic (quantize_dynamic: weights int8, activations quantized per call at run time; what
`--vision-quant int8` gives onnxruntime). Then runs them in one process, alternating, `--rounds` times each
on `--threads` threads, and prints the median latency and the feature cosine against fp32 (mean and min
per image token) on images never calibrated on.
ARTIFACT: calibration = `--calib` (easy-vqa for tiny-vqa, as its export uses) through the artifact's own
preprocessing, check images = the gate's. CLIP: TinyLLaVA-1B's ViT-L/14-336 (tiny_random.tinyllava_1b_config:
576 tokens, width 1024) cut to `--clip-layers` of its 24 layers, random weights and pixels (latency per
layer; the cosine of a random tower says little).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent


class Feeds:
    """A CalibrationDataReader over a list of feed dicts."""

    def __init__(self, feeds):
        self.feeds = list(feeds)
        self._it = iter(self.feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self.feeds)


def artifact_feeds(folder: Path, calib: str | None):
    from attanchor_runtime.manifest import Manifest

    from attanchor_export.load.datasets import gate_samples, load_calibration_set
    from attanchor_export.precision.calibration import VisionCalibrationReader
    from attanchor_export.precision.gate import gate_pipeline

    manifest = Manifest.load(folder)
    pipe = gate_pipeline(manifest)
    cal = VisionCalibrationReader.from_samples(pipe, load_calibration_set(calib))
    check = VisionCalibrationReader.from_samples(pipe, gate_samples(16))
    return folder / manifest.graphs.vision.file, cal.feeds, check.feeds, f"calibration {calib or 'builtin'}"


def clip_graph(layers: int, out: Path):
    import torch
    from transformers import CLIPVisionModel

    from attanchor_export.load.tiny_random import tinyllava_1b_config

    config = tinyllava_1b_config().vision_config
    full, config.num_hidden_layers = config.num_hidden_layers, layers
    torch.manual_seed(0)
    model = CLIPVisionModel(config).eval()
    size = config.image_size
    pixels = torch.randn(1, 3, size, size)
    path = out / "clip.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (pixels,), str(path), input_names=["pixel_values"],
                          output_names=["last_hidden_state"], opset_version=18, dynamo=False)
    rng = np.random.default_rng(0)
    feeds = [{"pixel_values": rng.standard_normal((1, 3, size, size), dtype=np.float32)} for _ in range(8)]
    check = [{"pixel_values": rng.standard_normal((1, 3, size, size), dtype=np.float32)} for _ in range(4)]
    return path, feeds, check, f"random CLIP ViT-L/14-336, {layers} of {full} layers (TinyLLaVA-1B dims)"


def static(src: Path, dst: Path, names: list[str], feeds, alpha: float | None) -> None:
    """quantize_static QDQ as the int8 decoder's TensorRT form (precision.weights.int8_static_qdq), after
    SmoothQuant at `alpha` (None: none)."""
    from attanchor_export.options import ARTIFACT_IR_VERSION
    from attanchor_export.precision.graph_files import save_model
    from attanchor_export.precision.smoothing import smooth_file
    from attanchor_export.precision.weights import int8_static_qdq

    if alpha is not None:
        smoothed = dst.with_name(dst.stem + ".smoothed.onnx")
        smooth_file(src, smoothed, names, Feeds(feeds), alpha, ARTIFACT_IR_VERSION)
        src = smoothed
    save_model(int8_static_qdq(src, dst, names, Feeds(feeds), "MinMax"), dst)


def dynamic(src: Path, dst: Path, names: list[str]) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from attanchor_export.precision.weights import quiet_ort_quantization

    with quiet_ort_quantization():
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], nodes_to_quantize=names,
                         per_channel=True, weight_type=QuantType.QInt8, use_external_data_format=True,
                         extra_options={"MatMulConstBOnly": True})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", nargs="?", type=Path)
    ap.add_argument("--clip-layers", type=int)
    ap.add_argument("--calib", help="calibration set: easy-vqa (tiny-vqa's), a folder, JSONL [builtin]")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if (args.artifact is None) == (args.clip_layers is None):
        ap.error("give an ARTIFACT or --clip-layers N")
    import onnx_ir as ir

    from attanchor_export.precision.streamed_weights import linear_nodes

    with tempfile.TemporaryDirectory(prefix="vision-int8-") as tmp:
        tmp = Path(tmp)
        if args.artifact is not None:
            src, cal, check, what = artifact_feeds(args.artifact, args.calib)
        else:
            src, cal, check, what = clip_graph(args.clip_layers, tmp)
        names = [n.name for n in linear_nodes(ir.load(str(src)).graph, False, None)[0]]
        made, files = {}, {"fp32": src}
        for key, write in (("int8 static QDQ", lambda p: static(src, p, names, cal, None)),
                           ("int8 static QDQ sq0.7", lambda p: static(src, p, names, cal, 0.7)),
                           ("int8 dynamic", lambda p: dynamic(src, p, names))):
            files[key] = tmp / f"{len(files)}.onnx"
            t0 = time.perf_counter()
            write(files[key])
            made[key] = time.perf_counter() - t0
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
        sessions = {k: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for k, p in files.items()}
        out = {k: [s.run(None, f)[0] for f in check] for k, s in sessions.items()}
        times = {k: [] for k in sessions}
        for _ in range(args.rounds):
            for k, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, check[0])
                times[k].append(time.perf_counter() - t0)
    print(f"{what}; {len(names)} linears; {len(cal)} calibration images, {len(check)} check images; "
          f"{args.threads} threads, {args.rounds} alternating rounds; seconds to write: "
          + ", ".join(f"{k} {v:.1f}" for k, v in made.items()))
    base = statistics.median(times["fp32"])
    print(f"{'form':22} {'median ms':>10} {'vs fp32':>8} {'cos mean':>9} {'cos min':>8}")
    for k in sessions:
        a = np.concatenate([o.reshape(-1, o.shape[-1]) for o in out[k]]).astype(np.float64)
        b = np.concatenate([o.reshape(-1, o.shape[-1]) for o in out["fp32"]]).astype(np.float64)
        cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        med = statistics.median(times[k])
        print(f"{k:22} {med * 1e3:10.2f} {base / med:7.2f}x {cos.mean():9.4f} {cos.min():8.4f}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    raise SystemExit(main())
