"""No small input exhausts memory, and bad inputs are one line: image size bounds and 16-bit images,
prompts over the context, anchors cut to fit it, the per-call memory estimate, pixel_values and token
ids checked in generate, and export options that could never run (--max-anchors, --threshold inf)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from attanchor_runtime import Pipeline, RuntimeInputError
from attanchor_runtime.image_input import MAX_ASPECT_RATIO
from click.testing import CliRunner
from PIL import Image

from attanchor_export.cli import main


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def pipe(artifact):
    return Pipeline.load(artifact("clip-t2i"))


@pytest.fixture
def nothing_runs(pipe, monkeypatch):
    """Fails the test if the vision graph runs: the refusal must come before any work."""
    def vision(pixels):
        raise AssertionError("the vision graph ran before the input was refused")

    monkeypatch.setattr(pipe.backend, "vision", vision)


def png(path, width: int, height: int, bit_depth: int = 8, colour_type: int = 0, rows: bytes | None = None):
    """A PNG written by hand: any header, optionally no (or broken) pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    data = zlib.compress(rows) if rows is not None else b"\x78\x9c"  # a truncated stream
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def one_line(info) -> str:
    text = str(info.value)
    assert "\n" not in text
    return text


def rows(manifest, n: int, rng=None) -> list[np.ndarray]:
    rng = rng or np.random.default_rng(0)
    row = rng.integers(3, manifest.text.image_token_id, size=n).astype(np.int64)
    row[1] = manifest.text.image_token_id
    return [row]


def pixels(manifest, batch=1):
    size = manifest.dims.image_size
    return np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)


# ---- images ------------------------------------------------------------------------------------------
def test_a_thin_image_is_refused_before_it_is_resized(pipe, tmp_path):
    """A 100000x1 PNG is 177 bytes; a shortest-edge resize would make it 30 x 3,000,000 (336 x 33.6 M,
    4.7 GB, for a LLaVA-1.5 processor) before the crop."""
    thin = np.zeros((1, 100_000), np.uint8)
    path = tmp_path / "thin.png"
    Image.fromarray(thin).save(path)
    assert path.stat().st_size < 1000
    for source in (path, path.read_bytes(), Image.open(path), thin, np.zeros((100_000, 1, 3), np.uint8)):
        with pytest.raises(RuntimeInputError) as info:
            pipe.images(source)
        assert f"more elongated than {MAX_ASPECT_RATIO}:1" in one_line(info)
        assert "100000x1" in one_line(info) or "1x100000" in one_line(info)
    with pytest.raises(RuntimeInputError, match="more elongated"):
        pipe.chat("What is it?", image=path)
    ok = np.zeros((2, 2 * MAX_ASPECT_RATIO, 3), np.uint8)  # exactly at the limit: preprocessed as always
    assert pipe.images(ok).shape[0] == 1


def test_a_huge_image_is_refused_from_its_header(pipe, tmp_path):
    """Dimensions declared in 60 bytes: refused before a pixel is decoded. Pillow's own limit would warn
    at 89 megapixels and refuse only at twice that, in its own words."""
    path = png(tmp_path / "big.png", 20_000, 4_000)
    with pytest.raises(RuntimeInputError) as info:
        pipe.images(path)
    assert "is 20000x4000 (80 megapixels), over the limit of 64" in one_line(info)
    assert "MAX_IMAGE_PIXELS" in one_line(info)
    result = run_cli("run", pipe.manifest.folder, "--image", path, "--prompt", "what is it?")
    assert result.exit_code == 1 and result.stderr.strip().splitlines() == [f"error: {info.value}"]
    with pytest.raises(RuntimeInputError) as info:
        pipe.images(png(tmp_path / "huge.png", 30_000, 30_000))
    assert "(900 megapixels) is over the limit of 64 megapixels" in one_line(info)


