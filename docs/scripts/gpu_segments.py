"""Time the linear scans with a forced number of time segments, to place the launchers' segment rules.

Run on the GPU machine (PyTorch installed)::

    PYTHONPATH=. python docs/scripts/gpu_segments.py [--dtype bf16|fp32] [--shapes 4x2048x16x128 ...]
                                                     [--segments 1 2 4]

For each (B, T, H, D) shape ((B, H, T, D) tensors) and each of the linear and
scalar-gated scans it prints the host time of one call from Python and the GPU time with
the host hidden (``gpu_host_overhead.py``'s ``host_us`` and ``gpu_us``), first with the
launcher's own choice of segments ("auto"), then with each count of ``--segments``
forced. bfloat16 runs the tensor-core kernels (``_cuda_chunk._segments``), float32 the
CUDA-core one (``_cuda_scan._segments``). Segments split time into P pieces run as three
passes (each segment's own state, the join, the outputs), so they pay when few (batch,
head) pairs would leave multiprocessors idle and each piece still has many steps to walk.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from gpu_host_overhead import gpu_us, host_us  # this folder is on sys.path

from linattn.backends import _cuda_chunk, _cuda_scan
from linattn.scan import causal_scan

SHAPES = ["4x2048x16x128", "4x4096x16x128", "2x8192x16x128"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=SHAPES, metavar="BxTxHxD")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--segments", nargs="+", type=int, default=[1, 2, 4])
    args = parser.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    forced: dict[str, int | None] = {"P": None}

    def forcing(rule: Any) -> Any:
        return lambda *a: rule(*a) if forced["P"] is None else forced["P"]

    _cuda_chunk._segments = forcing(_cuda_chunk._segments)
    _cuda_scan._segments = forcing(_cuda_scan._segments)
    for spec in args.shapes:
        B, T, H, D = map(int, spec.split("x"))
        q, k, v = (torch.randn(B, H, T, D, device="cuda").to(dtype) for _ in range(3))
        g = (torch.nn.functional.logsigmoid(torch.randn(B, H, T, 1, device="cuda")) / 16).to(dtype)
        calls = {"linear": lambda q=q, k=k, v=v: causal_scan(q, k, v, backend="cupy"),
                 "simple_gla": lambda q=q, k=k, v=v, g=g: causal_scan(q, k, v, gk=g, backend="cupy")}
        for name, call in calls.items():
            for P in (None, *args.segments):
                forced["P"] = P
                print(f"{spec} {args.dtype} {name} P={P or 'auto'}: host {host_us(call):.0f} us, "
                      f"gpu {gpu_us(call):.1f} us", flush=True)
            forced["P"] = None
    return 0


if __name__ == "__main__":
    sys.exit(main())
