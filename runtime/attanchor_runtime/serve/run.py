"""One device: load the artifact, serve it with uvicorn, stop cleanly on SIGTERM or Ctrl-C.

On a stop signal uvicorn closes the listening socket and lets the requests in flight finish; after
`grace` seconds the scheduler fails whatever is still running or waiting with a 503 (streamed requests
get an error event), so every client gets an answer; then the process exits 0.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from . import ServeOptions, create_app, require


def serve(folder, options: ServeOptions, host: str = "127.0.0.1", port: int = 8000, grace_s: float = 30.0,
          log_level: str = "info") -> None:
    require("uvicorn")
    import uvicorn

    from ..pipeline import Pipeline

    folder = Path(folder)
    pipe = Pipeline.load(folder, backend=options.backend, device=options.device, threads=options.threads)
    app = create_app(pipe, options, name=folder.resolve().name)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            async def fail_late():
                await asyncio.sleep(grace_s)
                server = getattr(app.state, "server", None)
                if server is not None and server.scheduler is not None:
                    await asyncio.to_thread(server.scheduler.shutdown, 30.0)

            late = asyncio.create_task(fail_late())
            try:
                await super().shutdown(sockets)
            finally:
                late.cancel()

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace_s + 15,
                            server_header=False)
    server = Server(config)
    model = options.model_name or folder.resolve().name
    print(f"serving {folder} as model {model!r} on http://{host}:{port} "
          f"({'API key required' if options.api_key else 'no API key'})", file=sys.stderr, flush=True)

    # uvicorn re-raises the stop signal once it has shut down; these handlers make that a plain return
    stop_signals = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.signal(s, lambda *_: None) for s in stop_signals}
    try:
        server.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
