"""Serve an artifact over HTTP: the OpenAI chat-completions API with images, a web page, health.

    attanchor-export serve out/demo/artifact                    # one device: uvicorn on 127.0.0.1:8000
    attanchor-export serve out/demo/artifact --ray --replicas 2 # Ray Serve: N replicas, one Pipeline each

    from attanchor_runtime.serve import ServeOptions, create_app
    app = create_app(Pipeline.load(folder), ServeOptions())     # any ASGI server

Modules: options (ServeOptions), schemas (the OpenAI request), images (image URLs and their limits),
scheduler (batching), app (routes), run (uvicorn, shutdown), ray_app (the Ray Serve deployment),
static/ (the page). See docs/SERVING.md. Needs the `[serve]` extra (no torch); Ray the `[ray]` extra.
"""

from __future__ import annotations

import importlib

from ..errors import UserError
from .options import ServeOptions

__all__ = ["ServeOptions", "create_app", "require"]


def require(module: str, extra: str = "serve") -> None:
    """One line naming the extra to install when an optional stack is missing."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise UserError(f"serving needs {module}: pip install 'attanchor-export[{extra}]'") from None


def create_app(pipe, options: ServeOptions | None = None, name: str | None = None, replica: str | None = None):
    """The ASGI app for one loaded Pipeline (see app.create_app)."""
    for module in ("starlette", "pydantic"):
        require(module)
    from .app import create_app as make

    return make(pipe, options, name, replica)
