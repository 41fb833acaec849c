"""Where the host time of one small causal_scan call on the GPU goes (cProfile), for torch and CuPy inputs.

Run on the GPU machine:  PYTHONPATH=. python docs/scripts/gpu_host_overhead.py
"""

from __future__ import annotations

import cProfile
import pstats
import time

import cupy
import torch

from linattn.scan import causal_scan


def main() -> None:
    B, T, H, D = 8, 1024, 8, 64
    q, k, v = (torch.randn(B, T, H, D, device="cuda").to(torch.bfloat16).transpose(1, 2) for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(B, H, T, 1, device="cuda")).to(torch.bfloat16)
    qc, kc, vc = (cupy.random.standard_normal((B, H, T, D), dtype=cupy.float32).astype(cupy.float16)
                  for _ in range(3))
    cases = {"torch bf16": lambda: causal_scan(q, k, v, backend="cupy"),
             "torch bf16 gated": lambda: causal_scan(q, k, v, gk=g, backend="cupy"),
             "cupy fp16": lambda: causal_scan(qc, kc, vc, backend="cupy")}
    for name, call in cases.items():
        for _ in range(5):
            call()
        torch.cuda.synchronize()
        n = 200
        start = time.perf_counter()
        for _ in range(n):
            call()
        host = (time.perf_counter() - start) / n
        torch.cuda.synchronize()
        print(f"{name}: {1e6 * host:.0f} us of host time per call")
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(n):
            call()
        profile.disable()
        torch.cuda.synchronize()
        pstats.Stats(profile).sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
    main()
