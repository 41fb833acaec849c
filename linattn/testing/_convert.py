"""Moving arrays of any library to NumPy, for comparison with the reference."""

from __future__ import annotations

from typing import Any

import numpy as np


def dtype_name(dtype: Any) -> str:
    """The short name of a dtype of NumPy, CuPy, PyTorch or array-api-strict ("float32", ...)."""
    if isinstance(dtype, str):
        return dtype
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype).rsplit(".", 1)[-1]


def to_numpy(x: Any) -> np.ndarray:
    """Return ``x`` as a NumPy array on the host (a copy when it lives on a device).

    Handles NumPy arrays and scalars, CuPy arrays (``.get()``), PyTorch tensors
    (detached, moved to the CPU, bfloat16 widened to float32) and any array exporting
    DLPack.
    """
    if isinstance(x, np.ndarray | np.generic | float | int | bool):
        return np.asarray(x)
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a PyTorch tensor
        t = x.detach().cpu()
        if "bfloat16" in str(t.dtype):
            t = t.float()
        return t.numpy()
    if hasattr(x, "get") and type(x).__module__.startswith("cupy"):
        return x.get()
    try:
        return np.from_dlpack(x)
    except (TypeError, BufferError, RuntimeError, AttributeError):
        return np.asarray(x)
