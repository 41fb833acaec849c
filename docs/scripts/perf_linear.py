"""CPU performance of the chunked causal linear scan, against the matrix products it must do.

Run from the repository root:  python docs/scripts/perf_linear.py

The chunked form of causal linear attention with chunk C does, per head, four batched
matrix products over the T/C chunks: the intra-chunk scores Q_c K_cᵀ (T·C·Dk multiply-
adds), their product with V_c (T·C·Dv), the read-out of the entering state Q_c S_c
(T·Dk·Dv) and the chunk's contribution to the state K_cᵀ V_c (T·Dk·Dv). This script
times exactly those products on arrays of the same shapes (the floor for any chunked
implementation on this BLAS), then linattn's chunked scan and linear_attention, all in
one process, best of several runs, and the growth from T/4 to T.
"""

import argparse
import json
import time

import numpy as np

import linattn
from linattn.scan import causal_scan


def best_of(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_floor(q, k, v, chunk):
    """The four products of the chunked form, on arrays of its shapes."""
    H, T, Dk = q.shape
    Dv = v.shape[-1]
    n = T // chunk
    qc, kc, vc = (x.reshape(H, n, chunk, x.shape[-1]) for x in (q, k, v))
    states = np.zeros((H, n, Dk, Dv), dtype=q.dtype)

    def run():
        scores = qc @ kc.swapaxes(-1, -2)
        scores @ vc
        qc @ states
        kc.swapaxes(-1, -2) @ vc

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the numbers here too")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    H, T, D, C = args.heads, args.length, args.dim, args.chunk
    q, k, v = (rng.standard_normal((H, T, D), dtype=np.float32) for _ in range(3))
    q4, k4, v4 = (rng.standard_normal((1, T, H, D), dtype=np.float32) for _ in range(3))

    results = {"T": T, "H": H, "D": D, "chunk": C, "dtype": "float32"}
    results["matmul_floor_s"] = best_of(matmul_floor(q, k, v, C), args.repeats)
    causal_scan(q[:, :64], k[:, :64], v[:, :64])  # warm-up (lazy imports)
    results["causal_scan_s"] = best_of(lambda: causal_scan(q, k, v, chunk_size=C), args.repeats)
    quarter = (q[:, : T // 4], k[:, : T // 4], v[:, : T // 4])
    results["causal_scan_quarter_T_s"] = best_of(lambda: causal_scan(*quarter, chunk_size=C), args.repeats)
    results["linear_attention_identity_s"] = best_of(
        lambda: linattn.linear_attention(q4, k4, v4, causal=True, feature_map="identity", normalize=False,
                                         chunk_size=C), args.repeats)
    results["linear_attention_elu_normalised_s"] = best_of(
        lambda: linattn.linear_attention(q4, k4, v4, causal=True, chunk_size=C), args.repeats)
    results["scan_over_floor"] = results["causal_scan_s"] / results["matmul_floor_s"]
    results["identity_over_floor"] = results["linear_attention_identity_s"] / results["matmul_floor_s"]
    results["growth_T_over_quarter_T"] = results["causal_scan_s"] / results["causal_scan_quarter_T_s"]
    for key, value in results.items():
        print(f"{key:36s} {value:.4g}" if isinstance(value, float) else f"{key:36s} {value}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
