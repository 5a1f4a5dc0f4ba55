"""What `attanchor-export serve` can be told: one frozen record shared by the app, the scheduler and Ray.

Plain data (no FastAPI), so the CLI and a Ray driver build it without importing the server. The API key is
kept out of repr() so that no log line or traceback prints it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MiB = 2**20


@dataclass(frozen=True)
class ServeOptions:
    model_name: str | None = None  # what /v1/models lists and requests name; None = the artifact folder's name
    api_key: str | None = field(default=None, repr=False)  # every /v1/* route needs it when set
    backend: str = "ort"
    device: str = "cpu"
    threads: int | None = None  # onnxruntime intra-op threads per Pipeline (None = onnxruntime's default)
    # Batching: requests waiting together with the same threshold and sampling settings share one generate.
    max_batch: int = 8
    max_queue: int = 64  # waiting requests past this get 429 at once
    batch_window_ms: float = 10.0  # how long the first waiting request waits for company
    timeout_s: float = 300.0  # per request, queueing included
    # Limits on what a request may hold.
    max_body_bytes: int = 20 * MiB  # 413 past this
    max_image_pixels: int = 4096 * 4096  # decoded width x height, checked before decoding
    max_image_aspect: float = 50.0  # long side / short side (a 100000x1 image is refused, not resized)
    max_tokens_default: int = 256  # when a request sets neither max_tokens nor max_completion_tokens
    # Where images may come from besides data: URLs (both off by default: nothing is read or fetched).
    allow_files: Path | None = None  # file:// URLs under this folder
    allow_remote_images: bool = False  # http(s):// URLs to public addresses
    remote_max_bytes: int = 10 * MiB
    remote_timeout_s: float = 10.0
