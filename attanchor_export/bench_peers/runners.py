"""Step 4's children: one timed generate per system, each in a fresh process (project and transformers in the
project venv, genai and llama in the peers venv), plus the memory-bandwidth probe. Each runner returns its
figures; child.py prints them as ONE JSON line. Timing: `prefill_s` is the prompt in -> the first greedy token
out; `decode_tok_s` is new_tokens / (last token out - first token out)."""

from __future__ import annotations

import json
import time

clock = time.perf_counter


def _measure(generate, warmup: int) -> dict:
    for _ in range(warmup):
        generate()
    start, token_times, tokens = generate()
    decode_s = token_times[-1] - token_times[0]
    return {"prefill_s": token_times[0] - start, "decode_s": decode_s,
            "decode_tok_s": (len(token_times) - 1) / decode_s, "tokens": [int(t) for t in tokens]}


def run_project(spec: dict) -> dict:
    import numpy as np
    from attanchor_runtime.decode import SequentialStep, generate
    from attanchor_runtime.manifest import KV_CONCAT
    from attanchor_runtime.ort_backend import OrtDecoder
    from attanchor_runtime.sessions import ort_session

    t0 = clock()
    session = ort_session(spec["model"], threads=spec["threads"])
    decoder = OrtDecoder.of_session(session, spec["dims"]["max_position_embeddings"], spec.get("kv_cache", KV_CONCAT))
    if spec.get("prefill"):  # prompts through the int8 prompt graph, steps through decoder.onnx (the runtime's way)
        decoder.prefill_session = ort_session(spec["prefill"], threads=spec["threads"])
    table = np.load(spec["embed"], mmap_mode="r")  # [vocab, hidden] fp32, the artifact's embed_tokens.bin
    load_s = clock() - t0
    ids = np.array(spec["prompt"], np.int64)[None]

    def embed(tokens):
        return np.asarray(table[tokens], np.float32)[:, None, :]  # the runtime's table lookup (Pipeline.embed)

    def generate_once():
        start, token_times = clock(), []
        mask, positions = np.ones_like(ids), np.arange(ids.shape[1], dtype=np.int64)[None]
        for item in generate(decoder, SequentialStep.after_prefill(mask, positions),
                             np.asarray(table[ids], np.float32), embed, 1 + spec["new_tokens"]):
            if isinstance(item, np.ndarray):
                token_times.append(clock())  # each call's token, the moment the loop yields it
            else:
                tokens = item.tokens[0]
        return start, token_times, tokens

    return {**_measure(generate_once, spec["warmup"]), "load_s": load_s,
            "kv_cache": spec.get("kv_cache", KV_CONCAT)}


def run_transformers(spec: dict) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(spec["threads"])
    t0 = clock()
    model = LlamaForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, attn_implementation="sdpa").eval()
    load_s = clock() - t0
    ids = torch.tensor([spec["prompt"]], dtype=torch.long)

    @torch.inference_mode()
    def generate():
        start = clock()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)  # as generate() prefills
        tokens, token_times = [int(out.logits[0, -1].argmax())], [clock()]
        for _ in range(spec["new_tokens"]):
            out = model(input_ids=torch.tensor([[tokens[-1]]]), cache=out.cache, use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
            token_times.append(clock())
        return start, token_times, tokens

    return {**_measure(generate, spec["warmup"]), "load_s": load_s}


def run_genai(spec: dict) -> dict:
    import onnxruntime_genai as og

    t0 = clock()
    config = og.Config(spec["model"])
    config.clear_providers()  # CPU
    threads = {"intra_op_num_threads": spec["threads"], "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": threads}}}))
    model = og.Model(config)
    load_s = clock() - t0
    total = len(spec["prompt"]) + 1 + spec["new_tokens"]

    def generate():
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=total, batch_size=1)
        generator = og.Generator(model, params)
        start = clock()
        generator.append_tokens(spec["prompt"])  # runs the prompt
        tokens, token_times = [], []
        while len(tokens) < 1 + spec["new_tokens"]:
            if generator.is_done():  # greedy hit EOS (id 2; genai takes no id outside the vocab)
                raise RuntimeError(f"onnxruntime-genai stopped at EOS after {len(tokens)} tokens")
            generator.generate_next_token()  # the arg-max of the last logits (then, next call, one step)
            tokens.append(int(generator.get_next_tokens()[0]))
            token_times.append(clock())
        return start, token_times, tokens

    return {**_measure(generate, spec["warmup"]), "load_s": load_s}


def run_llama(spec: dict) -> dict:
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    n = len(spec["prompt"])
    t0 = clock()
    llm = Llama(spec["model"], n_ctx=n + spec["new_tokens"] + 8, n_batch=n, n_ubatch=n, n_threads=spec["threads"],
                n_threads_batch=spec["threads"], verbose=False)
    load_s = clock() - t0

    vocab = llm.n_vocab()

    def last_token() -> int:  # arg-max of the batch's last logits (eval keeps none unless logits_all)
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))))

    def generate():
        llm.reset()
        start = clock()
        llm.eval(spec["prompt"])
        tokens, token_times = [last_token()], [clock()]
        for _ in range(spec["new_tokens"]):
            llm.eval([tokens[-1]])
            tokens.append(last_token())
            token_times.append(clock())
        return start, token_times, tokens

    return {**_measure(generate, spec["warmup"]), "load_s": load_s}


def run_bandwidth(spec: dict) -> dict:
    from attanchor_export.bench.probes import BandwidthProbe

    probe = BandwidthProbe(spec.get("bytes", 1 << 30)).measure(spec.get("repeats", 5))
    return {"bytes_per_s": probe["bytes_per_s"], "method": probe["method"], "probes": probe["probes"]}
