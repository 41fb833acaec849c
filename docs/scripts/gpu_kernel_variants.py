"""Check and time the variants of linattn's tensor-core scan kernels on a CUDA GPU, in one run.

Run on the GPU machine (PyTorch, Triton; FLA optional)::

    PYTHONPATH=. python docs/scripts/gpu_kernel_variants.py [--shapes 1x8192x96x128 ...] [--ops delta ...]

Variants: the tensor-core chunked kernels with float32-accurate intermediates, the linear
scan's and the delta rule's on Hopper's warpgroup products ("wg", the default where the
GPU has them; "wg-one": the delta rule's with one warpgroup per block) or on mma.sync
("tc"); the linear scan's with intermediates rounded once to the storage type
("wg-round", "tc-round", as FLA does; linear and simple_gla only); and the CUDA-core
recurrent kernels ("cuda-core"). For each shape and op (linear, simple_gla, gla, delta, gated_delta)
it prints the relative error of every variant against a float64 reference (on the GPU)
and the median time of each variant and of FLA's chunk kernel, with the copy-bandwidth
floor. Kernel development notes go in docs/gpu.rst.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

import torch
from gpu_peers import copy_bandwidth, fla, heads_first, inputs, median_ms  # this folder is on sys.path

from linattn.backends import _cuda_chunk, _cuda_delta_chunk, _cuda_gla_chunk
from linattn.delta_scan import delta_scan
from linattn.scan import causal_scan

_OTHERS_ON = {(_cuda_delta_chunk, "ENABLED"): True, (_cuda_gla_chunk, "ENABLED"): True,
              (_cuda_delta_chunk, "WG_GROUPS"): (2, 1)}
_WG = {(_cuda_chunk, "WGMMA"): True, (_cuda_delta_chunk, "WGMMA"): True}
VARIANTS = {
    "wg": {(_cuda_chunk, "ENABLED"): True, **_WG, (_cuda_chunk, "SPLIT"): True, **_OTHERS_ON},
    # The delta rule's warpgroup scan with one warpgroup (64 value columns) per block wherever it runs.
    "wg-one": {(_cuda_chunk, "ENABLED"): True, **_WG, (_cuda_chunk, "SPLIT"): True, **_OTHERS_ON,
               (_cuda_delta_chunk, "WG_GROUPS"): (1,)},
    "tc": {(_cuda_chunk, "ENABLED"): True, (_cuda_chunk, "WGMMA"): False, (_cuda_delta_chunk, "WGMMA"): False,
           (_cuda_chunk, "SPLIT"): True, **_OTHERS_ON},
    "wg-round": {(_cuda_chunk, "ENABLED"): True, (_cuda_chunk, "WGMMA"): True, (_cuda_chunk, "SPLIT"): False},
    "tc-round": {(_cuda_chunk, "ENABLED"): True, (_cuda_chunk, "WGMMA"): False, (_cuda_chunk, "SPLIT"): False},
    "cuda-core": {(_cuda_chunk, "ENABLED"): False, (_cuda_delta_chunk, "ENABLED"): False,
                  (_cuda_gla_chunk, "ENABLED"): False},
}
# The ops whose float64 reference is the float64 CUDA-core kernel (tested against the NumPy loop in tests/gpu).
KERNEL_REFERENCE_OPS = ("delta", "gated_delta", "gla")
DELTA_OPS = ("delta", "gated_delta")


@contextlib.contextmanager
def variant(name: str) -> Any:
    saved = {key: getattr(*key) for key in VARIANTS[name]}
    for (module, attr), value in VARIANTS[name].items():
        setattr(module, attr, value)
    try:
        yield
    finally:
        for (module, attr), value in saved.items():
            setattr(module, attr, value)


def linear_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
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


def call_of(op: str, x: dict[str, torch.Tensor]) -> Any:
    """linattn's call for ``op`` on the (B, T, H, D) inputs of ``gpu_peers.inputs``, as (B, H, T, D) views."""
    q, k, v, kn, g, gk, beta = heads_first(x["q"], x["k"], x["v"], x["kn"], x["g"], x["gk"], x["beta"])
    if op == "gla":
        return lambda: causal_scan(q, k, v, gk=gk, backend="cupy")
    if op in DELTA_OPS:
        gate = g if op == "gated_delta" else None
        return lambda: delta_scan(q, kn, v, beta, g=gate, backend="cupy")
    return lambda: causal_scan(q, k, v, gk=g if op == "simple_gla" else None, backend="cupy")


def reference(op: str, x: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float64 outputs (B, H, T, Dv): the linear scans by their definition, the others by the float64 kernel."""
    if op in KERNEL_REFERENCE_OPS:  # the CUDA-core kernel in float64, tested against the NumPy loop in tests/gpu
        return call_of(op, {name: t.double() for name, t in x.items()})()[0]
    return linear_reference(x["q"], x["k"], x["v"], x["g"] if op == "simple_gla" else None)


def kernel_times(call: Any) -> None:
    """The GPU time of each kernel in one call, by the PyTorch profiler."""
    call()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    for event in prof.key_averages():
        if event.device_time_total > 0:
            print(f"{'':>16} {event.key[:60]:>60} {event.device_time_total / 1e3:8.3f} ms", flush=True)


def measure(shape: tuple[int, int, int, int], dname: str, variants: list[str], ops: list[str], with_fla: bool,
            bw: float, profile: bool = False) -> None:
    """Print error and time of every variant (and FLA) for one shape and dtype."""
    B, T, H, D = shape
    label = "x".join(map(str, shape))
    x = inputs(shape, {"bf16": torch.bfloat16, "fp16": torch.float16}[dname])
    floor = 4 * B * T * H * D * 2 / bw * 1e3
    for op in ops:
        ref = reference(op, x)
        call = call_of(op, x)
        for name in variants:
            if op in KERNEL_REFERENCE_OPS and name.endswith("-round"):
                continue
            with variant(name):
                err = rel_error(call()[0], ref)
                ms = median_ms(call)
            print(f"{label:>16} {dname:>4} {op:>11} {name:>10} {ms:8.3f} {100 * floor / ms:7.0f} {err:9.2e}",
                  flush=True)
        del ref
        if profile:
            with variant("wg"):
                kernel_times(call)
        if with_fla:
            try:
                ms = median_ms(fla(op, x))
                print(f"{label:>16} {dname:>4} {op:>11} {'fla':>10} {ms:8.3f} {100 * floor / ms:7.0f}", flush=True)
            except Exception as error:  # a peer that rejects a case is reported, not fatal
                print(f"{label:>16} {dname:>4} {op:>11} {'fla':>10} failed: {error}"[:160])
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["1x8192x96x128", "2x16384x16x128", "16x2048x16x128"])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--ops", nargs="+", default=["linear", "simple_gla"])
    parser.add_argument("--no-fla", action="store_true")
    parser.add_argument("--profile", action="store_true", help="also list the kernels of one call of each op")
    args = parser.parse_args(argv)
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s")
    print(f"{'shape':>16} {'dt':>4} {'op':>10} {'impl':>10} {'ms':>8} {'floor %':>7} {'rel err':>9}")
    for text in args.shapes:
        B, T, H, D = map(int, text.split("x"))
        for dname in args.dtypes:
            measure((B, T, H, D), dname, args.variants, args.ops, not args.no_fla, bw, args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
