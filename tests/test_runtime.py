"""The torch-free Pipeline over an artifact: parity, inputs, guards, chat and stream."""

from __future__ import annotations

import json

import numpy as np
import pytest
from attanchor_runtime import NumericsError, Pipeline, RuntimeInputError
from helpers import read_manifest
from PIL import Image


@pytest.fixture(scope="module")
def pipe(artifact):
    return Pipeline.load(artifact("clip-t2i"))


def _rows(manifest, rng, lengths):
    image = manifest.text.image_token_id
    rows = []
    for n in lengths:
        row = rng.integers(3, image, size=n)
        row[rng.integers(0, n - 1)] = image
        rows.append(row.astype(np.int64))
    return rows


def _pixels(manifest, batch, seed=0):
    rng = np.random.default_rng(seed)
    size = manifest.dims.image_size
    return rng.standard_normal((batch, 3, size, size)).astype(np.float32)


@pytest.mark.parametrize("name", ["clip-t2i", "clip-i2t-k6", "siglip-t2i-k4", "siglip-i2t"])
def test_end_to_end_tokens_equal_pytorch(artifact, name):
    """Runtime greedy tokens == the PyTorch reference, and == transformers generate without anchors."""
    from attanchor_runtime.manifest import Manifest

    from attanchor_export.checks.parity import validate_end_to_end
    from attanchor_export.load.checkpoint import load_checkpoint

    folder = artifact(name)
    manifest = Manifest.load(folder)
    results = validate_end_to_end(load_checkpoint(manifest.source.resolved), manifest)
    assert all(r.passed for r in results), [r for r in results if not r.passed]
    assert any("transformers generate" in r.metric for r in results)
    anchored = [r for r in results if "anchors=" in r.case and not r.case.endswith("anchors=0")]
    assert len(anchored) >= 2, "at least two thresholds must insert anchors"


def test_ragged_list_equals_padded_array_with_mask(pipe):
    m = pipe.manifest
    rows = _rows(m, np.random.default_rng(1), [9, 5])
    pixels = _pixels(m, 2)
    from_list = pipe.generate(input_ids=rows, pixel_values=pixels, max_new_tokens=6)
    width = 9
    ids = np.zeros((2, width), np.int64)
    mask = np.zeros((2, width), np.int64)
    for b, r in enumerate(rows):
        ids[b, width - len(r):], mask[b, width - len(r):] = r, 1
    from_array = pipe.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=6)
    np.testing.assert_array_equal(from_list.tokens, from_array.tokens)
    # Anchors count positions in the caller's row: the padded row includes its padding.
    for row, listed, padded in zip(rows, from_list.anchors, from_array.anchors):
        assert padded == [(t + width - len(row), m) for t, m in listed]


def test_batch_rows_match_single_rows(pipe):
    """Left padding must not change a row's result (explicit position ids, masked attention)."""
    m = pipe.manifest
    rows = _rows(m, np.random.default_rng(2), [10, 4, 7])
    pixels = _pixels(m, 3)
    batch = pipe.generate(input_ids=rows, pixel_values=pixels, max_new_tokens=5)
    for b, row in enumerate(rows):
        single = pipe.generate(input_ids=[row], pixel_values=pixels[b:b + 1], max_new_tokens=5)
        n = int(batch.lengths[b])
        np.testing.assert_array_equal(single.tokens[0, :n], batch.tokens[b, :n])
        assert single.anchors[0] == batch.anchors[b]


def test_placeholder_run_counts_as_one(pipe):
    m = pipe.manifest
    row = _rows(m, np.random.default_rng(3), [8])[0]
    at = int(np.flatnonzero(row == m.text.image_token_id)[0])
    expanded = np.concatenate([row[:at], np.full(m.dims.image_tokens, m.text.image_token_id), row[at + 1:]])
    pixels = _pixels(m, 1)
    a = pipe.generate(input_ids=[row], pixel_values=pixels, max_new_tokens=5, threshold=0.05)
    b = pipe.generate(input_ids=[expanded], pixel_values=pixels, max_new_tokens=5, threshold=0.05)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert a.anchors[0], "threshold 0.05 should insert anchors on the tiny model"
    # Anchors index the caller's own row: shift by the extra placeholders after the image.
    shift = m.dims.image_tokens - 1
    assert b.anchors[0] == [(t + shift, m) for t, m in a.anchors[0]]


