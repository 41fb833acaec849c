"""Fixtures of the GPU tests: a CuPy with a device, and memory that starts as NaN.

The tests here are marked ``gpu``; they skip (with the reason) where CuPy or a CUDA
device is missing, as in CI, and run on the GPU machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


def _cupy_with_device() -> Any:
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception:  # ImportError, or a CUDA runtime error without a driver or device
        return None
    return None


CUPY = _cupy_with_device()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test of this folder ``gpu`` and skip it without a device."""
    skip = pytest.mark.skip(reason="needs CuPy and a CUDA device (run these on the GPU machine)")
    for item in items:
        if "tests/gpu/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if CUPY is None:
                item.add_marker(skip)


@pytest.fixture
def cp() -> Any:
    """CuPy, on a machine with a CUDA device."""
    assert CUPY is not None
    return CUPY


@pytest.fixture
def nan_memory(cp: Any) -> Iterator[None]:
    """Every CuPy allocation made inside the test starts as all-ones bytes: NaN in every float dtype.

    A kernel that leaves part of its output (or a scratch buffer it reads) unwritten then
    yields NaN, which every comparison fails.
    """
    pool = cp.cuda.MemoryPool()

    def poisoned(size: int) -> Any:
        memory = pool.malloc(size)
        if size:
            cp.cuda.runtime.memset(memory.ptr, 0xFF, size)
        return memory

    cp.cuda.set_allocator(poisoned)
    try:
        yield
    finally:
        cp.cuda.Device().synchronize()
        cp.cuda.set_allocator(cp.get_default_memory_pool().malloc)
