"""Time and check the scalar-gated backward's gate gradient on a CUDA GPU: kernel against array operations.

Run on the GPU machine (PyTorch, CuPy)::

    PYTHONPATH=. python docs/scripts/gpu_gate_gradient.py [--shapes 2x16384x16x128 ...] [--json out.json]

For each (B, T, H, D) shape it times the simple-GLA forward + backward (``causal_scan``
then ``causal_scan_vjp``, bfloat16) twice in one run: with the CuPy backend's
``gate_gradient`` kernel (``cuda/gate_grad.cu``) and without it, where the reference's
array operations (products, a row sum, a reverse cumulative sum) form dg. It also gives
the relative error ‖dg − dg₆₄‖ / ‖dg₆₄‖ of both against the gradient of the same
bfloat16 inputs in float64 (the float64 kernels, tested against NumPy in tests/gpu), and,
where flash-linear-attention is installed, that of FLA's ``chunk_simple_gla`` backward
(its refusal on Triton < 3.7.1 lifted, as ``gpu_peers.py --fla-guard-lifted`` does).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch
from gpu_peers import fla, fla_guard_lifted, gpu_ms, heads_first, inputs, median_ms  # this folder is on sys.path

from linattn.backends import get_backend
from linattn.scan import causal_scan, causal_scan_vjp

SHAPES = ["2x16384x16x128", "1x8192x96x128", "16x2048x16x128", "4x4096x64x128", "4x2048x16x128", "8x1024x8x64",
          "8x2048x32x256"]


def measure(shape: tuple[int, ...]) -> dict[str, Any]:
    backend = get_backend("cupy")
    kernel = backend.kernels["gate_gradient"]
    x = inputs(shape, torch.bfloat16)
    q, k, v, g = heads_first(x["q"], x["k"], x["v"], x["g"])
    do = torch.randn_like(q[..., : v.shape[-1]])

    def run() -> Any:
        causal_scan(q, k, v, gk=g, backend="cupy")
        return causal_scan_vjp(q, k, v, do, gk=g, backend="cupy")

    row: dict[str, Any] = {"shape": list(shape)}
    exact = causal_scan_vjp(*(t.double() for t in (q, k, v, do)), gk=g.double(), backend="cupy").dgk
    for name, on in (("kernel", True), ("array ops", False)):
        if on:
            backend.kernels["gate_gradient"] = kernel
        else:
            del backend.kernels["gate_gradient"]
        try:
            dg = run().dgk.double()
            row[name] = {"ms": median_ms(run), "gpu_ms": gpu_ms(run),
                         "dg_rel_error": float((dg - exact).norm() / exact.norm())}
        finally:
            backend.kernels["gate_gradient"] = kernel
    try:
        row["fla dg_rel_error"] = fla_dg_error(x, do, exact)
    except ImportError:
        pass
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
                 for name in ("kernel", "array ops")]
        fla_cell = f"  |  FLA err {row['fla dg_rel_error']:.2e}" if "fla dg_rel_error" in row else ""
        print(f"{text:>16}  " + "  |  ".join(cells) + fla_cell, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "command": " ".join(sys.argv), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
