"""A fleet: the same app as a Ray Serve deployment, N replicas each holding its own Pipeline.

Ray Serve's HTTP proxy takes the requests and routes each to a replica (the one with the shorter queue
of two picked at random); inside a replica the app batches as on one device. Every answer carries an
`x-attanchor-replica` header naming the replica.

For your own Ray config, the application builder (an import path `serve run` takes):

    serve run attanchor_runtime.serve.ray_app:build artifact=/models/tiny-vqa replicas=2

or in Python: `serve.run(application("/models/tiny-vqa", ServeOptions(), replicas=2))`. The artifact
path must exist on every node that runs a replica (copy it there, or use a shared mount); TensorRT
engines must have been built on that node's GPU type.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from dataclasses import fields
from pathlib import Path

from . import ServeOptions, require

APP_NAME = "attanchor"


def application(folder, options: ServeOptions, replicas: int = 1, replica_cpus: float = 1.0,
                replica_gpus: float = 0.0, grace_s: float = 30.0):
    """The bound Ray Serve application (pass it to `serve.run`)."""
    require("ray.serve", "ray")
    from ray import serve

    from ..pipeline import Pipeline
    from .app import create_app

    @serve.deployment(name="AttAnchor", num_replicas=replicas, graceful_shutdown_timeout_s=grace_s,
                      # let each replica's own queue (and its 429) apply instead of queueing in the proxy
                      max_ongoing_requests=options.max_queue + options.max_batch,
                      ray_actor_options={"num_cpus": replica_cpus, "num_gpus": replica_gpus})
    @serve.ingress()
    class AttAnchorReplica:
        def __init__(self, folder: str, options: ServeOptions):
            self.folder, self.options = Path(folder), options
            # a replica's onnxruntime uses as many threads as CPUs Ray gave it, unless told otherwise
            threads = options.threads or max(1, int(replica_cpus))
            self.pipe = Pipeline.load(self.folder, backend=options.backend, device=options.device, threads=threads)

        def __serve_build_asgi_app__(self):
            replica = serve.get_replica_context().replica_id.unique_id
            return create_app(self.pipe, self.options, name=self.folder.name, replica=replica)

    return AttAnchorReplica.bind(str(Path(folder).resolve()), options)


def build(args: dict):
    """`serve run attanchor_runtime.serve.ray_app:build artifact=DIR [replicas=N] [OPTION=VALUE ...]`:
    any ServeOptions field by name (max_batch=8, timeout_s=300, model_name=...)."""
    folder, replicas, replica_cpus, replica_gpus, options = parse_build_args(args)
    return application(folder, options, replicas, replica_cpus, replica_gpus)


def parse_build_args(args: dict) -> tuple[str, int, float, float, ServeOptions]:
    """`serve run`'s KEY=VALUE strings -> (artifact, replicas, replica_cpus, replica_gpus, ServeOptions)."""
    args = dict(args)
    if "artifact" not in args:
        raise ValueError("artifact=DIR is required")
    folder = args.pop("artifact")
    replicas = int(args.pop("replicas", 1))
    replica_cpus = float(args.pop("replica_cpus", 1))
    replica_gpus = float(args.pop("replica_gpus", 0))
    types = {f.name: f.type for f in fields(ServeOptions)}
    unknown = sorted(set(args) - set(types))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; known: artifact, replicas, replica_cpus, "
                         f"replica_gpus, {', '.join(types)}")
    values = {}
    for name, value in args.items():  # `serve run` passes strings; the annotation says what they are
        kind = types[name].split(" ")[0]
        if kind == "bool":
            values[name] = str(value).lower() in ("1", "true", "yes")
        elif kind in ("int", "float"):
            values[name] = int(value) if kind == "int" else float(value)
        elif kind == "Path":
            values[name] = Path(value)
        else:
            values[name] = value
    return folder, replicas, replica_cpus, replica_gpus, ServeOptions(**values)


def serve_on_ray(folder, options: ServeOptions, host: str = "127.0.0.1", port: int = 8000, replicas: int = 2,
                 address: str | None = None, replica_cpus: float = 1.0, replica_gpus: float = 0.0,
                 grace_s: float = 30.0) -> None:
    """Start a local Ray head (or join `address`), serve the app on `replicas` replicas, block until SIGTERM
    or Ctrl-C, then delete the app (and stop the head this call started)."""
    require("ray.serve", "ray")
    import ray
    from ray import serve

    own_cluster = address is None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a serving command does not report usage anywhere
    # A local head: no dashboard, a small object store (requests carry images, not tensors, between
    # processes). Ray's own GCS/raylet ports are Ray's business: see docs/SERVING.md.
    ray.init(address=address, include_dashboard=False if own_cluster else None,
             object_store_memory=100 * 2**20 if own_cluster else None, logging_level="WARNING",
             log_to_driver=False)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application(folder, options, replicas, replica_cpus, replica_gpus, grace_s), name=APP_NAME,
                  route_prefix="/")
        model = options.model_name or Path(folder).resolve().name
        print(f"serving {folder} as model {model!r} on http://{host}:{port} through Ray Serve, {replicas} "
              f"replica(s) ({'API key required' if options.api_key else 'no API key'})", file=sys.stderr, flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if own_cluster:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete(APP_NAME)
