"""CPU performance of the gated recurrences' chunked forms, against the matrix products they need.

Run from the repository root:  python docs/scripts/perf_gated.py   (add --json FILE to keep the numbers)

For each method, at T = 16384, H = 8, D = 64 in float32 (B = 1), this times in one
process, interleaved, best of several runs:

- the method's chunked form (the public function, argument checks and layout included);
- its *floor*: the batched matrix products a chunked form with chunks of C = 64 must do,
  on arrays of the same shapes — per head and chunk, the intra-chunk scores Q_c K_cᵀ
  (T·C·Dk multiply-adds), their product with V_c (T·C·Dv), the read-out of the entering
  state Q_c S_c (T·Dk·Dv) and the chunk's contribution to the state K_cᵀ V_c (T·Dk·Dv).
  Mamba-2 (one group, N = P = 64) shares its scores C_c B_cᵀ among the heads; HGRN (no
  heads, D = H·64 channels) needs only the product of each chunk's C×C decay matrix with
  its inputs;
- its recurrent form, one step per token, on T/16 tokens, scaled ×16 (its cost is
  linear in T: the same work every step).

Gates are FLA's benchmark choice, log σ(x) with x ~ N(0, 1) (mean −0.8 per step), per
step (simple GLA), per key channel (GLA, RWKV-6) or per channel (HGRN); RetNet uses its
fixed decays; Mamba-2 takes dt = softplus(x − 4) and A = −exp(U(0, 1)), as mamba-ssm's
own test of the SSD.
"""

import argparse
import json
import platform
import time

import numpy as np

from linattn import scan
from linattn.gated import gla, retention, simple_gla
from linattn.hgrn import hgrn
from linattn.mamba2 import mamba2
from linattn.rwkv import rwkv6


def best_of(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def logsigmoid(x):
    return -np.logaddexp(0.0, -x)


def four_products(H, T, Dk, Dv, C, dtype, rng):
    """Q_c K_cᵀ, (·) V_c, Q_c S_c, K_cᵀ V_c on (H, T/C, C, ·) arrays."""
    n = T // C
    qc, kc = (rng.standard_normal((H, n, C, Dk), dtype=dtype) for _ in range(2))
    vc = rng.standard_normal((H, n, C, Dv), dtype=dtype)
    states = rng.standard_normal((H, n, Dk, Dv), dtype=dtype)

    def run():
        scores = qc @ kc.swapaxes(-1, -2)
        scores @ vc
        qc @ states
        kc.swapaxes(-1, -2) @ vc

    return run


def mamba2_products(H, T, N, P, C, dtype, rng):
    """One group: C_c B_cᵀ once (shared by the heads), then per head (·) X_c, C_c S_c, B_cᵀ X_c."""
    n = T // C
    cc, bc = (rng.standard_normal((1, n, C, N), dtype=dtype) for _ in range(2))
    xc = rng.standard_normal((H, n, C, P), dtype=dtype)
    states = rng.standard_normal((H, n, N, P), dtype=dtype)

    def run():
        scores = cc @ bc.swapaxes(-1, -2)
        scores @ xc
        cc @ states
        bc.swapaxes(-1, -2) @ xc

    return run


def hgrn_products(T, D, C, dtype, rng):
    """Each chunk's C×C decay matrix times its inputs, and its column sums (the state)."""
    n = T // C
    decay = rng.random((n, C, C), dtype=dtype)
    xc = rng.standard_normal((n, C, D), dtype=dtype)
    ones = np.ones((n, 1, C), dtype=dtype)

    def run():
        decay @ xc
        ones @ xc

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--recurrent-fraction", type=int, default=16, help="time the recurrent form on T/this")
    parser.add_argument("--methods", nargs="*", help="a subset of the methods")
    parser.add_argument("--json", help="write the numbers here too")
    args = parser.parse_args()
    T, H, D, C = args.length, args.heads, args.dim, args.chunk
    f32 = np.float32
    rng = np.random.default_rng(0)

    def normal(*shape):
        return rng.standard_normal(shape, dtype=f32)

    q, k, v = normal(1, T, H, D), normal(1, T, H, D), normal(1, T, H, D)
    g_step = logsigmoid(normal(1, T, H)).astype(f32)
    g_key = logsigmoid(normal(1, T, H, D)).astype(f32)
    u = normal(H, D)
    x_ssd, B_ssd, C_ssd = normal(1, T, H, D), normal(1, T, 1, D), normal(1, T, 1, D)
    dt_ssd = (normal(1, T, H) - 4).astype(f32)
    A_ssd = -np.exp(rng.random(H)).astype(f32)
    x_hgrn, g_hgrn = normal(1, T, H * D), logsigmoid(normal(1, T, H * D)).astype(f32)

    def cut(a, n):  # the first n steps (time is axis 1 everywhere here)
        return a[:, :n]

    methods = {
        "simple_gla": (lambda a, form: simple_gla(*a[:4], form=form, chunk_size=C), (q, k, v, g_step),
                       four_products(H, T, D, D, C, f32, rng)),
        "retention": (lambda a, form: retention(*a[:3], form=form, chunk_size=C), (q, k, v),
                      four_products(H, T, D, D, C, f32, rng)),
        "mamba2": (lambda a, form: mamba2(a[0], a[1], A_ssd, a[2], a[3], dt_softplus=True, form=form, chunk_size=C),
                   (x_ssd, dt_ssd, B_ssd, C_ssd), mamba2_products(H, T, D, D, C, f32, rng)),
        "gla": (lambda a, form: gla(*a[:4], form=form, chunk_size=C), (q, k, v, g_key),
                four_products(H, T, D, D, C, f32, rng)),
        "rwkv6": (lambda a, form: rwkv6(*a[:4], u, form=form, chunk_size=C), (q, k, v, g_key),
                  four_products(H, T, D, D, C, f32, rng)),
        "hgrn": (lambda a, form: hgrn(*a[:2], form=form, chunk_size=C), (x_hgrn, g_hgrn),
                 hgrn_products(T, H * D, C, f32, rng)),
    }
    names = args.methods or list(methods)
    results = {"T": T, "H": H, "D": D, "chunk": C, "dtype": "float32", "machine": platform.processor() or
               platform.machine(), "recurrent_measured_on": T // args.recurrent_fraction,
               "scan_module": scan.__file__, "methods": {}}
    short = T // args.recurrent_fraction
    for name in names:
        run, arrays, floor = methods[name]
        small = tuple(cut(a, short) for a in arrays)
        run(tuple(cut(a, 128) for a in arrays), "chunked")  # warm-up (lazy imports, allocator)
        chunked = floor_s = float("inf")
        for _ in range(2):  # interleaved, so that a busy moment hits both
            floor_s = min(floor_s, best_of(floor, args.repeats))
            chunked = min(chunked, best_of(lambda run=run, arrays=arrays: run(arrays, "chunked"), args.repeats))
        recurrent = best_of(lambda run=run, small=small: run(small, "recurrent"), 1) * args.recurrent_fraction
        row = {"chunked_s": chunked, "floor_s": floor_s, "recurrent_s_scaled": recurrent,
               "chunked_over_floor": chunked / floor_s, "recurrent_over_chunked": recurrent / chunked}
        results["methods"][name] = row
        print(f"{name:11s} chunked {chunked * 1e3:8.1f} ms   floor {floor_s * 1e3:7.1f} ms   "
              f"x{row['chunked_over_floor']:.2f} of the floor   recurrent (scaled from T/{args.recurrent_fraction}) "
              f"{recurrent * 1e3:8.0f} ms = x{row['recurrent_over_chunked']:.1f} the chunked", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