def test_16_bit_pngs_are_scaled_not_clipped(pipe, tmp_path):
    """A 16-bit grayscale PNG opens as I;16: convert("RGB") would clip every value over 255 to white."""
    values = (np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16)  # 0 .. 63960
    sixteen = png(tmp_path / "gray16.png", 40, 40, bit_depth=16,
                  rows=b"".join(b"\0" + r.astype(">u2").tobytes() for r in values))
    assert Image.open(sixteen).mode == "I;16"
    eight = tmp_path / "gray8.png"
    Image.fromarray((values >> 8).astype(np.uint8)).save(eight)
    expected = pipe.images(eight)
    np.testing.assert_array_equal(pipe.images(sixteen), expected)
    np.testing.assert_array_equal(pipe.images(Image.open(sixteen)), expected)
    np.testing.assert_array_equal(pipe.images(Image.fromarray(values.astype(np.int32), "I")), expected)


# ---- pixel_values and token ids --------------------------------------------------------------------------
@pytest.mark.parametrize("make, message", [
    (lambda p: np.clip(p * 60 + 120, 0, 255).astype(np.uint8), "got uint8: raw 0-255 pixels are not normalized"),
    (lambda p: np.clip(p * 60 + 120, 0, 255), "far outside what the artifact's image processor makes"),
    (lambda p: p * 1e4, "far outside"),
])
def test_pixel_values_are_checked(pipe, make, message):
    manifest = pipe.manifest
    with pytest.raises(RuntimeInputError) as info:
        pipe.generate(input_ids=rows(manifest, 6), pixel_values=make(pixels(manifest)), max_new_tokens=2)
    assert message in one_line(info)
    pipe.generate(input_ids=rows(manifest, 6), pixel_values=pixels(manifest).astype(np.float64), max_new_tokens=2)


@pytest.mark.parametrize("bad, message", [(-5, "holds token id -5: ids must be >= 0"),
                                          (10_000, "holds token id 10000, outside the vocabulary of 672")])
def test_token_ids_outside_the_table_are_one_line(pipe, bad, message):
    manifest = pipe.manifest
    row = rows(manifest, 6)[0]
    row[3] = bad
    with pytest.raises(RuntimeInputError) as info:
        pipe.generate(input_ids=[row], pixel_values=pixels(manifest), max_new_tokens=2)
    assert f"input_ids row 0 {message}" in one_line(info)


# ---- the context and the memory a prompt may take ----------------------------------------------------
def test_a_prompt_over_the_context_is_refused_before_anything_runs(pipe, nothing_runs):
    manifest = pipe.manifest  # context 512, 25 image tokens
    with pytest.raises(RuntimeInputError) as info:
        pipe.generate(input_ids=rows(manifest, 480), pixel_values=pixels(manifest), max_new_tokens=16)
    assert "prompt (480 tokens, 25 image tokens) + max_new_tokens (16) exceeds the model's context of 512" \
        in one_line(info)


def test_anchors_are_cut_to_the_best_that_fit_the_context(pipe):
    """At threshold -1 every token after the image is an anchor: 398 more positions on a 400-token prompt,
    which the 512 context cannot hold. The best (512 - 8 - 424 =) 80 by score are kept, and it answers."""
    from attanchor_graphs.specification import cosine_scores

    manifest = pipe.manifest
    ids, pix = rows(manifest, 400), pixels(manifest)
    out = pipe.generate(input_ids=ids, pixel_values=pix, max_new_tokens=8, threshold=-1.0)
    assert out.anchor_cap == 80 and len(out.anchors[0]) == 80 and out.tokens.shape[1] >= 1
    features = pipe.front_end(ids, pix, threshold=2.0).image_features
    text = np.asarray(pipe.embed_table[ids[0]], np.float32)[None]
    best = cosine_scores(text, features)[0].max(axis=1)  # each text token's best patch score
    excluded = set(manifest.anchor.excluded_token_ids)  # special and whitespace-only tokens: never anchors
    candidates = {t for t in range(2, 400) if int(ids[0][t]) not in excluded}
    kept = {t for t, _ in out.anchors[0]}
    dropped = candidates - kept
    assert kept <= candidates and min(best[t] for t in kept) >= max(best[t] for t in dropped)
    assert all(int(np.argmax(cosine_scores(text, features)[0][t])) == m for t, m in out.anchors[0])
    short = rows(manifest, 40)
    free = pipe.generate(input_ids=short, pixel_values=pix, max_new_tokens=8, threshold=-1.0)
    words = sum(int(i) not in excluded for i in short[0][2:])
    assert free.anchor_cap is None and len(free.anchors[0]) == words >= 30  # nothing cut when it fits


