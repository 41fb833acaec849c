"""The CuPy backend: the reference code on CuPy arrays, with CUDA kernels for the causal scans.

The kernels (``cuda/*.cu``: tensor-core and CUDA-core scans, compiled on first use by
CuPy's ``RawModule``) replace the chunked form of :func:`linattn.scan.causal_scan` (and
of its time-reversed scan, which the gradients run) and
:func:`linattn.delta_scan.delta_scan` and its gradients
(:func:`linattn.delta_grad.delta_scan_vjp`), and the suffix sums over time of the
scans' gate gradients (``cuda/gate_grad.cu``);
everything else — feature maps, gates, gradients — is the reference code running on CuPy.
CuPy is imported only when a kernel runs, so this module loads without it.

PyTorch tensors are accepted too: CUDA tensors reach the kernels as pointers without a
copy (``_cuda_launch``) — bfloat16 ones included, which CuPy cannot hold — and results
are tensors of the inputs' dtype, allocated by PyTorch and computed on its current
stream; anything a kernel does not cover (CPU tensors, other forms) runs the reference
code on PyTorch.
"""

from __future__ import annotations

import functools

import array_api_compat

from linattn.backends import _cuda_delta_grad, _cuda_gate_grad, _cuda_scan

CUPY_BACKEND = {
    "name": "cupy",
    "accepts": lambda xp: array_api_compat.is_cupy_namespace(xp) or array_api_compat.is_torch_namespace(xp),
    "kernels": {
        "causal_scan": _cuda_scan.linear_scan,
        "causal_scan_reversed": functools.partial(_cuda_scan.linear_scan, reverse=True),
        "delta_scan": _cuda_scan.delta_scan,
        "delta_scan_vjp": _cuda_delta_grad.delta_scan_vjp,
        "gate_gradient": _cuda_gate_grad.gate_gradient,
    },
}
