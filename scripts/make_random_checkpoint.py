"""Write a random-weight checkpoint at real dimensions, shard by shard, for benchmarks.

    python scripts/make_random_checkpoint.py --dims tinyllava-1b|llava-1.5-7b|qwen2.5-vl-3b
        [--dtype fp16|bf16|fp32] [--out DIR] [--seed 0] [--shard-mb 1024] [--force]

The model is never built: parameter names and shapes come from the family's transformers class
(LlavaForConditionalGeneration, Qwen2_5_VLForConditionalGeneration) on the meta device (no storage),
and each tensor is drawn, converted to --dtype and written into the current safetensors shard, which
is flushed at --shard-mb. Memory stays about one shard whatever the model size (LLaVA-1.5-7B: ~14 GB
of fp16 in 14 shards). A tied lm_head is not written (it is the embedding table, as in the Hub files).
Dimensions: attanchor_export.load.tiny_random.REAL_DIMS (tinyllava_1b_config: CLIP ViT-L/14-336 +
TinyLlama-1.1B; llava_15_7b_config: the same tower + Vicuna-7B, 32 layers, hidden 4096, 32 heads,
intermediate 11008, vocab 32064; qwen2_5_vl_3b_config: Qwen2.5-VL-3B-Instruct, 3.75 B parameters).

Values follow transformers' own initialisation (normal, std = initializer_range 0.02; norm weights 1,
biases 0), which keeps activations and logits finite at these depths. Each tensor has its own
generator seeded from (seed, name), so a shard size change does not change the weights.

The tokenizer is a tiny in-memory BPE tokenizer with its vocabulary padded by unused entries so the
special ids are the real model's. LLaVA: tiny_random's, <unk> 0, <s> 1, </s> 2, <image> 32000, <pad>
32001; the processor is the CLIP recipe (shortest edge 336, centre crop 336) with the LLaVA-1.5 chat
template. Qwen2.5-VL: tiny_qwen2_5_vl's, Qwen2's special tokens from <|endoftext|> 151643 on
(<|im_end|> 151645, <|vision_start|> 151652, <|image_pad|> 151655, ...); Qwen2.5-VL's chat template and
image processor with max_pixels 448 x 448, so the export's default grid is 448x448 (256 image tokens).
The folder is written under a temporary sibling and renamed when complete, so an interrupted run leaves
no folder that looks finished. Never in CI, never in the repo.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

IMAGE_TOKEN_ID, PAD_TOKEN_ID = 32000, 32001
# Gate floors these checkpoints declare (attanchor_config.json). Their weights follow transformers' init
# (std 0.02), so the logits of a prompt are nearly tied: any weight noise reorders them, and top-1
# agreement says nothing (int4: 0.31 at 1B, 0.12 at 7B, with logits cosine 0.79 at 7B for a correct
# graph). The cosine floors are the tiny random checkpoints' (tiny_random.RANDOM_CHECKPOINT_FLOORS);
# trained models get the floors set from tiny-vqa. Memory and time figures only, never accuracy.
BENCHMARK_FLOORS = {
    "fp16": {"cos_mean": 0.999, "top1": 0.5, "vision_cos_mean": 0.999},
    "int8": {"cos_mean": 0.98, "top1": 0.3, "vision_cos_mean": 0.99},
    "int4": {"cos_mean": 0.70, "top1": 0.0, "vision_cos_mean": 0.95},
}
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
QWEN_MAX_SIDE = 448  # the Qwen processor's max_pixels = 448 * 448: default grid 32 x 32 patches, 256 merged tokens


def padded_tokenizer(tiny, special_ids: dict[str, int]):
    """tokenizers.Tokenizer of `tiny` with its vocabulary padded by <unused{i}> entries up to the smallest of
    `special_ids`, and those added tokens renumbered to their ids there."""
    from tokenizers import Tokenizer

    data = json.loads(tiny.backend_tokenizer.to_str())
    vocab = data["model"]["vocab"]
    for i in range(len(vocab), min(special_ids.values())):
        vocab[f"<unused{i}>"] = i  # printable ASCII: valid byte-level pieces, decodable, never merged into
    for token in data["added_tokens"]:
        if token["content"] in special_ids:
            token["id"] = special_ids[token["content"]]
    return Tokenizer.from_str(json.dumps(data))


def build_tokenizer():
    """The tiny BPE tokenizer re-numbered to LLaVA's special ids (vocab padded with <unused{i}>)."""
    from transformers import PreTrainedTokenizerFast

    from attanchor_export.load.tiny_random import CHAT_TEMPLATE, build_tiny_tokenizer

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=padded_tokenizer(build_tiny_tokenizer(), {"<image>": IMAGE_TOKEN_ID, "<pad>": PAD_TOKEN_ID}),
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left", chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )
    ids = (tokenizer.convert_tokens_to_ids("<image>"), tokenizer.pad_token_id, tokenizer.bos_token_id,
           tokenizer.eos_token_id)
    if ids != (IMAGE_TOKEN_ID, PAD_TOKEN_ID, 1, 2):
        raise RuntimeError(f"tokenizer special ids came out as {ids}")
    return tokenizer


