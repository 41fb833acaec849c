"""The CuPy backend: the reference code on CuPy arrays, with CUDA kernels for the causal scans.

The kernels (``cuda/scan.cu``, compiled on first use by CuPy's ``RawModule``) replace the
chunked form of :func:`linattn.scan.causal_scan` and :func:`linattn.delta_scan.delta_scan`;
everything else — feature maps, gates, gradients — is the reference code running on CuPy.
CuPy is imported only when a kernel runs, so this module loads without it.
"""

from __future__ import annotations

import array_api_compat

from linattn.backends import _cuda_scan

CUPY_BACKEND = {
    "name": "cupy",
    "accepts": array_api_compat.is_cupy_namespace,
    "kernels": {"causal_scan": _cuda_scan.linear_scan, "delta_scan": _cuda_scan.delta_scan},
}
