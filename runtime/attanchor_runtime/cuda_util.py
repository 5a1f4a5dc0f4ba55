"""The few CUDA runtime calls the TensorRT backend and builder need, through cuda-python.

Why cuda-python (``cuda.bindings.runtime``, older releases ``cuda.cudart``):

* it is NVIDIA's own thin binding of the CUDA runtime API, the one TensorRT's Python samples use;
  wheels exist for x86_64 and aarch64 (Jetson) and it needs only the driver's libcuda at run time,
  which JetPack always has, so nothing is compiled on the device;
* pycuda compiles against a CUDA toolkit at install time (slow and fragile on Jetson) and keeps
  its own context management that has to be reconciled with TensorRT's;
* cupy ships one wheel per CUDA major (cupy-cuda12x), is a large array library we would use for
  malloc/memcpy only, and its Jetson builds are not on PyPI;
* onnxruntime-gpu's TensorRT execution provider builds and caches its own engines from the ONNX
  file: no control over our two decoder profiles, no way to bind our KV buffers or to record and
  check engine.json. It stays available as the ``ort`` backend with ``device="cuda"``.

Everything goes through :class:`Cuda`, a small object with plain-int device pointers, so tests can
hand the backend a fake with the same methods and no GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ArtifactError

__all__ = ["Cuda", "CudaError", "CudaUnavailable", "DeviceInfo", "import_cudart"]

CUDA_PYTHON_HINT = (
    "pip install 'cuda-python>=12,<13' (CUDA 12, JetPack 6) or 'cuda-python>=13' (CUDA 13, JetPack 7)"
)


class CudaUnavailable(ArtifactError):
    """cuda-python is missing or no CUDA GPU is visible."""


class CudaError(ArtifactError):
    """A CUDA runtime call failed."""


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    major: int
    minor: int
    total_memory: int

    @property
    def sm(self) -> str:
        return f"{self.major}{self.minor}"

    @property
    def compute_capability(self) -> str:
        return f"{self.major}.{self.minor}"


def import_cudart():
    """The cuda-python runtime module, or CudaUnavailable with the install command."""
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6

        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart  # cuda-python < 12.6

        return cudart
    except ImportError:
        raise CudaUnavailable(f"cuda-python is not installed: {CUDA_PYTHON_HINT}") from None


def _check(rt, result):
    """cuda-python returns (err, *values); raise on err, return the value(s)."""
    if not isinstance(result, tuple):
        result = (result,)
    err, *values = result
    if int(err) != 0:
        try:
            name = rt.cudaGetErrorName(err)[1].decode()
        except Exception:  # noqa: BLE001
            name = str(err)
        raise CudaError(f"CUDA call failed: {name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


class Cuda:
    """One device and one stream. Pointers are ints; host arrays must be C-contiguous numpy."""

    def __init__(self, device: int = 0):
        self.rt = rt = import_cudart()
        try:
            count = _check(rt, rt.cudaGetDeviceCount())
        except CudaError as e:
            raise CudaUnavailable(f"no usable CUDA GPU ({e})") from None
        if not count:
            raise CudaUnavailable("no CUDA GPU is visible (cudaGetDeviceCount returned 0)")
        if device >= count:
            raise CudaUnavailable(f"CUDA device {device} does not exist ({count} visible)")
        self.device = device
        _check(rt, rt.cudaSetDevice(device))
        self._stream = _check(rt, rt.cudaStreamCreate())
        self._h2d = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._d2h = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost

    @property
    def stream(self) -> int:
        """The stream handle as an int, what execute_async_v3 takes."""
        s = self._stream
        try:
            return int(s)
        except TypeError:
            return int(s.getPtr())

    def device_info(self) -> DeviceInfo:
        props = _check(self.rt, self.rt.cudaGetDeviceProperties(self.device))
        name = props.name
        if isinstance(name, bytes):
            name = name.split(b"\0", 1)[0].decode(errors="replace")
        return DeviceInfo(self.device, str(name).strip(), int(props.major), int(props.minor),
                          int(props.totalGlobalMem))

    def malloc(self, nbytes: int) -> int:
        return int(_check(self.rt, self.rt.cudaMalloc(max(int(nbytes), 1))))

    def free(self, ptr: int) -> None:
        _check(self.rt, self.rt.cudaFree(ptr))

    def htod(self, dst: int, array: np.ndarray) -> None:
        if array.nbytes:
            _check(self.rt, self.rt.cudaMemcpyAsync(dst, array.ctypes.data, array.nbytes, self._h2d, self._stream))

    def dtoh(self, array: np.ndarray, src: int) -> None:
        if array.nbytes:
            _check(self.rt, self.rt.cudaMemcpyAsync(array.ctypes.data, src, array.nbytes, self._d2h, self._stream))

    def dtoh_rows(self, array: np.ndarray, src: int, src_pitch: int, row_bytes: int, rows: int) -> None:
        """Copy `rows` rows of `row_bytes` each, `src_pitch` bytes apart on the device, into `array`."""
        _check(self.rt, self.rt.cudaMemcpy2DAsync(array.ctypes.data, row_bytes, src, src_pitch, row_bytes, rows,
                                                  self._d2h, self._stream))

    def memset(self, dst: int, nbytes: int, value: int = 0) -> None:
        """Set `nbytes` bytes to `value` (a byte), on the stream."""
        if nbytes:
            _check(self.rt, self.rt.cudaMemsetAsync(dst, value, nbytes, self._stream))

    def synchronize(self) -> None:
        _check(self.rt, self.rt.cudaStreamSynchronize(self._stream))
