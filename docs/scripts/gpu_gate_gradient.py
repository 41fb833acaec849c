"""Time and check the scalar-gated backward's gate gradient on a CUDA GPU: kernel against array operations.

Run on the GPU machine (PyTorch, CuPy)::

    PYTHONPATH=. python docs/scripts/gpu_gate_gradient.py [--shapes 2x16384x16x128 ...] [--json out.json]

For each (B, T, H, D) shape it times the simple-GLA forward + backward (``causal_scan``
then ``causal_scan_vjp``, bfloat16) three ways in one run:

- "kernel": as the library runs it, the CuPy backend's ``gate_gradient`` kernel
  (``cuda/gate_grad.cu``) summing the scans' float32 (``wide``) dq and dk;
- "rounded scans": the same kernel given dq and dk rounded to bfloat16 by the scans (the
  scan kernels' ``wide`` argument dropped: how stops up to 24 ran);
- "array ops": no gate kernel; the reference's array operations (products, a row sum, a
  reverse cumulative sum) form dg from the float32 dq and dk.

It also gives the relative error ‖dg − dg₆₄‖ / ‖dg₆₄‖ of each against the gradient of the
same bfloat16 inputs in float64 (the float64 kernels, tested against NumPy in tests/gpu),
and, where flash-linear-attention is installed, that of FLA's ``chunk_simple_gla``
backward (its refusal on Triton < 3.7.1 lifted, as ``gpu_peers.py --fla-guard-lifted`` does)
and the time of FLA's forward + backward, timed as ``gpu_peers.py`` times it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any

import torch
from gpu_peers import (  # this folder is on sys.path
    fla,
    fla_fwd_bwd,
    fla_guard_lifted,
    gpu_ms,
    heads_first,
    inputs,
    median_ms,
)

from linattn.backends import get_backend
from linattn.scan import causal_scan, causal_scan_vjp

SHAPES = ["2x16384x16x128", "1x8192x96x128", "16x2048x16x128", "4x4096x64x128", "4x2048x16x128", "8x1024x8x64",
          "8x2048x32x256"]


VARIANTS = ("kernel", "rounded scans", "array ops")


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    """The CuPy backend's kernels as ``name`` runs them (see the module docstring), restored after."""
    kernels = get_backend("cupy").kernels
    saved = dict(kernels)
    if name == "rounded scans":
        for scan in ("causal_scan", "causal_scan_reversed"):
            kernels[scan] = lambda *args, wide=False, _scan=saved[scan]: _scan(*args)
    elif name == "array ops":
        del kernels["gate_gradient"]
    try:
        yield
    finally:
        kernels.clear()
        kernels.update(saved)


def measure(shape: tuple[int, ...]) -> dict[str, Any]:
    x = inputs(shape, torch.bfloat16)
    q, k, v, g = heads_first(x["q"], x["k"], x["v"], x["g"])
    do = torch.randn_like(q[..., : v.shape[-1]])

    def run() -> Any:
        causal_scan(q, k, v, gk=g, backend="cupy")
        return causal_scan_vjp(q, k, v, do, gk=g, backend="cupy")

    row: dict[str, Any] = {"shape": list(shape)}
    exact = causal_scan_vjp(*(t.double() for t in (q, k, v, do)), gk=g.double(), backend="cupy").dgk
    for name in VARIANTS:
        with variant(name):
            dg = run().dgk.double()
            row[name] = {"ms": median_ms(run), "gpu_ms": gpu_ms(run),
                         "dg_rel_error": float((dg - exact).norm() / exact.norm())}
    try:
        row["fla dg_rel_error"] = fla_dg_error(x, do, exact)
    except ImportError:
        return row
    fla_run = fla_guard_lifted(fla_fwd_bwd("simple_gla", x))
    row["fla"] = {"ms": median_ms(fla_run), "gpu_ms": gpu_ms(fla_run)}
    return row


def fla_dg_error(x: dict[str, torch.Tensor], do: torch.Tensor, exact: torch.Tensor) -> float:
    """‖dg − dg₆₄‖ / ‖dg₆₄‖ of FLA's chunk_simple_gla backward with the same inputs and do."""
    leaves = {name: t.detach().clone().requires_grad_(True) for name, t in x.items()}

    def backward() -> None:
        o = fla("simple_gla", leaves)()
        (o[0] if isinstance(o, tuple) else o).backward(do.transpose(1, 2))
    fla_guard_lifted(backward)()
    (dg,) = heads_first(leaves["g"].grad)
    return float((dg.double() - exact).norm() / exact.norm())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=SHAPES)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    rows = []
    print(f"{torch.cuda.get_device_name()}: simple GLA fwd+bwd, bfloat16, ms (GPU ms); dg relative error vs float64")
    for text in args.shapes:
        row = measure(tuple(int(n) for n in text.split("x")))
        rows.append(row)
        cells = [f"{name} {row[name]['ms']:.3f} ({row[name]['gpu_ms']:.3f}) err {row[name]['dg_rel_error']:.2e}"
                 for name in VARIANTS]
        fla_cell = ""
        if "fla" in row:
            fla_cell = (f"  |  FLA {row['fla']['ms']:.3f} ({row['fla']['gpu_ms']:.3f}) err "
                        f"{row['fla dg_rel_error']:.2e}, x {row['fla']['ms'] / row['kernel']['ms']:.2f}")
        print(f"{text:>16}  " + "  |  ".join(cells) + fla_cell, flush=True)
        if args.json:  # after each row, so that a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump({"gpu": torch.cuda.get_device_name(), "command": " ".join(sys.argv), "rows": rows}, f,
                          indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
