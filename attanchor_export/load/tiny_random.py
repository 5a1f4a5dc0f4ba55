"""Tiny random LLaVA checkpoints built with the real transformers classes, for tests and demos.

`make_tiny_llava(path)` writes a folder that loads like a Hub checkpoint: config.json,
model.safetensors, generation_config.json, tokenizer.json + tokenizer_config.json,
processor_config.json (transformers 5 nests the image processor settings in it; there is no
separate preprocessor_config.json) and chat_template.jinja. Nothing is downloaded.

Three families; the first two cover LLaVA's two vision-feature conventions, the third a decoder:
  clip-llama    CLIP tower (has a CLS token) + Llama decoder, feature layer -2, strategy "default"
                (CLS dropped), image 30 / patch 6 -> M = 25 image tokens; untied lm_head (like TinyLlama)
  siglip-qwen2  SigLIP tower (no CLS) + Qwen2 decoder (q/k/v bias), feature layer -1, strategy "full",
                image 32 / patch 8 -> M = 16 image tokens; lm_head tied to the embeddings (like
                Qwen2-0.5B), so exporters see a shared weight
  clip-mistral  as clip-llama with a Mistral decoder (the LLaVA-1.6-Mistral family), no sliding window

Weights are re-drawn from a seeded generator with a much larger std than transformers' 0.02 init:
at 0.02 the decoder's output barely depends on its input and greedy decoding repeats one token.
With embeddings at std 1 and decoder linears at 3/sqrt(fan_in) the tiny models generate varied tokens,
and the cosine between a text embedding and a projected image feature (dim 64) spreads to about
+-0.4, so the paper's threshold 0.12 inserts anchors for most text tokens while 0.3 inserts a few;
tests/test_source_model.py checks both properties.

`tinyllava_1b_config()` is the LlavaConfig of bczhou/tiny-llava-v1-hf, for benchmarks with random
weights (1.4 B parameters: never build it in CI); REAL_DIMS lists it with LLaVA-1.5-7B's and
Qwen2.5-VL-3B's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Words the tiny tokenizer learns whole: typical VQA prompts and captions. BPE merges are learned from
# this text in memory, so the tokenizer is deterministic and needs no download.
_CORPUS = """
USER: ASSISTANT: USER: ASSISTANT: USER: ASSISTANT: What is in the image? Describe the image in detail. Describe this picture briefly.
What is shown in the photo? How many people are there? How many cats are on the sofa? What color is the car?
Is there a dog in the picture? Where is the cat sitting? What is the man holding? What is the woman doing?
What animal is this? Is it day or night? What is written on the sign? What is on the table?
Which object is on the left? Which object is on the right? What is in the background? Is the sky blue?
The image shows a red car parked next to a green tree. A cat is sleeping on a brown sofa.
There are two people walking a dog in the park. The photo shows a plate of food with bread and fruit.
A small boat is floating on the water near the mountains. The sign says stop. It is a sunny day.
a an the of and or in on at to with near next under over behind front left right top bottom middle
yes no one two three four five six seven eight nine ten many some few
red green blue yellow black white brown orange purple pink gray color colour
cat dog bird horse cow sheep person people man woman child boy girl car bus truck bike boat plane train
tree flower grass sky cloud sun water river sea beach mountain road street building house room table chair
sofa bed window door wall floor kitchen food plate cup bottle book phone computer screen clock sign
is are was were be it this that these those there here what which who where when why how do does can
see look show shows picture photo image scene object thing animal sitting standing walking holding
""".split("\n")

_IMAGE_TOKEN = "<image>"
_SPECIAL_FIRST = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in Llama tokenizers
_SPECIAL_LAST = [_IMAGE_TOKEN, "<pad>"]  # appended after the vocab, as tiny-llava-v1-hf does (32000, 32001)

# LLaVA-1.5 layout: "USER: <image>\n{question}\nASSISTANT:". BOS comes from the tokenizer's post-processor
# (Llama style), not from the template, so `tokenizer(prompt)` and the runtime agree.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}USER: {% elif message['role'] == 'assistant' -%}ASSISTANT: {% endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}<image>{{ '\\n' }}{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{ eos_token }}{%- endif -%}{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}"
)

FAMILIES = ("clip-llama", "siglip-qwen2", "clip-mistral")

# Accuracy-gate floors these checkpoints support, declared in their attanchor_config.json (exporter.
# checkpoint_defaults). Their decoder weights are chaotic by construction (see _redraw_weights), so a
# correct int4 graph reaches only cos 0.77-0.81 / top-1 0.25-0.35 against fp32 (10 % weight noise gives
# the same), while a broken one (4x scales) lands at 0.62-0.67; docs/QUANTIZATION.md has the table.
# Trained models get precision.gate.GATE_FLOORS, set from tiny-vqa.
RANDOM_CHECKPOINT_FLOORS = {
    "fp16": {"cos_mean": 0.999, "top1": 0.95, "vision_cos_mean": 0.999},
    "int8": {"cos_mean": 0.98, "top1": 0.70, "vision_cos_mean": 0.99},
    "int4": {"cos_mean": 0.70, "top1": 0.15, "vision_cos_mean": 0.95},
}


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer (Qwen2/GPT-2 style pieces) trained in memory on _CORPUS.

    Returns a transformers PreTrainedTokenizerFast with <s>/</s>/<unk>/<pad> set and <image> as a
    special token; BOS is prepended by the post-processor.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,  # an upper bound: the trainer stops when no pair repeats
        special_tokens=_SPECIAL_FIRST,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([line for line in _CORPUS if line], trainer)
    tok.add_special_tokens(_SPECIAL_LAST)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": _IMAGE_TOKEN},
        padding_side="left",  # batched generation left-pads, as HF LLaVA examples do
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )


def tiny_llava_config(family: str = "clip-llama", tokenizer=None, text_dims: dict | None = None,
                      vision_dims: dict | None = None):
    """LlavaConfig of the tiny `family` model, token ids taken from `tokenizer` (default: the tiny one).
    `text_dims` overrides decoder sizes (hidden_size, intermediate_size, num_hidden_layers, ...);
    `vision_dims` the tower's."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        MistralConfig,
        Qwen2Config,
        SiglipVisionConfig,
    )

    tokenizer = tokenizer or build_tiny_tokenizer()
    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    decoder = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, **ids,
    )
    decoder.update(text_dims or {})
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_channels=3)
    tower.update(vision_dims or {})
    if family == "clip-llama":
        vision = CLIPVisionConfig(image_size=30, patch_size=6, projection_dim=32, **tower)
        text = LlamaConfig(tie_word_embeddings=False, **decoder)
        layer, strategy = -2, "default"
    elif family == "clip-mistral":  # the LLaVA-1.6-Mistral decoder family; full attention, no window
        vision = CLIPVisionConfig(image_size=30, patch_size=6, projection_dim=32, **tower)
        text = MistralConfig(tie_word_embeddings=False, sliding_window=None, **decoder)
        layer, strategy = -2, "default"
    elif family == "siglip-qwen2":
        vision = SiglipVisionConfig(image_size=32, patch_size=8, vision_use_head=False, **tower)
        text = Qwen2Config(tie_word_embeddings=True, use_sliding_window=False, **decoder)
        layer, strategy = -1, "full"
    else:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(FAMILIES)}")
    patches = (vision.image_size // vision.patch_size) ** 2
    has_cls = family.startswith("clip-")
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(_IMAGE_TOKEN),
        image_seq_length=patches + int(has_cls) - int(strategy == "default"),
        vision_feature_layer=layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        tie_word_embeddings=text.tie_word_embeddings,
    )