def test_the_cut_front_end_is_what_the_embedding_graph_computes(pipe):
    """The anchor cap recomputes the embedding graph's outputs in numpy (AnchorInsert's reference with a
    budget): with a budget no row reaches, they equal the graph's, bit for bit."""
    manifest = pipe.manifest
    rng = np.random.default_rng(3)
    batch_rows = rows(manifest, 30, rng) + rows(manifest, 21, rng)
    pix = pixels(manifest, 2)
    front = pipe.front_end(batch_rows, pix, threshold=0.05)
    assert any(front.anchors)
    batch = pipe.family.prepare_batch(batch_rows)
    ours = pipe.family.capped_embedding(batch, front.image_features, 0.05, 1000, {}, pipe.embed_table)
    np.testing.assert_array_equal(ours["inputs_embeds"], front.inputs_embeds)
    for key in ("attention_mask", "position_ids", "gather_index"):
        np.testing.assert_array_equal(ours[key], getattr(front, key))


def test_memory_estimate_over_the_budget_is_refused_before_anything_runs(artifact, pipe, nothing_runs):
    manifest = pipe.manifest
    with pytest.raises(RuntimeInputError) as info:
        pipe.generate(input_ids=rows(manifest, 400), pixel_values=pixels(manifest), max_new_tokens=8, memory_budget=0.001)
    assert "over the memory budget of 0.00 GiB" in one_line(info) and "1 row(s) x 424 positions" in one_line(info)
    with pytest.raises(RuntimeInputError, match="memory_budget must be a positive number"):
        Pipeline.load(artifact("clip-t2i"), memory_budget=0)
    small = Pipeline.load(artifact("clip-t2i"), memory_budget=0.001)
    small.generate(input_ids=rows(manifest, 8), pixel_values=pixels(manifest), max_new_tokens=2)  # a short one fits


def test_run_memory_budget_option(artifact, tmp_path):
    image = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)).save(image)
    long_prompt = " ".join(["word"] * 140)  # 432 tokens: about 12 MB of attention scores alone
    result = run_cli("run", artifact("clip-t2i"), "--image", image, "--prompt", long_prompt, "--memory-budget", "0.01",
                     "--max-new-tokens", "4")
    assert result.exit_code == 1 and result.stdout == ""
    assert "over the memory budget of 0.01 GiB" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    fits = run_cli("run", artifact("clip-t2i"), "--image", image, "--prompt", "what?", "--memory-budget", "0.01",
                   "--max-new-tokens", "2")
    assert fits.exit_code == 0, fits.output


# ---- export options that could never run ---------------------------------------------------------------
def test_an_anchor_budget_over_the_context_is_refused(checkpoint, tmp_path):
    result = run_cli(checkpoint("clip-llama"), "-o", tmp_path / "out", "--max-anchors", "1000000")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "error: --max-anchors 1000000 does not fit the model's context of 512 positions (25 of them image "
        "tokens): use at most 487"]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_a_non_finite_threshold_is_refused_at_export(checkpoint, tmp_path, value):
    from attanchor_export.errors import ExportError
    from attanchor_export.exporter import ExportOptions, export_artifact

    result = run_cli(checkpoint("clip-llama"), "-o", tmp_path / "out", "--threshold", value)
    assert result.exit_code == 2 and "expected a finite number" in result.output
    with pytest.raises(ExportError, match="threshold must be a finite number"):
        export_artifact(str(checkpoint("clip-llama")), ExportOptions(output=tmp_path / "o", threshold=float(value)))
    assert not list(tmp_path.iterdir())
