"""How fast the exporter writes a transposed weight: numpy's one-shot copy of a transposed view against
trace.torch_onnx.transposed_copy (strips of rows), on decoder-shaped matrices in fp32 and fp16.

    python scripts/measure_transpose.py [--rounds 5]

Prints GB/s (weight bytes over the best of `--rounds`) per shape and the ratio, measured in one run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from attanchor_export.trace.torch_onnx import transposed_copy

# [out, in] of Linear weights: TinyLlama-1.1B (2048 / 5632 / 256 / 32000) and Llama-7B (4096 / 11008).
SHAPES = ((5632, 2048), (2048, 5632), (2048, 2048), (256, 2048), (32000, 2048), (11008, 4096), (4096, 11008))


def best_seconds(fn, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print("| shape | dtype | numpy GB/s | strips GB/s | ratio |")
    print("|---|---|---|---|---|")
    for dtype in (np.float32, np.float16):
        for shape in SHAPES:
            array = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
            assert np.array_equal(transposed_copy(array), array.T)
            numpy_s = best_seconds(lambda a=array: np.ascontiguousarray(a.T), args.rounds)
            strips_s = best_seconds(lambda a=array: transposed_copy(a), args.rounds)
            print(
                f"| {shape[0]} x {shape[1]} | {np.dtype(dtype).name} | {array.nbytes / numpy_s / 1e9:.2f} | "
                f"{array.nbytes / strips_s / 1e9:.2f} | {numpy_s / strips_s:.2f}x |"
            )


if __name__ == "__main__":
    main()
