"""The NumPy backend: the reference code itself, on NumPy arrays, with no extra kernels."""

from __future__ import annotations

import array_api_compat

NUMPY_BACKEND = {
    "name": "numpy",
    "accepts": array_api_compat.is_numpy_namespace,
    "kernels": {},
}
