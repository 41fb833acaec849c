"""CPU performance of the Mamba (S6) selective scan: its forms against the work they must do.

Run from the repository root:  python docs/scripts/perf_mamba.py [--json PATH]

Size (defaults): B = 1, D = 512 channels, N = 16, T = 16384, float32. The gated family's
size in the issue is T = 16384, H = 8 heads of Dk = Dv = 64: 8·64 = 512 channels of
activations per token, which is what D counts here (Mamba's d_inner), with Mamba's usual
state size N = 16. (Matching the state instead, 8·64·64 = 32768 numbers per token, would
be D·N = 2048·16; the per-step state here is a quarter of that, D·N = 8192.)

Measured in one process, best of --repeats (one run for the slow chunked form):

- ``recurrent``: selective_scan(form="recurrent"), the loop over t, on all of T;
- ``chunked``: selective_scan(form="chunked", chunk_size=C), i.e. linattn.scan.causal_scan
  with Dk = N, Dv = 1 and a per-key log-decay Δ_t·A, on --chunked-length steps (default T);
- ``matmul floor``: the four matrix products the chunked form does per chunk, on arrays
  of its shapes (Q_c K_cᵀ, the scores times V_c, Q_c S_c, K_cᵀ V_c; with Dv = 1 the last
  three are matrix-vector products per channel);
- ``decay floor``: the one elementwise operation the chunked form cannot avoid without
  computing e^{+G}: exp of the (D, C, C, N) pairwise log-decays G_t − G_s of each chunk;
- ``S6 floor``: exp(Δ·A) over every (d, t, n) and one multiply-add — the elementwise work
  of any algorithm for S6, in blocks of 64 steps;
- a sweep of the chunk size on T/16 steps, and the VJP (form="recurrent") on T/16 steps.

Times on fewer steps than T are scaled to T linearly (every form is linear in T) and
say so. BLAS threads: set to 1 unless OPENBLAS_NUM_THREADS, OMP_NUM_THREADS or
MKL_NUM_THREADS is set (as docs/scripts/make_plots.py, for repeatable timings).
"""

from __future__ import annotations

import os

_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
if not any(name in os.environ for name in _THREAD_VARIABLES):
    for _name in _THREAD_VARIABLES:
        os.environ[_name] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from linattn.mamba import selective_scan, selective_scan_vjp  # noqa: E402


