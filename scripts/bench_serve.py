"""Serving throughput: 1, 4 and 16 concurrent clients against `attanchor-export serve`, one request at a
time (--max-batch 1) vs batched (--max-batch 8), on uvicorn and on Ray Serve (2 replicas).

    python scripts/bench_serve.py out/demo/artifact [--clients 1,4,16] [--requests 4] [--json out.json]

Each configuration starts its own server (a child process on a free localhost port), warms it up, then
for each client count runs closed-loop clients (each sends its next request when the last is answered)
over fixed easy-vqa test questions with their images as data URLs, greedy, through the official OpenAI
client. Reported: requests/s, completion tokens/s, median and p90 latency, and what the server batched.
Not a CI test: the figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# onnxruntime threads: one process uses every core by default; each Ray replica one (--replica-cpus 1),
# so "batched-1-thread" is the one-process row that differs from the Ray row only by the replicas.
CONFIGS = {
    "one-at-a-time": ["--max-batch", "1"],
    "batched": ["--max-batch", "8"],
    "batched-1-thread": ["--max-batch", "8", "--threads", "1"],
    "ray-2x-batched": ["--ray", "--replicas", "2", "--max-batch", "8"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, artifact: Path, args: list[str], log: Path):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray", dir="/tmp")}
        self.proc = subprocess.Popen([sys.executable, "-m", "attanchor_export.cli", "serve", str(artifact), "--port",
                                      str(self.port), "--log-level", "warning", *args],
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited ({self.proc.returncode}); see {log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        raise SystemExit(f"server not ready after 300 s; see {log}")

    def health(self) -> dict:
        import httpx

        return httpx.get(f"{self.url}/health", timeout=10).json()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)


def questions(n: int):
    from attanchor_export.load.datasets import load_task

    items = load_task("easy-vqa", limit=n)
    return [(it.question, "data:image/png;base64," + base64.b64encode(Path(it.image).read_bytes()).decode())
            for it in items]


def run_clients(url: str, model: str, work, clients: int, per_client: int) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)

    def one(i):
        latencies, tokens = [], 0
        for j in range(per_client):
            question, image = work[(i * per_client + j) % len(work)]
            start = time.perf_counter()
            reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": question}]}])
            latencies.append(time.perf_counter() - start)
            tokens += reply.usage.completion_tokens
        return latencies, tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(clients)))
    wall = time.perf_counter() - start
    latencies = sorted(x for lat, _ in results for x in lat)
    tokens = sum(t for _, t in results)
    return {"clients": clients, "requests": len(latencies), "wall_s": round(wall, 2),
            "requests_per_s": round(len(latencies) / wall, 2), "tokens_per_s": round(tokens / wall, 2),
            "latency_p50_s": round(statistics.median(latencies), 3),
            "latency_p90_s": round(latencies[int(0.9 * (len(latencies) - 1))], 3)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"some of {', '.join(CONFIGS)}")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    work = questions(64)
    model = args.artifact.resolve().name
    results = []
    for name in args.configs.split(","):
        log = Path(tempfile.mkdtemp(prefix="bench-serve-")) / f"{name}.log"
        server = Server(args.artifact, CONFIGS[name], log)
        try:
            run_clients(server.url, model, work, 2, 1)  # warm-up: sessions, allocator, both replicas
            for n in clients:
                before = server.health()
                row = {"config": name, **run_clients(server.url, model, work, n, args.requests)}
                after = server.health()
                if "--ray" not in CONFIGS[name]:  # on Ray, /health is one replica's counts
                    batches = after["batches"] - before["batches"]
                    row["rows_per_batch"] = round((after["rows"] - before["rows"]) / max(batches, 1), 2)
                results.append(row)
                print(json.dumps(row), flush=True)
        finally:
            code = server.stop()
            if code != 0:
                print(f"warning: {name} server exited {code}; see {log}", file=sys.stderr)
    print_table(results, clients)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def print_table(results: list[dict], clients: list[int]) -> None:
    by = {(r["config"], r["clients"]): r for r in results}
    configs = list(dict.fromkeys(r["config"] for r in results))
    print("\n| config | " + " | ".join(f"{n} client{'s' * (n > 1)}: req/s (p50 s)" for n in clients) + " |")
    print("|---|" + "---|" * len(clients))
    for c in configs:
        cells = [f"{by[c, n]['requests_per_s']} ({by[c, n]['latency_p50_s']})" if (c, n) in by else "" for n in clients]
        print(f"| {c} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
