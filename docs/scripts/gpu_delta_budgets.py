"""Time the delta rule's CUDA-core kernels (forward and gradients) under several kernel shapes, in one run.

Run on the GPU machine (PyTorch, Triton)::

    PYTHONPATH=. python docs/scripts/gpu_delta_budgets.py [--shapes 1x8192x96x128 ...]

A shape target (:class:`linattn.backends._cuda_scan.Budget`) sets the state registers
each lane holds and the threads per block: fewer registers split a column's rows over
more lanes (a shorter chain of dependent steps per lane, one more shuffle per readout),
more threads put more warps on a multiprocessor. For each target it prints the median
time of ``delta_scan`` and of ``delta_scan_vjp`` (bf16, gated), and the largest
difference of their results from the default target's, relative to the largest value
(the targets change the order of the float32 sums only).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch
from gpu_peers import heads_first, inputs, median_ms  # this folder is on sys.path when run as a script

from linattn.backends import _cuda_delta_grad
from linattn.backends import _cuda_scan as cs
from linattn.delta_grad import delta_scan_vjp
from linattn.delta_scan import delta_scan

BUDGETS = {"64 regs, 64 thr": cs.Budget(64, 64), "64 regs, 256 thr": cs.Budget(64, 256),
           "32 regs, 128 thr": cs.Budget(32, 128), "64 regs, 128 thr": cs.Budget(64, 128)}


def run(shape: tuple[int, ...], budget: cs.Budget) -> tuple[dict[str, float], list[torch.Tensor]]:
    cs.DELTA_BUDGET = _cuda_delta_grad.BUDGET = budget
    x = inputs(shape, torch.bfloat16)
    q, kn, v, beta, g = heads_first(x["q"], x["kn"], x["v"], x["beta"], x["g"])
    do = torch.randn(v.shape, dtype=v.dtype, device=v.device, generator=torch.Generator("cuda").manual_seed(1))
    forward = lambda: delta_scan(q, kn, v, beta, g=g, backend="cupy")  # noqa: E731
    gradients = lambda: delta_scan_vjp(q, kn, v, beta, do, g=g, backend="cupy")  # noqa: E731
    o, _ = forward()
    grads = gradients()
    results = [o, grads.dq, grads.dk, grads.dv, grads.dbeta, grads.dg]
    return {"forward": median_ms(forward), "gradients": median_ms(gradients)}, [r.float() for r in results]


def profile(shape: tuple[int, ...]) -> None:
    """The GPU time of each kernel in one ``delta_scan_vjp`` call (the default targets), by the PyTorch profiler."""
    cs.DELTA_BUDGET = _cuda_delta_grad.BUDGET = cs.HEAVY
    x = inputs(shape, torch.bfloat16)
    q, kn, v, beta, g = heads_first(x["q"], x["kn"], x["v"], x["beta"], x["g"])
    do = torch.randn(v.shape, dtype=v.dtype, device=v.device, generator=torch.Generator("cuda").manual_seed(1))
    delta_scan_vjp(q, kn, v, beta, do, g=g, backend="cupy")
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        delta_scan_vjp(q, kn, v, beta, do, g=g, backend="cupy")
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["1x8192x96x128", "16x2048x16x128"])
    parser.add_argument("--json", default=None)
    parser.add_argument("--profile", action="store_true", help="also list the kernels of one gradient call")
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    print(f"{torch.cuda.get_device_name()}")
    print(f"{'shape':>16} {'target':>18} {'fwd ms':>8} {'grad ms':>8} {'max rel diff':>12}")
    for text in args.shapes:
        shape = tuple(int(n) for n in text.split("x"))
        baseline = None
        for name, budget in BUDGETS.items():
            times, results = run(shape, budget)
            if baseline is None:
                baseline = results
            diff = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
                       for a, b in zip(results, baseline, strict=True))
            rows.append({"shape": list(shape), "target": name, **times, "max_rel_diff": diff})
            print(f"{text:>16} {name:>18} {times['forward']:8.3f} {times['gradients']:8.3f} {diff:12.2e}")
            torch.cuda.empty_cache()
    if args.profile:
        profile(tuple(int(n) for n in args.shapes[0].split("x")))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows, "command": " ".join(sys.argv)}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
