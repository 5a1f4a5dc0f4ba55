"""Write a random-weight LLaVA checkpoint at TinyLLaVA-1B dimensions, for benchmarks.

    python scripts/make_tinyllava_checkpoint.py [--out /tmp/tinyllava-1b-random] [--seed 0] [--force]

The model is transformers' LlavaForConditionalGeneration built from
attanchor_export.load.tiny_random.tinyllava_1b_config() (CLIP ViT-L/14-336 tower, 576 image tokens,
TinyLlama-1.1B decoder: 22 layers, hidden 2048, 32/4 heads, vocab 32064), weights from transformers'
own initialisation (normal, std = initializer_range 0.02), which keeps every activation and logit
finite through all 22 layers (checked before saving). About 1.4 B parameters: ~5.6 GB of fp32
safetensors, ~6 GB of RAM and a minute or two to build on 2 cores. Never in CI, never in the repo.

The tokenizer is the tiny in-memory BPE tokenizer of attanchor_export.load.tiny_random with its vocabulary
padded by unused entries so the special ids are those of bczhou/tiny-llava-v1-hf: <unk> 0, <s> 1,
</s> 2, <image> 32000, <pad> 32001. The processor is the CLIP recipe (shortest edge 336, centre
crop 336) with the LLaVA-1.5 chat template, as make_tiny_llava writes it.

The folder is written under a temporary sibling and renamed when complete, so an interrupted run
leaves no folder that looks finished.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

DEFAULT_OUT = Path("/tmp/tinyllava-1b-random")
IMAGE_TOKEN_ID, PAD_TOKEN_ID = 32000, 32001


def build_tokenizer():
    """The tiny BPE tokenizer re-numbered to TinyLLaVA's special ids (vocab padded with <unused{i}>)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from attanchor_export.load.tiny_random import CHAT_TEMPLATE, build_tiny_tokenizer

    tiny = build_tiny_tokenizer()
    data = json.loads(tiny.backend_tokenizer.to_str())
    vocab = data["model"]["vocab"]
    for i in range(len(vocab), IMAGE_TOKEN_ID):
        vocab[f"<unused{i}>"] = i  # printable ASCII: valid byte-level pieces, decodable, never merged into
    for token in data["added_tokens"]:
        if token["content"] == "<image>":
            token["id"] = IMAGE_TOKEN_ID
        elif token["content"] == "<pad>":
            token["id"] = PAD_TOKEN_ID
    backend = Tokenizer.from_str(json.dumps(data))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )
    ids = (tokenizer.convert_tokens_to_ids("<image>"), tokenizer.pad_token_id, tokenizer.bos_token_id,
           tokenizer.eos_token_id)
    if ids != (IMAGE_TOKEN_ID, PAD_TOKEN_ID, 1, 2):
        raise RuntimeError(f"tokenizer special ids came out as {ids}")
    return tokenizer


def make_tinyllava_checkpoint(out: Path = DEFAULT_OUT, seed: int = 0, force: bool = False, log=print) -> Path:
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from attanchor_export.load.tiny_random import CHAT_TEMPLATE, _image_processor, tinyllava_1b_config

    out = Path(out)
    if out.exists():
        if not force:
            raise FileExistsError(f"{out} exists (pass --force to rebuild it)")
        shutil.rmtree(out)
    staging = out.with_name(out.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)

    tokenizer = build_tokenizer()
    config = tinyllava_1b_config()
    if config.text_config.vocab_size < len(tokenizer):
        raise RuntimeError(f"tokenizer has {len(tokenizer)} ids, the config's vocab is {config.text_config.vocab_size}")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    params = sum(p.numel() for p in model.parameters())
    log(f"built LlavaForConditionalGeneration, {params / 1e9:.2f} B parameters, in {time.perf_counter() - t0:.0f} s")

    # Finite logits through the whole decoder (a cheap 8-token forward), before spending disk on it.
    with torch.no_grad():
        logits = model.model.language_model(input_ids=torch.arange(1, 9)[None]).last_hidden_state
        logits = model.lm_head(logits)
    if not torch.isfinite(logits).all():
        raise RuntimeError("random-weight model produced non-finite logits")
    log(f"logits finite, std {float(logits.std()):.3g}")

    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    t0 = time.perf_counter()
    model.save_pretrained(staging)  # safetensors
    processor = LlavaProcessor(
        image_processor=_image_processor("clip-llama", config),
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(staging)
    staging.rename(out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"wrote {out} ({size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild an existing folder")
    args = parser.parse_args(argv)
    try:
        make_tinyllava_checkpoint(args.out, args.seed, args.force)
    except FileExistsError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