@torch.no_grad()
def _redraw_weights(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter from a seeded generator, in name order, so weights depend only on `seed`.

    Large std on purpose (see module docstring): decoder matrices ~ N(0, 3/sqrt(fan_in)), tower, projector
    and lm_head matrices ~ N(0, 1/sqrt(fan_in)), token/position tables and CLS ~ N(0, 1), norm gains
    1 + N(0, 0.1), biases N(0, 0.1).
    """
    gen = torch.Generator().manual_seed(seed)
    tied = bool(model.config.get_text_config().tie_word_embeddings)
    for name, p in sorted(model.named_parameters()):  # named_parameters skips the tied lm_head
        if name.endswith("embed_tokens.weight") and tied:
            # The table doubles as lm_head: at std 1 the logits reach +-36 and float32 rounding alone
            # exceeds the 1e-4 parity bound; 1/sqrt(hidden) keeps logits near unit scale, like untied heads.
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
        elif name.endswith(("embed_tokens.weight", "position_embedding.weight", "class_embedding")):
            p.copy_(torch.randn(p.shape, generator=gen))
        elif p.ndim >= 2:
            # The decoder needs the large gain; the tower and projector keep ~unit gain so image features
            # stay near the embeddings' scale (norm ~10, not ~1000) and fp32 parity stays meaningful.
            gain = 3.0 if "language_model" in name else 1.0
            p.copy_(torch.randn(p.shape, generator=gen) * (gain / p[0].numel() ** 0.5))
        elif name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        else:  # LayerNorm / RMSNorm gains
            p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.1)


def image_processor(family: str, config):
    from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

    size = config.vision_config.image_size
    if family.startswith("clip-"):
        # Same recipe as LLaVA-1.5's CLIP preprocessing, scaled down: resize shortest edge, centre crop.
        return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return SiglipImageProcessorPil(size={"height": size, "width": size})


def make_tiny_llava(path, family: str = "clip-llama", seed: int = 0, text_dims: dict | None = None,
                    dtype: torch.dtype | None = None, vision_dims: dict | None = None) -> Path:
    """Build a tiny random LlavaForConditionalGeneration of `family`, save it to `path`, return the path.

    The folder loads with LlavaForConditionalGeneration/AutoProcessor/AutoTokenizer.from_pretrained.
    The processor expands one <image> into exactly M image tokens (as HF generate needs).
    `text_dims`, `vision_dims`: decoder and tower size overrides (tiny_llava_config); `dtype`: the
    weights' stored dtype (fp32).
    """
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    config = tiny_llava_config(family, tokenizer, text_dims, vision_dims)

    torch.manual_seed(seed)  # construction draws from the global RNG; the redraw below is what counts
    model = LlavaForConditionalGeneration(config).eval()
    _redraw_weights(model, seed)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if dtype is not None:
        model.to(dtype)
    model.save_pretrained(path)

    processor = LlavaProcessor(
        image_processor=image_processor(family, config),
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1 if family.startswith("clip-") else 0,  # CLIP's CLS; SigLIP has none
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(path)
    (path / "attanchor_config.json").write_text(json.dumps({"gate_floors": RANDOM_CHECKPOINT_FLOORS}, indent=2))
    return path


def tinyllava_1b_config():
    """LlavaConfig at the dimensions of bczhou/tiny-llava-v1-hf (TinyLlama-1.1B + CLIP ViT-L/14-336).

    For benchmarks with random weights; M = (336/14)^2 = 576 image tokens.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )
    text = LlamaConfig(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, vocab_size=32064, max_position_embeddings=2048, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, pad_token_id=32001, tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=32000,
        image_seq_length=576,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def llava_15_7b_config():
    """LlavaConfig at the dimensions of llava-hf/llava-1.5-7b-hf (Vicuna-7B + CLIP ViT-L/14-336).

    Vicuna-7B: 32 layers, hidden 4096, 32 heads (no GQA), intermediate 11008, vocab 32064. For
    benchmarks with random weights (scripts/make_random_checkpoint.py); M = 576 image tokens."""
    from transformers import LlamaConfig

    config = tinyllava_1b_config()
    config.text_config = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, pad_token_id=32001, tie_word_embeddings=False,
    )
    return config