def test_anchor_pairs_point_at_text_after_the_image(pipe):
    m = pipe.manifest
    rows = _rows(m, np.random.default_rng(4), [12, 6])
    out = pipe.generate(input_ids=rows, pixel_values=_pixels(m, 2), max_new_tokens=2, threshold=0.0)
    for row, pairs in zip(rows, out.anchors):
        image_at = int(np.flatnonzero(row == m.text.image_token_id)[0])
        assert pairs and all(image_at < t < len(row) and 0 <= i < m.dims.image_tokens for t, i in pairs)
    none = pipe.generate(input_ids=rows, pixel_values=_pixels(m, 2), max_new_tokens=2, threshold=1.5)
    assert none.anchors == [[], []]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"input_ids": [np.array([5, 6, 7])]}, "0 image placeholder runs"),
        ({"input_ids": "text"}, "input_ids must be"),
        ({"pixel_values": np.zeros((1, 3, 8, 8), np.float32)}, "pixel_values must be"),
        ({"max_new_tokens": 10_000}, "exceeds the model's context"),
        ({"max_new_tokens": 0}, "max_new_tokens must be"),
        ({"threshold": float("nan")}, "threshold must be"),
    ],
)
def test_bad_inputs_are_one_line_errors(pipe, kwargs, message):
    m = pipe.manifest
    args = {"input_ids": _rows(m, np.random.default_rng(5), [6]), "pixel_values": _pixels(m, 1),
            "max_new_tokens": 3, **kwargs}
    with pytest.raises(RuntimeInputError) as info:
        pipe.generate(**args)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_two_placeholder_runs_rejected(pipe):
    m = pipe.manifest
    row = np.array([1, m.text.image_token_id, 5, m.text.image_token_id, 6])
    with pytest.raises(RuntimeInputError, match="2 image placeholder runs"):
        pipe.generate(input_ids=[row], pixel_values=_pixels(m, 1), max_new_tokens=2)


def test_front_end_is_what_generate_prefills(pipe):
    m = pipe.manifest
    rows = _rows(m, np.random.default_rng(9), [9, 5])
    pixels = _pixels(m, 2)
    front = pipe.front_end(rows, pixels, threshold=0.05)
    out = pipe.generate(input_ids=rows, pixel_values=pixels, max_new_tokens=3, threshold=0.05)
    assert front.anchors == out.anchors and any(front.anchors)
    assert front.batch.input_ids.shape == front.batch.attention_mask.shape == (2, 9)
    assert front.image_features.shape[:2] == (2, m.dims.image_tokens)
    length = front.inputs_embeds.shape[1]
    assert front.attention_mask.shape == front.position_ids.shape == front.gather_index.shape == (2, length)
    assert length >= 9 - 1 + m.dims.image_tokens
    assert set(front.timings) == {"vision", "embedding"} and all(t >= 0 for t in front.timings.values())
    with pytest.raises(RuntimeInputError, match="threshold must be"):
        pipe.front_end(rows, pixels, threshold=float("inf"))


def test_nan_logits_name_the_graph(pipe, monkeypatch):
    m = pipe.manifest
    for method in ("decode", "decode_last"):  # every position's logits, or the last one's (logits_to_keep)
        real = getattr(pipe.backend, method)

        def poisoned(*args, real=real):
            logits, present = real(*args)
            return np.full_like(logits, np.nan), present

        monkeypatch.setattr(pipe.backend, method, poisoned)
    with pytest.raises(NumericsError, match="decoder.onnx produced NaN/Inf logits"):
        pipe.generate(input_ids=_rows(m, np.random.default_rng(6), [5]), pixel_values=_pixels(m, 1))


