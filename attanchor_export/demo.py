"""`attanchor-export demo`: the whole flow on a tiny built-in model, offline, in about a minute.

checkpoint (random, deterministic) -> export with parity checks -> end-to-end check -> one chat turn.
The model's weights are random, so its answer is noise: the demo shows the pipeline, not the model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def demo_image(path: Path) -> Path:
    """A red disc on a blue-to-green gradient: enough structure to make anchors land unevenly."""
    from PIL import Image, ImageDraw

    y, x = np.mgrid[0:336, 0:448]
    rgb = np.stack([np.zeros_like(x), x * 255 // 447, 255 - y * 255 // 335], axis=-1).astype(np.uint8)
    image = Image.fromarray(rgb)
    ImageDraw.Draw(image).ellipse((260, 60, 420, 220), fill=(220, 30, 30))
    image.save(path)
    return path


def run_demo(output: Path, report) -> dict:
    from attanchor_runtime import Pipeline
    from attanchor_runtime.manifest import Manifest
    from attanchor_runtime.visualize import draw_anchors

    from .checkpoint import load_checkpoint
    from .exporter import ExportOptions, export_artifact
    from .report import print_checks
    from .testing import make_tiny_llava
    from .validate import validate_end_to_end

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    with report.step("build tiny checkpoint (CLIP + Llama, random weights)"):
        checkpoint = make_tiny_llava(output / "checkpoint", family="clip-llama")
    artifact = output / "artifact"
    result = export_artifact(str(checkpoint), ExportOptions(output=artifact, force=True), report.step)
    with report.step("end-to-end parity (runtime vs PyTorch and transformers generate)"):
        e2e = validate_end_to_end(load_checkpoint(str(checkpoint)), Manifest.load(artifact))
    checks = result.checks + e2e
    print_checks(checks, summary=True, title="demo: parity against PyTorch")
    failed = [c for c in checks if not c.passed]
    image = demo_image(output / "demo.png")
    prompt = "What is in the image?"
    with report.step("chat turn through the torch-free runtime"):
        pipe = Pipeline.load(artifact)
        answer = pipe.chat(prompt, image=image, max_new_tokens=16)
        anchors = pipe.last_output.anchors[0]
        draw_anchors(pipe, image, prompt, anchors, output / "anchors.png")
    report.info(f"\n[bold]USER:[/bold] {prompt}\n[bold]ASSISTANT:[/bold] {answer!r}  [dim](random weights: noise)[/dim]")
    report.info(f"anchors (text index, image patch): {anchors}")
    report.info(
        f"\ncheckpoint  {checkpoint}\nartifact    {artifact}\nimage       {image}\n"
        f"anchors     {output / 'anchors.png'}\n\n"
        f"next: attanchor-export run {artifact} --image {image} --prompt 'What color is the disc?' --stream\n"
        f"      attanchor-export check {artifact}\n      attanchor-export bench {artifact}"
    )
    if failed:
        from .errors import ValidationFailed

        raise ValidationFailed(f"demo parity failed: {len(failed)} of {len(checks)} checks", checks=failed)
    return {"checkpoint": str(checkpoint), "artifact": str(artifact), "answer": answer, "anchors": anchors}
