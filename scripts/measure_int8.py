"""int8 TensorRT form (calibrated QDQ) variants on an fp32 artifact, each through the export's own gate.

    python scripts/measure_int8.py FP32_ARTIFACT [VARIANT ...] [--samples N] [--json OUT] [--reference CACHE]

A VARIANT is `<method>[+sq<alpha>]`: method = onnxruntime's CalibrationMethod (minmax, percentile,
entropy), sq<alpha> = SmoothQuant folded in first (precision.smoothing), e.g. `minmax`, `minmax+sq0.5`,
`percentile+sq0.8`; `nbits` is the weight-only onnxruntime form (MatMulNBits bits=8, no calibration).
The fp32 baseline (gate set and the task's gate questions, when the artifact declares a task) is
computed once; each variant quantizes a copy of the artifact's decoder with `quantize_artifact(...,
forms=("QDQ",))` and is gated against it. Prints one row per variant: logits cos mean / min, top-1,
top-1 over answer positions, task accuracy, answers identical to fp32, seconds. The histogram
calibrators (percentile, entropy) hold every calibrated activation of every sample in memory
(onnxruntime's HistogramCalibrater): about 8 GB for 256 tiny-vqa samples, so pass --samples for them;
they also need samples of one length, so with them every sample is cut to the shortest one's length.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import sys
import tempfile
import time
from pathlib import Path

from attanchor_runtime.manifest import Manifest

from attanchor_export.load.datasets import gate_samples, load_calibration_set
from attanchor_export.precision.calibration import DecoderCalibrationReader
from attanchor_export.precision.gate import (
    AccuracyGateFailed,
    fp32_baseline,
    fp32_task_answers,
    gate_pipeline,
)
from attanchor_export.precision.quantize import quantize_artifact

METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}


def parse(variant: str) -> dict:
    if variant == "nbits":
        return {"forms": ("MatMulNBits",)}
    method, _, smooth = variant.partition("+")
    if method not in METHODS or (smooth and not smooth.startswith("sq")):
        raise SystemExit(f"error: unknown variant {variant!r}: <minmax|percentile|entropy>[+sq<alpha>] or nbits")
    return {"forms": ("QDQ",), "calibrate_method": METHODS[method], "smooth_alpha": float(smooth[2:]) if smooth else None}


class SameLengthReader(DecoderCalibrationReader):
    @classmethod
    def from_samples(cls, pipe, samples):
        feeds = DecoderCalibrationReader.from_samples(pipe, samples).feeds
        n = min(f["attention_mask"].shape[1] for f in feeds)
        cut = ("inputs_embeds", "attention_mask", "position_ids")
        return cls([{k: (v[..., :n, :] if k == "inputs_embeds" else v[..., :n]) if k in cut else v
                     for k, v in f.items()} for f in feeds])


def copy_artifact(src: Path, dst: Path) -> None:
    """Hard links for every file but the decoder's, which quantize_artifact rewrites in place."""
    dst.mkdir(parents=True)
    for p in src.iterdir():
        if p.is_file():
            (shutil.copy2 if p.name.startswith("decoder.") else os.link)(p, dst / p.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("variants", nargs="*", default=["minmax", "minmax+sq0.5"])
    parser.add_argument("--calib", help="--calib of the export [easy-vqa for tiny-vqa, else the built-in set]")
    parser.add_argument("--task", help="--task of the export [easy-vqa for tiny-vqa, else none]")
    parser.add_argument("--samples", type=int, default=None, help="calibration samples (easy-vqa: 256)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--reference", type=Path, help="cache of the fp32 reference: read if it exists, else written")
    args = parser.parse_args()
    manifest = Manifest.load(args.artifact)
    tiny_vqa = manifest.source.alias == "tiny-vqa"  # declares calib and task easy-vqa
    calib = args.calib or ("easy-vqa" if tiny_vqa else None)
    task = args.task or ("easy-vqa" if tiny_vqa else None)
    files = {g: manifest.graphs[g].file for g in ("vision", "embedding", "decoder")}

    start = time.time()
    if args.reference and args.reference.is_file():
        baseline = pickle.loads(args.reference.read_bytes())
    else:
        baseline = fp32_baseline(gate_pipeline(manifest), gate_samples())
        if task:
            baseline.task = fp32_task_answers(manifest, files, task)
        if args.reference:
            args.reference.write_bytes(pickle.dumps(baseline))
    print(f"fp32 baseline: {time.time() - start:.0f} s; calib {calib}, task {task}"
          + (f" (fp32 {baseline.task['accuracy']:.3f})" if task else ""), file=sys.stderr)
    import attanchor_export.precision.quantize as quantize

    if args.samples and calib == "easy-vqa":  # load_calibration_set's own limit, through a wrapper
        quantize.load_calibration_set = lambda c, limit=None: load_calibration_set(c, limit=args.samples)
    if any(v.split("+")[0] in ("percentile", "entropy") for v in args.variants):
        # onnxruntime's histogram calibrators stack every sample's outputs with np.asarray, which fails
        # ("inhomogeneous shape") on prompts of different lengths: cut every sample to the shortest one's
        # length (from the end: causal, so the kept positions are exactly what they were).
        quantize.DecoderCalibrationReader = SameLengthReader

    rows = []
    for variant in args.variants:
        options = parse(variant)
        with tempfile.TemporaryDirectory(prefix="measure-int8-", dir=args.artifact.parent) as tmp:
            folder = Path(tmp) / "a"
            copy_artifact(args.artifact, folder)
            start = time.time()
            try:
                precision = quantize_artifact(Manifest.load(folder), quant="int8", calib=calib, task=task,
                                              baseline=baseline, **options)
            except AccuracyGateFailed as failed:
                precision = failed.precision
            seconds = time.time() - start
        result = precision.gate.results[0]
        record = precision.graphs[files["decoder"]]
        row = {"variant": variant, **{k: getattr(result, k) for k in ("cos_mean", "cos_min", "top1", "top1_answer")},
               "task": result.task.accuracy if result.task else None,
               "same_answers": result.task.same_answers if result.task else None,
               "passed": result.passed, "seconds": round(seconds),
               "samples": (precision.calibration or {}).get("samples"),
               "smoothing": record.smoothing.to_json() if record.smoothing else None}
        rows.append(row)
        print(f"{variant:22s} cos {row['cos_mean']:.4f} min {row['cos_min']:+.3f} top1 {row['top1']:.3f} "
              f"ans {row['top1_answer']:.3f} task {row['task']} same {row['same_answers']} "
              f"{'pass' if row['passed'] else 'FAIL'} {row['seconds']} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
