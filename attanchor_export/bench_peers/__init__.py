"""Peer benchmark: this project's decoder beside onnxruntime-genai, llama.cpp and transformers, one checkpoint.

scripts/bench_peers.py is the entry point; cli.py reads top to bottom as a run does:

1. checkpoint.py: one random-weight LlamaForCausalLM (transformers' own init, torch.manual_seed(--seed)) at
   TinyLLaVA-1B decoder dims (attanchor_export.load.tiny_random.tinyllava_1b_config().text_config: hidden
   2048, 22 layers, 32 / 4 KV heads, intermediate 5632, vocab 32064) or `--dims small` (hidden 256, 2 layers,
   same vocab), saved fp32 safetensors with scripts/make_random_checkpoint.py's tokenizer. Cached by dims+seed.
2. venvs.py: a venv of its own for the peers (their pins never touch the project venv), under
   CACHE/venv: torch (the project's version, installed first as the README does; extra pip arguments for it
   from $ATTANCHOR_PEERS_TORCH_PIP_ARGS), onnxruntime-genai, transformers, onnx-ir, matplotlib; then
   llama-cpp-python built once from its PyPI sdist (CMAKE_ARGS="-DGGML_NATIVE=ON", minus AMX
   where the CPU lists it: venvs.default_cmake_args says why; or $CMAKE_ARGS; about
   18 min on the 2-core machine), whose vendor/llama.cpp also gives convert_hf_to_gguf.py and gguf-py.
   CACHE: --cache (or $ATTANCHOR_PEERS_CACHE), default ~/.cache/attanchor-export/peers. Logs: CACHE/logs/.
3. build.py (build_project.py, build_genai.py, build_llama.py + gguf_tasks.py): every system from that
   one checkpoint, each in CACHE/models/<dims>-seed<seed>/<system>/ with a build.json (files, bytes on
   disk, weight bytes read per decode token), cached:
     project-fp32         export_decoder + optimize_decoder, as an export writes decoder.onnx (bench_quant.py)
     project-int4         + quantize_graph (MatMulNBits block 128 asymmetric, accuracy_level 4, the lm_head
                          too: precision.quantize.lm_head_quantized) + precision.ort_fusions.fuse_decoder_file
                          (RMSNorm, residual Adds, rotary, attention reading the KV cache in place):
                          what `attanchor-export --quant int4` writes for onnxruntime
     project-int4-keep-lm-head  the same with the lm_head kept fp32 (the export's --keep-lm-head)
     project-int4-unfused the default int4 weights in the standard-op graph (no onnxruntime fusions)
     project-int8         MatMulNBits bits 8, block 128, accuracy_level 4, lm_head fp32, fused: `--quant int8`
     project-int4-prefill-int8  project-int4 plus its int8 prompt graph (precision.prefill_int8), which the
                          runner sends the prompt through: `--quant int4 --prefill-int8`
     genai-fp32/-int4     python -m onnxruntime_genai.models.builder -i CKPT -o DIR -p fp32|int4 -e cpu
                          (its defaults: int4 block 32, accuracy_level 4 on CPU)
     llama-f32/-f16       llama.cpp's convert_hf_to_gguf.py --outtype f32|f16
     llama-q4_0/-q4_k_m/-q8_0  llama_cpp.llama_model_quantize (the ctypes API) of the F32 file
     transformers-fp32    the checkpoint itself, eager PyTorch with sdpa attention: the reference row
4. rounds.py, runners.py, child.py. Rounds (--rounds, default 6): every system, plus a memory-bandwidth
   probe, each in a FRESH child process (the project's and transformers' in the project venv, the peers' in
   the peers venv), in a seeded order shuffled anew each round (round_order). A child loads its model, runs
   one warm-up generate, then one measured generate: the prompt (--prompt-len fixed random ids in [3, 32000), the same ids for everyone, no BOS added), the greedy token
   from its logits, then --new-tokens cached greedy steps (EOS ignored). It prints ONE JSON line: prefill_s
   (prompt in -> first token out), decode_tok_s (new_tokens / time from the first token to the last),
   tokens (all 1 + new_tokens greedy ids) and its own peak RSS (VmHWM; os.wait4's ru_maxrss is the fallback,
   it also counts the parent's pages at fork). The parent parses that line (noise on stdout is skipped).
     project: attanchor_runtime.sessions.ort_session (the session options users get) driven by the runtime's
              own decode loop (attanchor_runtime.decode.generate over ort_backend.OrtDecoder: explicit
              position_ids, attention_mask, past -> present; a fused graph reads one KVBuffer per layer in
              place, as OrtBackend decodes it); embedding rows from embed_tokens.npy;
     genai:   og.Model + og.Generator, greedy search, 2 intra-op threads set through og.Config.overlay;
     llama:   llama_cpp.Llama(n_threads=n_threads_batch=2, n_batch=n_ubatch=prompt length), eval() + arg-max;
     transformers: LlamaForCausalLM.from_pretrained(attn_implementation="sdpa"), torch.set_num_threads(2).
   Bandwidth: attanchor_export.bench.probes.BandwidthProbe (a 1 GiB float32 buffer read by numpy/BLAS, best of
   5 repeats of each reader) once per round; the table gives the median and max over rounds.
5. stats.py, table.py, chart.py: min / median / max of prefill and decode over rounds, each system's decode
   ratio to project-int4 (median over rounds of the same-round ratio), weights read per token (every weight
   but the token-embedding table, a gather: ONNX initializers except Gather data, GGUF tensors except
   token_embd, safetensors except embed_tokens; the project's decoder takes inputs_embeds, so it has none),
   fraction of the bound = median tok/s * bytes per token / median bandwidth, peak RSS, bytes on disk (the
   project's include embed_tokens.npy, the fp32 table an artifact ships as embed_tokens.bin), and whether
   the fp32 systems' greedy tokens agree. --json writes it all, --chart draws it (matplotlib, in the peers
   venv when the project venv has none).

Files, one job each:
    common.py        paths, BenchError, say, the child's result line (MARK, parse_child_output)
    systems.py       the systems compared, the peers' pinned versions, each family's build version
    checkpoint.py    1. the random-weight checkpoint
    venvs.py         2. the peers venv, llama-cpp-python from source, tasks run by the peers' python
    build.py         3. build() and its cache; build_project.py, build_genai.py, build_llama.py: one per family
    gguf_tasks.py    3. llama.cpp's GGUF convert / quantize / tensor bytes, run in the peers venv (and the
                        workaround for llama.cpp's converter)
    weight_bytes.py  3. the weight bytes a decode step reads (ONNX, safetensors)
    runners.py       4. one timed generate per family, and the bandwidth probe
    child.py         4. the child side of `--child TASK --spec JSON`: one JSON line
    rounds.py        4. the prompt, the children's specs, shuffled rounds of fresh processes, one record a run
    stats.py         5. runs -> summary
    table.py         5. the markdown table
    chart.py         5. the PNG chart (matplotlib here or in the peers venv)
    cli.py           the options and main()

Beside attanchor_export/bench, not inside it: the peers venv runs this package's child side (gguf_tasks,
runners, chart) and has no attanchor_runtime, which importing attanchor_export.bench loads. So every
module here imports only the standard library and this package at the top, and the rest inside the
function that needs it (tests/test_bench_peers.py runs the entry point with the standard library alone).

Not in CI (it builds and runs multi-GB models); tests/test_bench_peers.py checks the parsing and aggregation.
At 1B dims: ~25 GB of disk in CACHE, up to ~10 GB of RAM while building, ~4-6 min per round.
"""
