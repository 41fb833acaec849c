"""Launching the CUDA kernels with little host time: operands as pointers and strides.

A call's arrays stay in the caller's library — CuPy arrays or PyTorch CUDA tensors,
bfloat16 ones included — and are read as ``(pointer, shape, element strides)``; outputs
are allocated by that library, on its allocator and the device of the inputs, and come
back as its own type. No DLPack conversion, no CuPy kernel-argument boxing: a launch
packs its arguments into 8-byte slots and calls ``cuLaunchKernel`` once (pointers,
``long long`` and ``int`` parameters all read their value from a slot's low bytes).
This keeps one small call from Python in the tens of microseconds, which the decoding
step (a few microseconds of GPU work) and the small benchmark shapes need.

The kernels run on the caller's current stream: PyTorch's for tensors, CuPy's for
CuPy arrays.
"""

from __future__ import annotations

import ctypes
import functools
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

# The dtypes the kernels read.
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def accumulation(dtype: str) -> str:
    """float64 for float64 data, float32 for everything narrower."""
    return "float64" if dtype == "float64" else "float32"


def itemsize(dtype: str) -> int:
    return _ITEMSIZE[dtype]


def promote(dtypes: Sequence[str]) -> str:
    """The one dtype a call's data arrays are read in: theirs if they agree, else the wider float."""
    first = dtypes[0]
    if all(d == first for d in dtypes):
        return first
    return "float64" if "float64" in dtypes else "float32"


def cupy() -> Any:
    import cupy

    return cupy


@functools.cache
def _source(name: str) -> str:
    """``cuda/<name>`` with its local headers (``#include "x.cuh"``) inlined.

    Inlined rather than found by ``-I``: CuPy's compile cache is keyed by the source
    text, so a changed header must change the text.
    """
    text = resources.files("linattn.backends").joinpath("cuda", name).read_text()
    return re.sub(r'^#include "([\w.]+)"$', lambda m: _source(m.group(1)), text, flags=re.MULTILINE)


# Sources built for one architecture's own instructions (wgmma: Hopper, sm_90a). NVRTC
# takes this target over the -arch=sm_XX that CuPy adds for the current device.
_TARGETS = {"chunk_wgmma.cu": ("-arch=sm_90a",), "delta_wgmma.cu": ("-arch=sm_90a",)}


@functools.cache
def module(source: str, defines: tuple[tuple[str, Any], ...]) -> Any:
    """The compiled ``cuda/<source>`` with these ``-D`` defines (compiled once, on first use)."""
    options = ("-std=c++17", *_TARGETS.get(source, ()), *(f"-D{name}={value}" for name, value in defines))
    return cupy().RawModule(code=_source(source), options=options)


@functools.cache
def function(source: str, name: str, defines: tuple[tuple[str, Any], ...], shared_bytes: int, device: int) -> int:
    """The driver handle of kernel ``name`` on ``device``, allowed ``shared_bytes`` of dynamic shared memory."""
    with cupy().cuda.Device(device):
        kernel = module(source, defines).get_function(name)
        if shared_bytes > 48 * 1024:
            kernel.max_dynamic_shared_size_bytes = shared_bytes
        return int(kernel.kernel.ptr)


@functools.cache
def blocks_per_multiprocessor(source: str, name: str, defines: tuple[tuple[str, Any], ...], threads: int,
                              shared_bytes: int, device: int) -> int:
    """How many blocks of ``threads`` threads of this kernel one multiprocessor holds at once.

    CUDA's occupancy calculator (``cuOccupancyMaxActiveBlocksPerMultiprocessor``) on the
    compiled kernel: its registers per thread, the threads and the dynamic shared memory.
    """
    kernel = function(source, name, defines, shared_bytes, device)
    with cupy().cuda.Device(device):
        return int(_driver().occupancyMaxActiveBlocksPerMultiprocessor(kernel, threads, shared_bytes))


@functools.cache
def device_attribute(device: int, name: str) -> int:
    """A CUDA device attribute, e.g. ``"MultiProcessorCount"``."""
    return int(cupy().cuda.Device(device).attributes[name])


@functools.cache
def compute_capability(device: int) -> str:
    """The device's compute capability as CuPy writes it: "90" for Hopper (H100, H200)."""
    return str(cupy().cuda.Device(device).compute_capability)


