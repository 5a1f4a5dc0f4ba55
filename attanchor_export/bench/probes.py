"""Machine probes for the benchmark: CPU name, other processes' load, peak RSS, memory bandwidth and
the decoder's weight bytes (what one decode step must read)."""

from __future__ import annotations

import math
import os
import platform
import threading
import time
from pathlib import Path

import numpy as np


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return None


def _proc_stat():
    try:
        with open("/proc/stat") as f:
            values = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(values), values[3] + values[4]  # total, idle + iowait


class ForeignLoad:
    """CPU share that *other* processes used between start() and stop() (Linux; None elsewhere)."""

    def start(self):
        self._stat, self._own = _proc_stat(), sum(os.times()[:4])
        return self

    def stop(self) -> float | None:
        end = _proc_stat()
        if self._stat is None or end is None:
            return None
        own = (sum(os.times()[:4]) - self._own) * os.sysconf("SC_CLK_TCK")
        total = end[0] - self._stat[0]
        busy = total - (end[1] - self._stat[1])
        return float(min(1.0, max(0.0, (busy - own) / total))) if total > 0 else 0.0


def wait_quiet(max_wait: float, limit: float = 0.15) -> None:
    """Wait up to max_wait seconds for the machine to be idle (other processes < limit of the CPU)."""
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline:
        probe = ForeignLoad().start()
        time.sleep(1.0)
        share = probe.stop()
        if share is None or share < limit:
            return


class PeakRss:
    """Peak resident set size of this process from reset() on: VmHWM after writing 5 to clear_refs
    (Linux), else the lifetime ru_maxrss."""

    def reset(self) -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.exact = True
        except OSError:
            self.exact = False
        return self.exact

    @staticmethod
    def _status(key: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError):
            pass
        return None

    def current(self) -> int | None:
        return self._status("VmRSS")

    def peak(self) -> int:
        hwm = self._status("VmHWM")
        if hwm is not None:
            return hwm
        import resource  # Unix only; /proc answered above on Linux

        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(maxrss if platform.system() == "Darwin" else maxrss * 1024)


class BandwidthProbe:
    """Read bandwidth in bytes/s over a buffer of `nbytes` (far beyond the last-level cache): the best
    of 4-thread and 2-thread BLAS dots (each thread streams its share), a single BLAS dot and a BLAS
    gemv. The fastest reader is taken, so the bound is as strict as numpy can make it. The buffer is
    kept, so the probe can be repeated next to each measured decode: on a VM the bandwidth the host
    leaves us drifts by tens of percent within minutes, and only paired figures compare."""

    def __init__(self, nbytes: int = 1 << 30):
        count = max(1 << 20, nbytes // 4)
        count -= count % 4096
        self.buf = np.ones(count, np.float32)
        self.matrix = self.buf.reshape(-1, 1024)
        self.vector = np.ones(1024, np.float32)

    def _threads(self, k: int):
        part = self.buf.size // k

        def run():
            threads = [threading.Thread(target=lambda s: s.dot(s), args=(self.buf[i * part:(i + 1) * part],))
                       for i in range(k)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        return run

    def measure(self, repeats: int = 5) -> dict:
        probes = {"dot_4_threads": self._threads(4), "dot_2_threads": self._threads(2),
                  "dot": lambda: self.buf.dot(self.buf), "gemv": lambda: self.matrix @ self.vector}
        results = {}
        for name, fn in probes.items():
            fn()  # touch the pages
            best = math.inf
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            results[name] = self.buf.nbytes / best
        method = max(results, key=results.get)
        return {"bytes_per_s": results[method], "method": method, "probes": results,
                "buffer_bytes": int(self.buf.nbytes)}


def measure_read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> dict:
    """One BandwidthProbe measurement (see there)."""
    return BandwidthProbe(nbytes).measure(repeats)


def decoder_weight_bytes(path, skip_gathered: bool = False) -> int:
    """Bytes of every initializer of an ONNX graph (external data included, nothing loaded).
    skip_gathered: leave out Gather's data (an embedding table: one row is read per token)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather"} if skip_gathered else set()
    total = 0
    for t in model.graph.initializer:
        if t.name in gathered:
            continue
        length = {e.key: e.value for e in t.external_data}.get("length")
        if t.data_location == onnx.TensorProto.EXTERNAL and length is not None:
            total += int(length)
        elif t.raw_data:
            total += len(t.raw_data)
        else:
            try:
                itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
            except (KeyError, TypeError):
                itemsize = 1
            total += int(np.prod(list(t.dims), dtype=np.int64)) * itemsize
    return total
