"""CPU performance of the chunked delta rule, against the matrix products it must do and its recurrence.

Run from the repository root:  python docs/scripts/perf_delta.py

Per head and chunk of C steps the chunked (WY/UT) form needs these products:

    K Kᵀ            C·C·Dk   (the UT system's off-diagonal, and nothing else gives it)
    Q Kᵀ            C·C·Dk   (the intra-chunk scores)
    the solve       (I + L)⁻¹ [βV, βe^Γ K]: counted as one C×C by C×(Dv + Dk) product,
                    the cost of applying the inverse, twice the flops of forward
                    substitution (a batched triangular solve runs below GEMM speed, and
                    NumPy has none; FLA's kernels form the inverse and multiply too)
    W S_in          C·Dk·Dv  (the corrections' response to the entering state)
    K̄ᵀ U            C·Dk·Dv  (the chunk's write to the state)
    (QKᵀ ⊙ M) U     C·C·Dv   (intra-chunk outputs)
    Q S_in          C·Dk·Dv  (the entering state read out)

The "floor" times each as ONE batched call over all chunks and heads, as if the
entering states were known in advance (they are not: W S_in and K̄ᵀU run in a loop over
chunks), so it is a lower bound for any NumPy implementation of the form. Everything
else in the chunked form (the decay matrix and masks, the diagonal-block inverses of the
solve, the loop's small products, stacking) is overhead on top of it. The recurrent
form is timed on T / --recurrent-fraction steps and scaled linearly to T (its cost per
step does not depend on t). All timings are best of --repeats, in one process.
"""

import argparse
import json
import os
import platform
import time

import numpy as np

import linattn.delta as delta
from linattn.delta_scan import delta_scan


def best_of(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_floor(H, T, Dk, Dv, C, dtype, rng):
    """The seven products of the chunked form, each one batched call over (H, T/C) chunks."""
    n = T // C
    q, k = (rng.standard_normal((H, n, C, Dk)).astype(dtype) for _ in range(2))
    v = rng.standard_normal((H, n, C, Dv)).astype(dtype)
    wide = rng.standard_normal((H, n, C, Dk + Dv)).astype(dtype)
    square = rng.standard_normal((H, n, C, C)).astype(dtype)
    states = rng.standard_normal((H, n, Dk, Dv)).astype(dtype)
    kt = np.swapaxes(k, -1, -2)
    products = {
        "K Kt": lambda: k @ kt,
        "Q Kt": lambda: q @ kt,
        "solve (as C x C by C x (Dk+Dv))": lambda: square @ wide,
        "W S_in": lambda: k @ states,
        "Kbar^T U": lambda: kt @ v,
        "(QKt*M) U": lambda: square @ v,
        "Q S_in": lambda: q @ states,
    }
    return products


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--recurrent-fraction", type=int, default=8, help="time the loop on T / this many steps")
    parser.add_argument("--json", help="write the numbers here too")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    H, T, D, C = args.heads, args.length, args.dim, args.chunk
    dtype = np.float32
    q, k, v = (rng.standard_normal((H, T, D)).astype(dtype) for _ in range(3))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    beta = (1 / (1 + np.exp(-rng.standard_normal((H, T, 1))))).astype(dtype)
    g = (-np.logaddexp(0, -rng.standard_normal((H, T, 1))) / 8).astype(dtype)

    results = {"T": T, "H": H, "D": D, "chunk": C, "dtype": "float32", "cpu_count": os.cpu_count(),
               "machine": platform.processor() or platform.machine(), "numpy": np.__version__}
    delta_scan(q[:, :64], k[:, :64], v[:, :64], beta[:, :64], g=g[:, :64])  # warm-up (lazy imports)
    floor = {name: best_of(fn, args.repeats) for name, fn in matmul_floor(H, T, D, D, C, dtype, rng).items()}
    results["floor_products_s"] = floor
    results["matmul_floor_s"] = sum(floor.values())
    results["chunked_gated_s"] = best_of(lambda: delta_scan(q, k, v, beta, g=g, chunk_size=C), args.repeats)
    results["chunked_plain_s"] = best_of(lambda: delta_scan(q, k, v, beta, chunk_size=C), args.repeats)
    quarter = [x[:, : T // 4] for x in (q, k, v, beta, g)]
    results["chunked_gated_quarter_T_s"] = best_of(
        lambda: delta_scan(*quarter[:4], g=quarter[4], chunk_size=C), args.repeats)
    q4, k4, v4 = (np.ascontiguousarray(np.swapaxes(x, 0, 1))[None] for x in (q, k, v))  # (1, T, H, D)
    b4, g4 = (np.ascontiguousarray(x[..., 0].T)[None] for x in (beta, g))
    results["gated_delta_rule_l2norm_s"] = best_of(
        lambda: delta.gated_delta_rule(q4, k4, v4, g4, b4, use_qk_l2norm=True, chunk_size=C), args.repeats)
    steps = T // args.recurrent_fraction
    part = [x[:, :steps] for x in (q, k, v, beta, g)]
    recurrent = best_of(lambda: delta_scan(*part[:4], g=part[4], form="recurrent"), max(1, args.repeats // 2))
    results["recurrent_steps_timed"] = steps
    results["recurrent_gated_s_scaled_to_T"] = recurrent * T / steps
    results["chunked_over_floor"] = results["chunked_gated_s"] / results["matmul_floor_s"]
    results["recurrent_over_chunked"] = results["recurrent_gated_s_scaled_to_T"] / results["chunked_gated_s"]
    results["growth_T_over_quarter_T"] = results["chunked_gated_s"] / results["chunked_gated_quarter_T_s"]
    for key, value in results.items():
        if isinstance(value, dict):
            for name, seconds in value.items():
                print(f"  {name:34s} {seconds:.4g}")
        else:
            print(f"{key:36s} {value:.4g}" if isinstance(value, float) else f"{key:36s} {value}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