# Qwen2 tokenizers number their special tokens from <|endoftext|> = 151643 on, in the order of
# tiny_qwen2_5_vl.SPECIAL_TOKENS: <|im_end|> 151645, <|vision_start|> 151652, <|image_pad|> 151655, ...
QWEN_FIRST_SPECIAL_ID = 151643


def qwen2_5_vl_3b_config(text_overrides: dict | None = None, vision_overrides: dict | None = None):
    """Qwen2_5_VLConfig of Qwen/Qwen2.5-VL-3B-Instruct (its config.json; transformers' defaults are 72B's).

    Text: Qwen2, 36 layers, hidden 2048, 16 heads / 2 KV heads (head_dim 128), intermediate 11008, vocab
    151936, rope_theta 1e6, mrope_section [16, 24, 24], lm_head tied to the embeddings. Vision: 32 blocks,
    hidden 1280, 16 heads, intermediate 3420, SiLU, patch 14, temporal patch 2, merge 2, windows of 112
    pixels, full attention in blocks 7, 15, 23 and 31, merged to 2048. 3.75 B parameters. For benchmarks
    with random weights (scripts/make_random_checkpoint.py --dims qwen2.5-vl-3b). The overrides (tests only)
    change text / vision config fields: a few layers of the same layout, special ids and vocabulary kept."""
    from transformers import Qwen2_5_VLConfig

    special = QWEN_FIRST_SPECIAL_ID
    text = dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
        num_key_value_heads=2, max_position_embeddings=128000, rms_norm_eps=1e-6, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        bos_token_id=special, eos_token_id=special + 2, pad_token_id=special, tie_word_embeddings=True,
        use_sliding_window=False, max_window_layers=70,
    )
    vision = dict(
        depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, temporal_patch_size=2,
        spatial_merge_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31], out_hidden_size=2048,
        in_channels=3, hidden_act="silu", tokens_per_second=2,
    )
    text.update(text_overrides or {})
    vision.update(vision_overrides or {})
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=special + 12, video_token_id=special + 13,
        vision_start_token_id=special + 9, vision_end_token_id=special + 10, tie_word_embeddings=True,
    )
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return config


# Real-dimension configs for random-weight benchmarks, by the name scripts take.
REAL_DIMS = {"tinyllava-1b": tinyllava_1b_config, "llava-1.5-7b": llava_15_7b_config,
             "qwen2.5-vl-3b": qwen2_5_vl_3b_config}