def build_qwen_tokenizer(config):
    """tiny_qwen2_5_vl's tokenizer re-numbered to Qwen2's special ids, checked against what `config` declares."""
    from transformers import PreTrainedTokenizerFast

    from attanchor_export.load.tiny_qwen2_5_vl import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tiny_qwen_tokenizer
    from attanchor_export.load.tiny_random import QWEN_FIRST_SPECIAL_ID

    ids = {token: QWEN_FIRST_SPECIAL_ID + i for i, token in enumerate(SPECIAL_TOKENS)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=padded_tokenizer(build_tiny_qwen_tokenizer(), ids), eos_token="<|im_end|>",
        pad_token="<|endoftext|>", padding_side="left", chat_template=CHAT_TEMPLATE, model_max_length=131072,
    )
    text = config.text_config
    want = {"<|image_pad|>": config.image_token_id, "<|video_pad|>": config.video_token_id,
            "<|vision_start|>": config.vision_start_token_id, "<|vision_end|>": config.vision_end_token_id,
            "<|im_end|>": text.eos_token_id, "<|endoftext|>": text.pad_token_id}
    got = {token: tokenizer.convert_tokens_to_ids(token) for token in want}
    if got != want or len(tokenizer) > text.vocab_size:
        raise RuntimeError(f"tokenizer special ids came out as {got} (config: {want}), {len(tokenizer)} tokens "
                           f"for a vocab of {text.vocab_size}")
    return tokenizer