def test_eos_stops_each_row(pipe):
    m = pipe.manifest
    rows = _rows(m, np.random.default_rng(7), [7, 9])
    free = pipe.generate(input_ids=rows, pixel_values=_pixels(m, 2), max_new_tokens=8)
    stop_at = int(free.tokens[0, 2])  # row 0's third token becomes the stop token
    out = pipe.generate(input_ids=rows, pixel_values=_pixels(m, 2), max_new_tokens=8, eos_token_id=stop_at)
    assert out.lengths[0] <= 3 and out.tokens[0, out.lengths[0] - 1] == stop_at
    assert (out.tokens[0, out.lengths[0]:] == pipe.pad_token_id).all()


def test_sampling_is_seeded_and_top_k_1_is_greedy(pipe):
    m = pipe.manifest
    args = dict(input_ids=_rows(m, np.random.default_rng(8), [6]), pixel_values=_pixels(m, 1),
                max_new_tokens=8)
    greedy = pipe.generate(**args)
    a = pipe.generate(**args, do_sample=True, temperature=1.5, seed=3)
    b = pipe.generate(**args, do_sample=True, temperature=1.5, seed=3)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    top1 = pipe.generate(**args, do_sample=True, top_k=1, seed=9)
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)
    with pytest.raises(RuntimeInputError, match="top_p"):
        pipe.generate(**args, do_sample=True, top_p=0)


def test_chat_stream_and_image_sources(pipe, tmp_path):
    image = Image.fromarray((np.random.default_rng(0).random((40, 52, 3)) * 255).astype(np.uint8))
    path = tmp_path / "img.png"
    image.save(path)
    answer = pipe.chat("What is in the image?", image=path, max_new_tokens=10)
    assert isinstance(answer, str) and answer
    assert "".join(pipe.stream("What is in the image?", image=path, max_new_tokens=10)) == answer
    stream = pipe.stream("What is in the image?", image=path, max_new_tokens=10)
    assert stream.output is None  # nothing has run yet
    assert "".join(stream) == answer
    ids, pixels = pipe.chat_inputs("What is in the image?", path)
    direct = pipe.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=10)
    np.testing.assert_array_equal(stream.output.tokens, direct.tokens)
    assert stream.output.anchors == direct.anchors
    assert pipe.chat("What is in the image?", image=image, max_new_tokens=10) == answer
    assert pipe.chat("What is in the image?", image=path.read_bytes(), max_new_tokens=10) == answer
    with pytest.raises(RuntimeInputError, match="cannot decode image"):
        pipe.chat("What?", image=b"not an image")


def test_manifest_guards(artifact, tmp_path):
    import shutil

    from attanchor_runtime.errors import ArtifactError

    copy = tmp_path / "copy"
    shutil.copytree(artifact("clip-t2i"), copy)
    with open(copy / "decoder.onnx.data", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ArtifactError, match="decoder.onnx.data is 100 bytes"):
        Pipeline.load(copy)
    data = read_manifest(copy)
    data["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="format version 99"):
        Pipeline.load(copy)
    with pytest.raises(ArtifactError, match="no manifest.json"):
        Pipeline.load(tmp_path)


def test_cli_run_and_show_anchors(artifact, tmp_path):
    from click.testing import CliRunner

    from attanchor_export.cli import main

    image = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(1).random((64, 48, 3)) * 255).astype(np.uint8)).save(image)
    png = tmp_path / "anchors.png"
    result = CliRunner().invoke(main, ["run", str(artifact("clip-t2i")), "--image", str(image), "--prompt",
                                       "What is on the table?", "--max-new-tokens", "6", "--threshold", "0.05",
                                       "--show-anchors", str(png), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["anchors"] and len(out["tokens"]) <= 6
    shown = Image.open(png)
    assert shown.width == 512 and shown.height > 512  # the model's view at 512 px, the prompt underneath
    # Outlines are drawn in one colour: some pixels must carry it.
    assert (np.asarray(shown.convert("RGB")) == (255, 220, 0)).all(axis=-1).any()
    bad = CliRunner().invoke(main, ["run", str(artifact("clip-t2i")), "--image", str(tmp_path / "missing.png"),
                                    "--prompt", "x"])
    assert bad.exit_code == 1 and bad.stderr.strip().startswith("error: cannot decode image")
    assert len(bad.stderr.strip().splitlines()) == 1
