#!/usr/bin/env bash
# The TensorRT backend's CUDA-memory half, run for real on a lent GPU that has CUDA and cuda-bindings
# (and CuPy, as a second reader of the device buffers) but no TensorRT: cudaMalloc'd buffers, async and
# 2-D copies, the masked slot, the KV ping-pong and stream syncs, with fake engines computing on host
# copies of those buffers (scripts/device_check.py says what exactly). No network, no install; needs
# only numpy, cuda-bindings and this checkout (runtime/ on PYTHONPATH). Prints PASS, FAIL or SKIP (no GPU).
#
#     bash scripts/device_check.sh            # on the GPU machine; record the result in docs/JETSON.md
#     bash scripts/device_check.sh --dry-run  # anywhere: host memory stands in for the GPU
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/runtime${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python3}"
if [ "${1:-}" != "--dry-run" ] && ! command -v nvidia-smi >/dev/null 2>&1 && [ ! -e /dev/nvidia0 ]; then
    echo "SKIP: no NVIDIA GPU on this machine (no nvidia-smi, no /dev/nvidia0); nothing was checked"
    exit 0
fi
if [ "${1:-}" != "--dry-run" ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /'
fi
"$PYTHON" -c 'import numpy' 2>/dev/null || { echo "FAIL: numpy is not installed for $PYTHON"; exit 1; }
timeout 280 "$PYTHON" scripts/device_check.py "$@"
status=$?
[ $status -eq 124 ] && echo "FAIL: the check did not finish within 280 s"
exit $status
