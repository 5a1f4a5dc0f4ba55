"""Peer benchmark: this project's decoder beside onnxruntime-genai, llama.cpp and transformers, one checkpoint.

    python scripts/bench_peers.py [--dims tinyllava-1b|small] [--rounds 6] [--prompt-len 512] [--new-tokens 64]
        [--threads 2] [--systems NAME,...] [--cache DIR] [--json PATH] [--chart PATH.png] [--seed 0]

What a run does, step by step, and the file that does each step: attanchor_export/bench_peers/__init__.py.
Every child process (`--child TASK --spec JSON`) runs this file too, some of them in the peers' own venv.
"""

import sys
from pathlib import Path

# The peers venv has no attanchor_export installed: its children import the package from this checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attanchor_export.bench_peers.cli import main  # noqa: E402
from attanchor_export.bench_peers.common import BenchError  # noqa: E402

if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"bench_peers: error: {e}", file=sys.stderr)
        sys.exit(1)
