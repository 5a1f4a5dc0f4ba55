"""The OpenAI chat-completions request, as pydantic models, and how it becomes the runtime's conversation.

Fields the OpenAI API has and this server does not act on are accepted and ignored when they are left at
their defaults (`user`, `logprobs: false`, penalties of 0, ...); set to something this server cannot do,
they are refused (400) rather than silently dropped. AttAnchor's extra: `threshold`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import APIError


class ImageURL(BaseModel):
    url: str
    detail: str | None = None  # accepted; the model sees one fixed resolution


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    seed: int | None = None
    threshold: float | None = None  # AttAnchor: anchor threshold for this request (null = the artifact's)
    ignore_eos: bool = False  # vLLM's extension: generate past EOS up to max_tokens (load tests, benchmarks)
    # Accepted at their defaults only (see the module docstring).
    frequency_penalty: float | None = 0
    presence_penalty: float | None = 0
    logprobs: bool | None = False
    tools: list | None = None

    def check(self) -> None:
        """What the schema alone cannot say; APIError(400) naming the field."""
        if self.n != 1:
            raise APIError(400, f"n = {self.n}: this server returns one choice per request (n = 1)", param="n")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 4:
            raise APIError(400, f"stop holds {len(stops)} strings; at most 4", param="stop")
        if self.threshold is not None and not -1e30 < self.threshold < 1e30:
            raise APIError(400, "threshold must be a finite number", param="threshold")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported by this server (leave it at 0)", param=name)
        if self.logprobs:
            raise APIError(400, "logprobs are not supported by this server", param="logprobs")
        if self.tools:
            raise APIError(400, "tools are not supported by this server", param="tools")

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


def conversation(messages: list[Message]) -> tuple[list[dict], str]:
    """OpenAI messages -> (the runtime's messages for the chat template, the one image's URL).

    The image goes first in its user message, whatever the order of the parts: LLaVA-family models (and
    `Pipeline.chat`) put the image before the question, and AttAnchor anchors only text after the image.
    Exactly one image per request (the runtime takes one image per prompt row; text-only and multi-image
    prompts are not supported yet).
    """
    turns, images = [], []
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        content = message.content
        if content is None:
            raise APIError(400, f"messages[{i}] has no content", param=f"messages[{i}].content")
        parts = [ContentPart(type="text", text=content)] if isinstance(content, str) else content
        texts, urls = [], []
        for j, part in enumerate(parts):
            if part.type == "text":
                if part.text is None:
                    raise APIError(400, f"messages[{i}].content[{j}] is a text part without text",
                                   param=f"messages[{i}].content[{j}].text")
                texts.append(part.text)
            else:
                if part.image_url is None:
                    raise APIError(400, f"messages[{i}].content[{j}] is an image_url part without image_url",
                                   param=f"messages[{i}].content[{j}].image_url")
                if role != "user":
                    raise APIError(400, f"messages[{i}] ({role}) holds an image; only user messages may",
                                   param=f"messages[{i}].content")
                urls.append(part.image_url.url)
        images += urls
        turns.append({"role": role, "content": [{"type": "image"} for _ in urls]
                      + [{"type": "text", "text": t} for t in texts]})
    if len(images) != 1:
        raise APIError(400, f"this model takes exactly one image per request (an image_url content part in a user "
                            f"message); the request has {len(images)}", code="image_count", param="messages")
    if turns[-1]["role"] != "user":
        raise APIError(400, "the last message must be the user's", param="messages")
    return turns, images[0]