@dataclass(frozen=True, slots=True)
class Ref:
    """An operand as a kernel sees it: its address, shape and strides in elements."""

    ptr: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]


class _Torch:
    """PyTorch CUDA tensors."""

    def __init__(self, torch: Any):
        self.torch = torch
        self.names = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
                      torch.float64: "float64"}
        raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        self.stream = raw if raw is not None else lambda device: torch.cuda.current_stream(device).cuda_stream

    def owns(self, x: Any) -> bool:
        return isinstance(x, self.torch.Tensor) and x.is_cuda

    def dtype(self, x: Any) -> str | None:
        return self.names.get(x.dtype)

    def device(self, x: Any) -> int:
        return x.device.index

    def convert(self, x: Any, dtype: str) -> Any:
        """Return x in ``dtype`` with a contiguous last axis (x itself when it already is)."""
        if self.names.get(x.dtype) != dtype:
            x = x.to(getattr(self.torch, dtype))
        return x.contiguous() if x.shape[-1] > 1 and x.stride(-1) != 1 else x

    def ref(self, x: Any) -> Ref:
        return Ref(x.data_ptr(), tuple(x.shape), tuple(x.stride()))

    def empty(self, shape: tuple[int, ...], dtype: str, device: int) -> Any:
        return self.torch.empty(shape, dtype=getattr(self.torch, dtype), device=self.torch.device("cuda", device))


class _Cupy:
    """CuPy arrays."""

    def __init__(self, cp: Any):
        self.cp = cp

    def owns(self, x: Any) -> bool:
        return isinstance(x, self.cp.ndarray)

    def dtype(self, x: Any) -> str | None:
        name = x.dtype.name
        return name if name in _ITEMSIZE else None

    def device(self, x: Any) -> int:
        return x.device.id

    def convert(self, x: Any, dtype: str) -> Any:
        x = x.astype(dtype, copy=False)
        return self.cp.ascontiguousarray(x) if x.shape[-1] > 1 and x.strides[-1] != x.itemsize else x

    def ref(self, x: Any) -> Ref:
        return Ref(x.data.ptr, x.shape, tuple(s // x.itemsize for s in x.strides))

    def empty(self, shape: tuple[int, ...], dtype: str, device: int) -> Any:
        with self.cp.cuda.Device(device):
            return self.cp.empty(shape, dtype=dtype)

    def stream(self, device: int) -> int:
        return self.cp.cuda.get_current_stream(device).ptr


@functools.cache
def _libraries() -> tuple[Any, ...]:
    found: list[Any] = [_Cupy(cupy())]
    try:
        import torch
    except ImportError:
        return tuple(found)
    return (*found, _Torch(torch))


def library_of(arrays: Sequence[Any]) -> Any | None:
    """The adapter of the library that holds all of ``arrays`` on one CUDA device, or None."""
    for lib in _libraries():
        if all(lib.owns(x) for x in arrays):
            device = lib.device(arrays[0])
            return lib if all(lib.device(x) == device for x in arrays) else None
    return None


@functools.cache
def _driver() -> Any:
    from cupy_backends.cuda.api import driver

    return driver


_THREAD = threading.local()


def _slots(n: int) -> tuple[Any, int]:
    """Return the calling thread's n 8-byte argument slots and the address of the array of pointers to them."""
    slots = getattr(_THREAD, "slots", None)
    if slots is None:
        slots = _THREAD.slots = {}
    if n not in slots:
        values = (ctypes.c_int64 * n)()
        base = ctypes.addressof(values)
        params = (ctypes.c_void_p * n)(*range(base, base + 8 * n, 8))
        slots[n] = (values, params)
    values, params = slots[n]
    return values, ctypes.addressof(params)


def launch(kernel: int, grid: tuple[int, int, int], block: int, shared: int, stream: int, args: Sequence[int]) -> None:
    """``cuLaunchKernel`` with every argument in an 8-byte slot (pointers, ``long long``, ``int``).

    The driver copies the arguments when the launch is queued, so the slots are reused.
    """
    values, params = _slots(len(args))
    values[:] = args
    _driver().launchKernel(kernel, grid[0], grid[1], grid[2], block, 1, 1, shared, stream, params, 0)