def parameter_shapes(config) -> list[tuple[str, tuple[int, ...]]]:
    """(state-dict name, shape) of every stored tensor, from a storage-free meta-device model of the class
    the exporter loads `config` with. A tied weight is stored once, under its first name (the embedding)."""
    import torch

    from attanchor_export.families import family_for

    with torch.device("meta"):
        model = family_for(config).model_class()(config)
    seen, shapes = set(), []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            shapes.append((name, tuple(tensor.shape)))
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], dtype, seed: int, std: float):
    import torch

    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1:  # norm weights (biases handled above)
        return torch.ones(shape, dtype=dtype)
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    out = torch.empty(shape, dtype=dtype)
    rows = max(1, (64 << 20) // (4 * max(1, out[0].numel())))  # draw in fp32 slabs of ~64 MB, not all at once
    for start in range(0, shape[0], rows):
        out[start:start + rows] = torch.randn((min(rows, shape[0] - start), *shape[1:]), generator=generator) * std
    return out


def write_shards(shapes, folder: Path, dtype, seed: int, std: float, shard_bytes: int, log=print) -> int:
    """Writes model-XXXXX-of-YYYYY.safetensors + the index; returns the bytes written."""
    import torch
    from safetensors.torch import save_file

    sizes = [(n, s, torch.Size(s).numel() * dtype.itemsize) for n, s in shapes]
    groups, current, current_bytes = [], [], 0
    for name, shape, nbytes in sizes:
        if current and current_bytes + nbytes > shard_bytes:
            groups.append(current)
            current, current_bytes = [], 0
        current.append((name, shape))
        current_bytes += nbytes
    groups.append(current)
    weight_map, total = {}, 0
    for i, group in enumerate(groups, 1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: random_tensor(name, shape, dtype, seed, std) for name, shape in group}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
        log(f"  {file}: {len(group)} tensors, {total / 1e9:.2f} GB so far")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def make_random_checkpoint(dims: str, out: Path, dtype: str = "fp16", seed: int = 0, shard_mb: int = 1024,
                           force: bool = False, log=print, config=None) -> Path:
    """`config`: for tests only, a smaller config of the same family in place of REAL_DIMS[dims]()."""
    import torch

    from attanchor_export.load.tiny_random import REAL_DIMS

    out = Path(out)
    if out.exists():
        if not force:
            raise FileExistsError(f"{out} exists (pass --force to rebuild it)")
        shutil.rmtree(out)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)

    t0 = time.perf_counter()
    config = config if config is not None else REAL_DIMS[dims]()
    qwen = config.model_type == "qwen2_5_vl"
    tokenizer = build_qwen_tokenizer(config) if qwen else build_tokenizer()
    for part in (config, config.text_config, config.vision_config):
        part.dtype = DTYPES[dtype]
    shapes = parameter_shapes(config)
    params = sum(torch.Size(s).numel() for _, s in shapes)
    log(f"{dims}: {len(shapes)} tensors, {params / 1e9:.2f} B parameters, {dtype}")
    std = config.text_config.initializer_range
    total = write_shards(shapes, staging, getattr(torch, DTYPES[dtype]), seed, std, shard_mb << 20, log)
    config.save_pretrained(staging)
    (save_qwen_processor if qwen else save_llava_processor)(staging, config, tokenizer)
    (staging / "attanchor_config.json").write_text(json.dumps({"gate_floors": BENCHMARK_FLOORS}, indent=2))
    staging.rename(out)
    log(f"wrote {out} ({total / 1e9:.2f} GB of weights) in {time.perf_counter() - t0:.0f} s")
    return out


def save_llava_processor(folder: Path, config, tokenizer) -> None:
    from transformers import GenerationConfig, LlavaProcessor

    from attanchor_export.load.tiny_random import CHAT_TEMPLATE, image_processor

    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=PAD_TOKEN_ID).save_pretrained(folder)
    LlavaProcessor(
        image_processor=image_processor("clip-llama", config), tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=CHAT_TEMPLATE,
    ).save_pretrained(folder)


def save_qwen_processor(folder: Path, config, tokenizer) -> None:
    """Qwen2.5-VL-3B-Instruct's generation config (EOS <|im_end|> or <|endoftext|>), tokenizer, chat template
    and image processor at min_pixels 56 x 56 / max_pixels QWEN_MAX_SIDE ** 2 (the default export grid)."""
    from transformers import GenerationConfig

    from attanchor_export.load.tiny_qwen2_5_vl import save_processor_files, tiny_qwen_image_processor

    text = config.text_config
    GenerationConfig(bos_token_id=text.bos_token_id, eos_token_id=[text.eos_token_id, text.pad_token_id],
                     pad_token_id=text.pad_token_id).save_pretrained(folder)
    save_processor_files(folder, tokenizer, tiny_qwen_image_processor(max_pixels=QWEN_MAX_SIDE**2))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", choices=["tinyllava-1b", "llava-1.5-7b", "qwen2.5-vl-3b"], default="tinyllava-1b")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    parser.add_argument("--out", type=Path, help="output folder (default /tmp/<dims>-random-<dtype>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-mb", type=int, default=1024)
    parser.add_argument("--force", action="store_true", help="rebuild an existing folder")
    args = parser.parse_args(argv)
    out = args.out or Path(f"/tmp/{args.dims}-random-{args.dtype}")
    try:
        make_random_checkpoint(args.dims, out, args.dtype, args.seed, args.shard_mb, args.force)
    except FileExistsError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