def best_of(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def problem(T, D, N, seed=0, dtype=np.float32):
    """Mamba-like inputs: Δ = softplus(δ + δ_bias) with dt in [1e-3, 0.1], A = −(1..N) (S4D-real)."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((1, D, T), dtype=dtype)
    delta = (rng.standard_normal((1, D, T)) * 0.5).astype(dtype)
    dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), D))
    delta_bias = np.log(np.expm1(dt)).astype(dtype)
    A = -np.broadcast_to(np.arange(1, N + 1, dtype=dtype), (D, N)).copy()
    B, C = (rng.standard_normal((1, N, T), dtype=dtype) for _ in range(2))
    return {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": np.ones(D, dtype), "delta_bias": delta_bias,
            "delta_softplus": True}


def cut(p, T):
    return {k: (v[..., :T] if isinstance(v, np.ndarray) and v.ndim == 3 else v) for k, v in p.items()}


def matmul_floor(p, T, C):
    """The chunked form's four products per chunk, on arrays of its shapes (Dk = N, Dv = 1)."""
    D, N = p["A"].shape
    q = np.ascontiguousarray(np.swapaxes(p["C"][..., :T], -1, -2))[:, None]  # (1, 1, T, N), shared by channels
    k = np.ascontiguousarray(np.swapaxes(p["B"][..., :T], -1, -2))[:, None]
    v = (p["u"][..., :T] * p["delta"][..., :T])[..., None]  # (1, D, T, 1)
    state = np.zeros((1, D, N, 1), dtype=v.dtype)

    def run():
        for a in range(0, T, C):
            qc, kc, vc = q[..., a:a + C, :], k[..., a:a + C, :], v[..., a:a + C, :]
            scores = np.broadcast_to(qc @ np.swapaxes(kc, -1, -2), (1, D, C, C))
            scores @ vc
            qc @ state
            np.swapaxes(kc, -1, -2) @ vc

    return run


def decay_floor(p, T, C):
    """exp of each chunk's pairwise log-decays G_t − G_s, (D, C, C, N): what the chunked form cannot skip."""
    dt = np.logaddexp(0, p["delta"][0, :, :T] + p["delta_bias"][:, None])  # (D, T)
    A = p["A"]

    def run():
        for a in range(0, T, C):
            G = np.cumsum(dt[:, a:a + C], axis=-1)[..., None] * A[:, None, :]  # (D, C, N)
            with np.errstate(over="ignore"):  # the upper triangle (s > t) is masked in the scan, not here
                np.exp(G[:, :, None, :] - G[:, None, :, :])

    return run


def s6_floor(p, T):
    """exp(Δ·A) for every (d, t, n) and the multiply-add Δu·B: the elementwise work of any S6 algorithm."""
    dt = np.logaddexp(0, p["delta"][0, :, :T] + p["delta_bias"][:, None])  # (D, T)
    du = dt * p["u"][0, :, :T]
    A, B = p["A"], np.swapaxes(p["B"][0, :, :T], 0, 1)  # (T, N)

    def run():
        for a in range(0, T, 64):
            decay = np.exp(dt[:, a:a + 64, None] * A[:, None, :])  # (D, 64, N)
            decay * decay + du[:, a:a + 64, None] * B[None, a:a + 64, :]

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--chunked-length", type=int, default=None, help="steps for the chunked form (default T)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the numbers here too")
    args = parser.parse_args()
    T, D, N, C = args.length, args.channels, args.state, args.chunk
    Tc = args.chunked_length or T
    small = max(T // 16, 1)
    p = problem(T, D, N)
    results = {"B": 1, "D": D, "N": N, "T": T, "chunk": C, "dtype": "float32", "chunked_length": Tc,
               "blas_threads": {name: os.environ.get(name) for name in _THREAD_VARIABLES}}
    selective_scan(**cut(p, 8))  # warm-up: lazy imports are not measured
    selective_scan(**cut(p, 8), form="recurrent")

    results["recurrent_s"] = best_of(lambda: selective_scan(**p, form="recurrent"), args.repeats)
    results["s6_floor_s"] = best_of(s6_floor(p, T), args.repeats)
    scale = T / Tc
    results["chunked_s"] = best_of(lambda: selective_scan(**cut(p, Tc), chunk_size=C), 1) * scale
    results["matmul_floor_s"] = best_of(matmul_floor(p, Tc, C), args.repeats) * scale
    results["decay_floor_s"] = best_of(decay_floor(p, Tc, C), 1) * scale
    sweep = {}
    for chunk in (1, 2, 4, 8, 16, 32, 64):
        sweep[chunk] = best_of(lambda chunk=chunk: selective_scan(**cut(p, small), chunk_size=chunk), 1) * (T / small)
    results["chunked_by_chunk_size_s (scaled from T/16)"] = sweep
    dy = np.ones((1, D, small), np.float32)
    results["vjp_recurrent_s (scaled from T/16)"] = best_of(
        lambda: selective_scan_vjp(**cut(p, small), dy=dy, form="recurrent"), 1) * (T / small)
    results["chunked_over_matmul_floor"] = results["chunked_s"] / results["matmul_floor_s"]
    results["chunked_over_decay_floor"] = results["chunked_s"] / results["decay_floor_s"]
    results["recurrent_over_s6_floor"] = results["recurrent_s"] / results["s6_floor_s"]
    results["recurrent_over_chunked (speed-up of chunked)"] = results["recurrent_s"] / results["chunked_s"]
    for key, value in results.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v}" for k, v in value.items())
        print(f"{key:46s} {value:.4g}" if isinstance(value, float) else f"{key:46s} {value}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
