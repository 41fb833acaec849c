"""Where the host time of one small causal_scan call on the GPU goes, for torch and CuPy inputs.

Prints the host time per call of each step of the call's path (front end, conversion,
allocation, launch), the GPU time of the same call with the host hidden (the calls are
queued behind a sleeping kernel), and a cProfile of the whole call.

Run on the GPU machine:  PYTHONPATH=. python docs/scripts/gpu_host_overhead.py
"""

from __future__ import annotations

import cProfile
import pstats
import time
from typing import Any

import cupy
import numpy as np
import torch

from linattn import _checks
from linattn.backends import _cuda_launch, _cuda_scan, resolve_backend
from linattn.scan import _as_state_shape, causal_scan

_SLEEP = cupy.RawKernel(r'''
extern "C" __global__ void sleep_ns(long long ns) {
    long long start = clock64();  // cycles, about 1.7 per ns
    while (clock64() - start < ns * 2) { }
}''', "sleep_ns")
_NOOP = cupy.RawKernel(
    'extern "C" __global__ void noop(' + ", ".join(f"const float* p{i}" for i in range(8)) + ", "
    + ", ".join(f"long long s{i}" for i in range(32)) + ") { if (s0 == 1) *(float*)p0 = 0.f; }", "noop")
_ZEROS = tuple(np.int64(0) for _ in range(32))


def host_us(fn: Any, n: int = 100, rounds: int = 5) -> float:
    """Host time per call in microseconds, the best of ``rounds`` rounds of n calls (the GPU not waited for)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n)
        torch.cuda.synchronize()
    return 1e6 * best


def gpu_us(fn: Any, n: int = 50) -> float:
    """GPU time per call in microseconds, with the host's time hidden: the n calls queue behind a sleep."""
    host = host_us(fn, 20, 1) * 1e-6
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    _SLEEP((1,), (1,), (np.int64(int(2e9 * host * n) + 1_000_000),))
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return 1e3 * start.elapsed_time(end) / n


def main() -> None:
    B, T, H, D = 8, 1024, 8, 64
    q, k, v = (torch.randn(B, T, H, D, device="cuda").to(torch.bfloat16).transpose(1, 2) for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(B, H, T, 1, device="cuda")).to(torch.bfloat16)
    qc, kc, vc = (cupy.random.standard_normal((B, H, T, D), dtype=cupy.float32).astype(cupy.float16)
                  for _ in range(3))
    state = torch.randn(16, 16, 128, 128, device="cuda")
    q1, k1, v1 = (torch.randn(16, 16, 1, 128, device="cuda") for _ in range(3))
    xp = _checks.namespace_of(q=q, k=k, v=v)
    noop, stream = int(_NOOP.kernel.ptr), torch.cuda.current_stream().cuda_stream
    steps = {
        "namespace_of": lambda: _checks.namespace_of(q=q, k=k, v=v, gk=None, gv=None, initial_state=None),
        "resolve_backend": lambda: resolve_backend("cupy", xp),
        "_as_state_shape": lambda: _as_state_shape(xp, state, k1, v1, None, None, state),
        "Call.of": lambda: _cuda_scan.Call.of(q, k, v, None, None, state=None),
        "cupy.from_dlpack": lambda: cupy.from_dlpack(q.view(torch.int16)),
        "torch.empty": lambda: torch.empty((B, H, T, D), dtype=torch.bfloat16, device="cuda"),
        "cupy.empty": lambda: cupy.empty((B, H, T, D), dtype=cupy.float16),
        "torch stride+ptr x3": lambda: [(x.shape, x.stride(), x.data_ptr(), x.dtype) for x in (q, k, v)],
        "CuPy launch, 40 args": lambda: _NOOP((1,), (32,), (*(q.data_ptr() for _ in range(8)), *_ZEROS)),
        "cuLaunchKernel, 40 args": lambda: _cuda_launch.launch(noop, (1, 1, 1), 32, 0, stream, [q.data_ptr()] * 40),
    }
    for name, fn in steps.items():
        print(f"{name:>24}: {host_us(fn):8.1f} us host")
    cases = {"torch bf16 (8,8,1024,64)": lambda: causal_scan(q, k, v, backend="cupy"),
             "torch bf16 gated": lambda: causal_scan(q, k, v, gk=g, backend="cupy"),
             "cupy fp16": lambda: causal_scan(qc, kc, vc, backend="cupy"),
             "decode step fp32 (16,16,1,128)": lambda: causal_scan(q1, k1, v1, initial_state=state, backend="cupy"),
             "decode step direct kernel": lambda: _cuda_scan.linear_scan(q1, k1, v1, None, None, state)}
    for name, call in cases.items():
        print(f"{name}: {host_us(call):.0f} us host, {gpu_us(call):.1f} us GPU per call")
    for name, call in [*list(cases.items())[:1], *list(cases.items())[-2:]]:
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(200):
            call()
        profile.disable()
        torch.cuda.synchronize()
        print("==", name)
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
