"""Time the accuracy gate's PyTorch reference (gate.source_model_baseline) on an int4 artifact, and print
the gate's metrics against it: what `attanchor-export check DIR` and an over-budget export run.

    python scripts/measure_gate_reference.py --out DIR [--layers 6] [--vision-layers 2]

Builds (once, under DIR) a random checkpoint at TinyLLaVA-1B's layout with `--layers` decoder layers
(hidden 2048, vocab 32,064, CLIP ViT-L/14-336 with `--vision-layers` blocks: 576 image tokens, so the
gate set's prompts are ~632 tokens as at 7B), fp16 shards, and its int4 export (gated against its fp32
graphs there). Then loads the checkpoint streamed (one decoder layer in memory at a time)
and runs the gate against PyTorch as `check` does, printing one JSON line: the reference's seconds
(the baseline, plus, where the reference is computed per form, its share inside the gate), the whole
gate's seconds, and each form's cos mean / top-1 / greedy agreement.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def build(out: Path, layers: int, vision_layers: int) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    from make_random_checkpoint import make_random_checkpoint

    from attanchor_export.exporter import ExportOptions, export_artifact
    from attanchor_export.load.tiny_random import tinyllava_1b_config

    checkpoint, artifact = out / "checkpoint", out / "artifact"
    if not (checkpoint / "config.json").is_file():
        config = tinyllava_1b_config()
        config.text_config.num_hidden_layers = layers
        config.vision_config.num_hidden_layers = vision_layers
        make_random_checkpoint("tinyllava-1b", checkpoint, "fp16", shard_mb=256, force=True, log=lambda *_: None,
                               config=config)
    if not (artifact / "manifest.json").is_file():
        export_artifact(str(checkpoint), ExportOptions(output=artifact, quant="int4", force=True))
    return artifact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vision-layers", type=int, default=2)
    args = parser.parse_args()
    artifact = build(args.out, args.layers, args.vision_layers)

    import dataclasses

    from attanchor_runtime.manifest import Manifest

    from attanchor_export.load.source import load_source
    from attanchor_export.precision import gate

    manifest = Manifest.load(artifact)
    loaded = load_source(manifest, streamed=True)
    t0 = time.perf_counter()
    baseline = gate.source_model_baseline(loaded, manifest)
    t1 = time.perf_counter()
    precision = manifest.precision
    floors = {"int4": {"cos_mean": 0.0, "top1": 0.0, "vision_cos_mean": 0.0}}  # measuring, not judging
    result = gate.run_gate(manifest, baseline, precision.format, precision.backends, {"vision": False}, floors,
                           graphs=precision.graphs)
    t2 = time.perf_counter()
    reference = getattr(baseline, "reference", None)
    in_gate = getattr(reference, "continuation_seconds", 0.0) if reference is not None else 0.0
    print(json.dumps({
        "artifact": str(artifact), "reference": result.set["reference"], "positions": result.set["positions"],
        "baseline_s": round(t1 - t0, 2), "reference_in_gate_s": round(in_gate, 2),
        "reference_total_s": round(t1 - t0 + in_gate, 2), "gate_s": round(t2 - t1, 2),
        "forms": [{k: v for k, v in dataclasses.asdict(r).items()
                   if k in ("decoder", "cos_mean", "cos_min", "top1", "top1_answer", "greedy_match", "greedy_prefix")}
                  for r in result.results],
    }))


if __name__ == "__main__":
    main()
