"""Run each CUDA kernel once on small problems, for compute-sanitizer (memcheck, racecheck).

Run on the GPU machine::

    compute-sanitizer --tool racecheck python3 docs/scripts/gpu_sanitize.py
    compute-sanitizer --tool memcheck python3 docs/scripts/gpu_sanitize.py

Covers the forward scans (tensor-core and CUDA-core, with and without gates, per step and
per key, in three passes where T is long; the linear scan's on warpgroup products where the
GPU has them and on mma.sync; Dk = 256 with one q tile; float32 on 3xTF32 products at each
block width, and on the CUDA cores), the reversed scans of
the gradients, the delta rule and its gradient kernels (β per step and per value, gates,
states), on the tensor cores and the CUDA cores. Sizes are small so that the instrumented
run takes seconds; the results are checked elsewhere (tests/gpu).
"""

from __future__ import annotations

import cupy as cp
import numpy as np

from linattn.backends import _cuda_chunk, get_backend
from linattn.delta_grad import delta_scan_vjp
from linattn.delta_scan import delta_scan
from linattn.scan import causal_scan, causal_scan_vjp


def main() -> None:
    rng = np.random.default_rng(0)
    normal = lambda *s, dtype="float32": cp.asarray(rng.standard_normal(s), dtype=dtype)  # noqa: E731
    for wgmma in (True, False):  # the linear scan's two tensor-core kernels (wgmma: Hopper only)
        _cuda_chunk.WGMMA = wgmma
        for dtype, T in (("float16", 150), ("float32", 150), ("float16", 2100)):
            q, k, v, do = (normal(2, 2, T, 64, dtype=dtype) for _ in range(4))
            g = -cp.abs(normal(2, 2, T, 1, dtype=dtype)) / 8
            gk = -cp.abs(normal(2, 2, T, 64, dtype=dtype)) / 8
            for gate in (None, g, gk):
                causal_scan(q, k, v, gk=gate, backend="cupy")
                get_backend("cupy").kernel("causal_scan_reversed")(q, k, v, gate, None, None)
                causal_scan_vjp(q, k, v, do, gk=gate, backend="cupy")
        q, k, v = normal(1, 2, 150, 96, dtype="float16"), normal(1, 2, 150, 96, dtype="float16"), normal(
            1, 2, 150, 192, dtype="float16")  # padded keys, two warpgroups, a partial column tile
        for gate in (None, -cp.abs(normal(1, 2, 150, 1, dtype="float16")) / 8):
            causal_scan(q, k, v, gk=gate, backend="cupy")
    _cuda_chunk.WGMMA = True
    q, k, v = (normal(1, 2, 150, 256, dtype="float16") for _ in range(3))  # Dk = 256: one q tile, two groups
    for gate in (None, -cp.abs(normal(1, 2, 150, 1, dtype="float16")) / 8):
        causal_scan(q, k, v, gk=gate, backend="cupy")
    # float32 on tensor cores (3xTF32): each block width, padded keys and a partial column
    # tile, an initial state, three passes; then the CUDA-core kernel with the tensor cores off.
    widths = _cuda_chunk._TF32_WARPS
    for warps in widths:
        _cuda_chunk._TF32_WARPS = (warps,)
        q, k, v = normal(1, 2, 150, 100), normal(1, 2, 150, 100), normal(1, 2, 150, 36)
        causal_scan(q, k, v, initial_state=normal(1, 2, 100, 36), backend="cupy")
        causal_scan(*(normal(1, 1, 5001, 64) for _ in range(3)), backend="cupy")
    _cuda_chunk._TF32_WARPS, _cuda_chunk.TF32X3 = widths, False
    causal_scan(*(normal(1, 2, 150, 64) for _ in range(3)), backend="cupy")
    _cuda_chunk.TF32X3 = True
    for dtype in ("float16", "float32"):
        q, v, do = normal(2, 2, 70, 64, dtype=dtype), normal(2, 1, 70, 100, dtype=dtype), normal(2, 2, 70, 100,
                                                                                                  dtype=dtype)
        k = normal(2, 1, 70, 64, dtype=dtype)
        k = k / cp.linalg.norm(k.astype("float32"), axis=-1, keepdims=True).astype(dtype)
        g = -cp.abs(normal(2, 1, 70, 1, dtype=dtype)) / 8
        s0, ds = normal(2, 1, 64, 100), normal(2, 1, 64, 100)
        for beta in (cp.abs(normal(2, 1, 70, 1, dtype=dtype)) / 4, cp.abs(normal(2, 1, 70, 100, dtype=dtype)) / 4):
            delta_scan(q, k, v, beta, g=g, initial_state=s0, backend="cupy")
            delta_scan_vjp(q, k, v, beta, do, g=g, initial_state=s0, dfinal_state=ds, backend="cupy")
            delta_scan_vjp(q, k, v, beta, do, backend="cupy")
    cp.cuda.Device().synchronize()
    print("ran every kernel")


if __name__ == "__main__":
    main()
