"""Chat templates: find the one saved with a model and render it as transformers does.

``PromptFormatter.format_chat(question)`` == ``processor.apply_chat_template(messages,
add_generation_prompt=True)`` for one user turn ``[{"type": "image"}, {"type": "text", "text": question}]``,
rendered with the same sandboxed jinja2 environment (trim_blocks, lstrip_blocks, loopcontrols,
``{% generation %}``, ``raise_exception``, ``strftime_now``, ``tojson``) and the special-token strings
as variables. Without a saved template the LLaVA-1.5 prompt ``USER: <image>\\n{question}\\nASSISTANT:``
is used.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import ArtifactError, RuntimeInputError

__all__ = [
    "DEFAULT_IMAGE_TOKEN",
    "LLAVA_PROMPT",
    "LLAVA_TEXT_PROMPT",
    "PromptFormatter",
    "find_chat_template",
    "read_json_object",
    "render_chat_template",
    "template_from_value",
]

DEFAULT_IMAGE_TOKEN = "<image>"
# LLaVA-1.5 / tiny-llava-v1-hf prompts, used when no chat template is saved.
LLAVA_PROMPT = "USER: {image_token}\n{question}\nASSISTANT:"
LLAVA_TEXT_PROMPT = "USER: {question}\nASSISTANT:"


def _compile_template(template: str):
    """A jinja2 template compiled the way transformers' chat templates are (utils/chat_template_utils.py)."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for masks; it renders its body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot store attribute {name!r} on a namespace")

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(template)


def render_chat_template(
    template: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    special_tokens: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> str:
    """Render `template` as transformers' ``apply_chat_template(..., tokenize=False)`` does."""
    variables = {**(special_tokens or {}), **kwargs}
    return _compile_template(template).render(
        messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **variables
    )


def template_from_value(value: Any, source: str) -> str | None:
    """A chat template string from a tokenizer_config / chat_template.json value (str, list or dict)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):  # [{"name": ..., "template": ...}, ...]
        value = {item["name"]: item["template"] for item in value}
    if isinstance(value, Mapping):
        if "default" in value:
            return value["default"]
        if len(value) == 1:
            return next(iter(value.values()))
        raise ArtifactError(f"{source} has several chat templates ({', '.join(value)}) and none named 'default'")
    raise ArtifactError(f"{source}: unsupported chat_template value of type {type(value).__name__}")


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object file saved with the model (also used for tokenizer_config.json by the tokenizer)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} must hold a JSON object")
    return data


def find_chat_template(folder: str | os.PathLike) -> str | None:
    """The chat template saved in `folder`, or None.

    Order (processor files first, as transformers' processors resolve them): chat_template.jinja,
    chat_template.json, processor_config.json, tokenizer_config.json.
    """
    folder = Path(folder)
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            template = template_from_value(read_json_object(path).get("chat_template"), str(path))
            if template is not None:
                return template
    return None


class PromptFormatter:
    """Renders one user turn (optionally with one image) plus the generation prompt.

    ``template=None`` uses the LLaVA-1.5 prompt. ``special_tokens`` are the named special-token strings
    transformers passes to templates (``{"bos_token": "<s>", "eos_token": "</s>", ...}``).
    """

    def __init__(
        self,
        template: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
        image_token: str = DEFAULT_IMAGE_TOKEN,
    ) -> None:
        self.template = template
        self.special_tokens = dict(special_tokens or {})
        self.image_token = image_token
        self._compiled = None
        if template is not None:
            try:
                self._compiled = _compile_template(template)
            except Exception as exc:  # jinja2.TemplateSyntaxError
                raise ArtifactError(f"chat template does not compile: {exc}") from exc

    @staticmethod
    def messages(question: str, with_image: bool = True) -> list[dict[str, Any]]:
        """The HF-style conversation `format_chat` renders."""
        content: list[dict[str, Any]] = [{"type": "image"}] if with_image else []
        content.append({"type": "text", "text": question})
        return [{"role": "user", "content": content}]

    def format_chat(self, question: str, with_image: bool = True) -> str:
        if not isinstance(question, str):
            raise RuntimeInputError(f"the question must be a string, got {type(question).__name__}")
        if self._compiled is None:
            if with_image:
                return LLAVA_PROMPT.format(image_token=self.image_token, question=question)
            return LLAVA_TEXT_PROMPT.format(question=question)
        return self.format_messages(self.messages(question, with_image))

    def format_messages(self, messages: list[dict[str, Any]]) -> str:
        """A whole conversation (system prompt, earlier turns) plus the generation prompt.

        `messages` as transformers takes them: ``{"role", "content"}`` with content a string or a list of
        ``{"type": "image"}`` / ``{"type": "text", "text": ...}`` parts. Without a saved template, turns are
        written in the LLaVA-1.5 style, so one user turn renders exactly as `format_chat`.
        """
        if self._compiled is not None:
            return self._compiled.render(
                messages=messages, tools=None, documents=None, add_generation_prompt=True, **self.special_tokens
            )
        eos = self.special_tokens.get("eos_token", "")
        lines = []
        for message in messages:
            content = message["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            text = "".join(p["text"] for p in parts if p["type"] == "text")
            image = "".join(f"{self.image_token}\n" for p in parts if p["type"] == "image")
            if message["role"] == "user":
                lines.append(f"USER: {image}{text}\n")
            elif message["role"] == "assistant":
                lines.append(f"ASSISTANT: {text}{eos}\n")
            else:  # system: a plain line before the turns
                lines.append(f"{text}\n")
        return "".join(lines) + "ASSISTANT:"
