"""Tiny random Qwen2.5-VL and Qwen2-VL checkpoints, built with the real transformers classes, for tests.

`make_tiny_qwen2_5_vl(path)` writes a folder that loads like a Hub checkpoint: config.json,
model.safetensors, generation_config.json, tokenizer.json + tokenizer_config.json,
preprocessor_config.json (Qwen2VLImageProcessor settings) and chat_template.jinja (Qwen2.5-VL's own
template). No processor_config.json: transformers' Qwen2_5_VLProcessor cannot be built without
torchvision (its video processor), so the processor's settings live in the image processor's file,
which AutoImageProcessor loads as Qwen2VLImageProcessorPil. Nothing is downloaded.

What it exercises, scaled down from Qwen2.5-VL-3B:
  vision   4 blocks, hidden 32, 4 heads, patch 14, temporal patch 2, merge 2; window_size 56 = 2x2
           merged patches per window, so a 112x112 image (8x8 patches, 4x4 merged) has 4 windows and
           an 84x140 one (3x5 merged) has 6 uneven ones; blocks 1 and 3 attend over the whole image
           (fullatt_block_indexes), 0 and 2 within windows; patch merger to the text width 64.
  text     Qwen2 decoder with q/k/v biases, hidden 64, 4 heads / 2 KV heads (GQA), head_dim 16,
           mrope_section [2, 3, 3] (sums to head_dim / 2), lm_head tied to the embeddings (as in 3B).
           rope_theta 100 instead of 1e6: with head_dim 16 the w section gets the lowest frequencies,
           and at 1e6 a swapped h/w position would move the logits by ~1e-5 only; at 100 a position
           mistake changes the tokens, so end-to-end tests see it.
  tokens   the tiny byte-level BPE of tiny_random plus Qwen's special tokens (<|im_start|>,
           <|im_end|>, <|vision_start|>, <|image_pad|>, ...); no BOS, as Qwen2 tokenizers.
The processor's max_pixels is 112*112, so the default export size rule gives 112x112 (M = 16).
Weights are redrawn as tiny_random's (large std: varied tokens, anchors at the paper's thresholds).

`make_tiny_qwen2_vl(path)` writes the Qwen2VLForConditionalGeneration sibling with the same tokenizer,
processor, chat template and text model (the parts Qwen2-VL shares); its tower is Qwen2-VL's
(4 blocks, embed_dim 32, LayerNorm, quick-GELU MLP of mlp_ratio 2, every block attending over the whole
image, patch merger to the text width 64; in Qwen2VLVisionConfig `hidden_size` is that output width).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from attanchor_export.load.tiny_random import _CORPUS, RANDOM_CHECKPOINT_FLOORS, _redraw_weights

# Qwen2.5-VL-3B-Instruct's chat template (chat_template.json), verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2 tokenizers' special tokens, in their vocabulary order (151643 ...).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
_CHAT_WORDS = "system user assistant You are a helpful assistant."

IMAGE_SIZE = 112  # default export side of the tiny checkpoint (its processor's max_pixels = 112 * 112)


def build_tiny_qwen_tokenizer():
    """Byte-level BPE trained in memory on tiny_random's corpus (+ ChatML role words), Qwen2 special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([line for line in _CORPUS if line] + [_CHAT_WORDS], trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )


def _tiny_text_config(tokenizer) -> dict:
    """The Qwen2 text model both generations share."""
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 100.0, "mrope_section": [2, 3, 3]},
        bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
        tie_word_embeddings=True, use_sliding_window=False,
    )


def _special_token_ids(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


def tiny_qwen2_5_vl_config(tokenizer=None):
    from transformers import Qwen2_5_VLConfig

    tokenizer = tokenizer or build_tiny_qwen_tokenizer()
    vision = dict(
        depth=4, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=14, temporal_patch_size=2,
        spatial_merge_size=2, window_size=56, fullatt_block_indexes=[1, 3], out_hidden_size=64, in_channels=3,
        hidden_act="silu",
    )
    return Qwen2_5_VLConfig(text_config=_tiny_text_config(tokenizer), vision_config=vision,
                            tie_word_embeddings=True, **_special_token_ids(tokenizer))


def tiny_qwen2_vl_config(tokenizer=None):
    from transformers import Qwen2VLConfig

    tokenizer = tokenizer or build_tiny_qwen_tokenizer()
    text_config = _tiny_text_config(tokenizer)
    # Qwen2-VL's vision hidden_size is the merger's output: the text model's width.
    vision = dict(depth=4, embed_dim=32, hidden_size=text_config["hidden_size"], mlp_ratio=2, num_heads=4, patch_size=14,
                  temporal_patch_size=2, spatial_merge_size=2, in_channels=3, hidden_act="quick_gelu")
    return Qwen2VLConfig(text_config=text_config, vision_config=vision, tie_word_embeddings=True,
                         **_special_token_ids(tokenizer))


def tiny_qwen_image_processor(max_pixels: int = IMAGE_SIZE * IMAGE_SIZE, min_pixels: int = 56 * 56):
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)


def save_processor_files(path: Path, tokenizer, image_processor) -> None:
    """tokenizer.json + tokenizer_config.json, chat_template.jinja and preprocessor_config.json: what the
    exporter and the runtime read of a Qwen2.5-VL checkpoint (no processor_config.json: module docstring)."""
    tokenizer.save_pretrained(path)
    (Path(path) / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    image_processor.save_pretrained(path)


def make_tiny_qwen2_5_vl(path, seed: int = 0) -> Path:
    """Build the tiny random Qwen2_5_VLForConditionalGeneration, save it to `path`, return the path."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    return _make(path, seed, tiny_qwen2_5_vl_config, Qwen2_5_VLForConditionalGeneration)


def make_tiny_qwen2_vl(path, seed: int = 0) -> Path:
    """Build the tiny random Qwen2VLForConditionalGeneration, save it to `path`, return the path."""
    from transformers import Qwen2VLForConditionalGeneration

    return _make(path, seed, tiny_qwen2_vl_config, Qwen2VLForConditionalGeneration)


def _make(path, seed: int, make_config, model_class) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_qwen_tokenizer()
    config = make_config(tokenizer)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    _redraw_weights(model, seed)
    gen = model.generation_config
    gen.bos_token_id = config.text_config.bos_token_id
    gen.eos_token_id = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    gen.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    save_processor_files(path, tokenizer, tiny_qwen_image_processor())
    (path / "attanchor_config.json").write_text(json.dumps({"gate_floors": RANDOM_CHECKPOINT_FLOORS}, indent=2))
    return path
