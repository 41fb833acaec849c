"""Check and time the variants of linattn's linear-scan kernels on a CUDA GPU, in one run.

Run on the GPU machine (PyTorch, Triton; FLA optional)::

    PYTHONPATH=. python docs/scripts/gpu_kernel_variants.py [--shapes 1x8192x96x128 ...]

Variants: the tensor-core chunked kernel with float32-accurate intermediates ("tc",
the default), the same with intermediates rounded once to the storage type ("tc-round",
as FLA does), and the CUDA-core recurrent kernel ("cuda-core"). For each shape and op
(linear, simple_gla) it prints the relative error of every variant against a float64
reference (torch, on the GPU) and the median time of each variant and of FLA's chunk
kernel, with the copy-bandwidth floor. Kernel development notes go in docs/gpu.rst.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from gpu_peers import copy_bandwidth, median_ms  # this folder is on sys.path when run as a script

from linattn.backends import _cuda_chunk
from linattn.scan import causal_scan

VARIANTS = {"tc": {"ENABLED": True, "SPLIT": True}, "tc-round": {"ENABLED": True, "SPLIT": False},
            "cuda-core": {"ENABLED": False, "SPLIT": True}}


@contextlib.contextmanager
def variant(name: str) -> Any:
    saved = {key: getattr(_cuda_chunk, key) for key in VARIANTS[name]}
    for key, value in VARIANTS[name].items():
        setattr(_cuda_chunk, key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(_cuda_chunk, key, value)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    """o_i = Σ_{j≤i} e^{G_i − G_j} (q_i·k_j) v_j in float64, chunked over i to bound memory: (B, H, T, Dv)."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    T = q.shape[2]
    G = None if g is None else g.double().transpose(1, 2).cumsum(-1)  # (B, H, T)
    out = torch.empty(*q.shape[:3], v.shape[-1], dtype=torch.float64, device=q.device)
    for i0 in range(0, T, 1024):
        i1 = min(T, i0 + 1024)
        scores = q[:, :, i0:i1] @ k[:, :, :i1].transpose(-1, -2)
        mask = torch.ones(i1 - i0, i1, dtype=torch.bool, device=q.device).tril(i0)
        weight = torch.where(mask, 1.0, 0.0)
        if G is not None:
            diff = G[:, :, i0:i1, None] - G[:, :, None, :i1]
            weight = torch.where(mask, diff.clamp(max=0).exp(), 0.0)
        out[:, :, i0:i1] = (scores * weight) @ v[:, :, :i1]
    return out


def rel_error(o: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.norm(o.double() - ref) / torch.linalg.norm(ref))


def fla_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None) -> Any:
    import fla.ops as ops

    if g is None:
        return lambda: ops.chunk_linear_attn(q, k, v, scale=1.0, normalize=False)
    return lambda: ops.chunk_simple_gla(q, k, v, g=g, scale=1.0)


def measure(shape: tuple[int, int, int, int], dname: str, variants: list[str], ops: list[str], with_fla: bool,
            bw: float) -> None:
    """Print error and time of every variant (and FLA) for one shape and dtype."""
    B, T, H, D = shape
    label = "x".join(map(str, shape))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dname]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = ((torch.randn(B, T, H, D, device="cuda", generator=gen) * scale).to(dtype)
               for scale in (D**-0.5, 1.0, 1.0))
    g = F.logsigmoid(torch.randn(B, T, H, device="cuda", generator=gen)).div(16).to(dtype)
    floor = 4 * B * T * H * D * 2 / bw * 1e3
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    for op, gate in (("linear", None), ("simple_gla", g)):
        if op not in ops:
            continue
        ref = reference(q, k, v, gate)
        gh = None if gate is None else gate.transpose(1, 2)[..., None]

        def call(gh: torch.Tensor | None = gh) -> Any:
            return causal_scan(qh, kh, vh, gk=gh, backend="cupy")

        for name in variants:
            with variant(name):
                err = rel_error(call()[0], ref)
                ms = median_ms(call)
            print(f"{label:>16} {dname:>4} {op:>10} {name:>10} {ms:8.3f} {100 * floor / ms:7.0f} {err:9.2e}",
                  flush=True)
        del ref
        if with_fla:
            try:
                ms = median_ms(fla_call(q, k, v, gate))
                print(f"{label:>16} {dname:>4} {op:>10} {'fla':>10} {ms:8.3f} {100 * floor / ms:7.0f}", flush=True)
            except Exception as error:  # a peer that rejects a case is reported, not fatal
                print(f"{label:>16} {dname:>4} {op:>10} {'fla':>10} failed: {error}"[:160])
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["1x8192x96x128", "2x16384x16x128", "16x2048x16x128"])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--ops", nargs="+", default=["linear", "simple_gla"])
    parser.add_argument("--no-fla", action="store_true")
    args = parser.parse_args(argv)
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s")
    print(f"{'shape':>16} {'dt':>4} {'op':>10} {'impl':>10} {'ms':>8} {'floor %':>7} {'rel err':>9}")
    for text in args.shapes:
        B, T, H, D = map(int, text.split("x"))
        for dname in args.dtypes:
            measure((B, T, H, D), dname, args.variants, args.ops, not args.no_fla, bw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
