"""Peer benchmark on a CUDA GPU: linattn's scan kernels against flash-linear-attention (FLA),
PyTorch SDPA and the copy-bandwidth floor, all measured in one run.

Run on the GPU machine (PyTorch, Triton and FLA installed)::

    PYTHONPATH=. python docs/scripts/gpu_peers.py --json gpu_peers.json

Times are medians of CUDA-event timings (``triton.testing.do_bench``, 25 ms warm-up,
100 ms of repeats) on the same (B, T, H, D) tensors for every implementation; linattn
reads them through (B, H, T, D) views without copies. ``do_bench`` waits for the host
between calls, so where a call's Python takes longer than its kernels (the small shapes)
it times the host; each row also gets ``gpu_ms``, the GPU time with the host hidden (the
calls queued behind a GPU sleep, :func:`gpu_ms`). Every scan runs with scale 1
(FLA's ``scale=1.0``) so that all compute the same function. The floor is the time to
read q, k, v once and write o once at the measured device-to-device copy bandwidth.
Forward + backward (``--modes fwd+bwd``) runs for every op and dtype asked for (FLA's
chunk kernels' own backward; float32 where FLA accepts it). Each row is printed as it is
measured and records when (``at_s``, seconds from the start), so that a run stopped by
its time limit still shows how far it got and how long FLA's autotuning took.

FLA 0.6.0 refuses the backward of its gated chunk kernels (``chunk_simple_gla``,
``chunk_gated_delta_rule``) on Hopper with Triton 3.4-3.7.0, which it says may compute
them wrongly there (FLA issue #640). ``--fla-guard-lifted`` times those backwards with
the refusal lifted, as "fla chunk, guard lifted", and records how far FLA's dq, dk, dv
are from linattn's (themselves checked against float64 by the GPU tests), so that the
times can be read knowing whether the result was right.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
import triton.testing

from linattn.delta_grad import delta_scan_vjp
from linattn.delta_scan import delta_scan
from linattn.scan import causal_scan, causal_scan_vjp

FLA_SHAPES = [(1, 8192, 96, 128), (2, 16384, 16, 128), (4, 2048, 16, 128), (4, 4096, 64, 128), (8, 1024, 8, 64),
              (8, 2048, 32, 256), (16, 2048, 16, 128)]
SWEEP = [(4, T, 16, 128) for T in (1024, 2048, 4096, 8192, 16384)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def median_ms(fn: Any) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def host_ms(fn: Any, n: int = 200) -> float:
    """Host time of one call from Python, in ms (back-to-back calls, the GPU not waited for)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e3 * elapsed / n


def gpu_ms(fn: Any, n: int = 50) -> float:
    """GPU time of one call in ms with the host's time hidden: n calls queue behind a GPU sleep.

    The sleep (in clock cycles, ~2 per ns) outlasts the host's queueing of the n calls,
    so the events around them time the kernels back to back, not the Python between them.
    """
    cycles = int(2e6 * host_ms(fn, 20) * n) + 2_000_000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(cycles)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def copy_bandwidth() -> float:
    """Bytes read plus written per second by a 1 GiB device-to-device copy."""
    src = torch.randn(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / (median_ms(lambda: dst.copy_(src)) * 1e-3)


def heads_first(*xs: torch.Tensor) -> list[torch.Tensor]:
    """(B, T, H, D) -> (B, H, T, D) views; a (B, T, H) gate -> (B, H, T, 1)."""
    return [x.transpose(1, 2) if x.dim() == 4 else x.transpose(1, 2)[..., None] for x in xs]


def inputs(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    B, T, H, D = shape
    gen = torch.Generator(device="cuda").manual_seed(seed)
    randn = lambda *s: torch.randn(*s, device="cuda", generator=gen)  # noqa: E731
    k = randn(B, T, H, D)
    return {
        "q": (randn(B, T, H, D) * D**-0.5).to(dtype), "k": k.to(dtype), "v": randn(B, T, H, D).to(dtype),
        "kn": F.normalize(k, dim=-1).to(dtype),
        "g": F.logsigmoid(randn(B, T, H)).div(16).to(dtype),  # per-step log-decay
        "gk": F.logsigmoid(randn(B, T, H, D)).clamp(min=-5).div(16).to(dtype),  # per-key, FLA's bench clamp
        "beta": torch.sigmoid(randn(B, T, H)).to(dtype),
    }


def ours(op: str, x: dict[str, torch.Tensor]) -> Any:
    q, k, v, kn = heads_first(x["q"], x["k"], x["v"], x["kn"])
    if op == "linear":
        return lambda: causal_scan(q, k, v, backend="cupy")
    if op == "simple_gla":
        (g,) = heads_first(x["g"])
        return lambda: causal_scan(q, k, v, gk=g, backend="cupy")
    if op == "gla":
        (gk,) = heads_first(x["gk"])
        return lambda: causal_scan(q, k, v, gk=gk, backend="cupy")
    if op == "delta":
        (beta,) = heads_first(x["beta"])
        return lambda: delta_scan(q, kn, v, beta, backend="cupy")
    if op == "gated_delta":
        g, beta = heads_first(x["g"], x["beta"])
        return lambda: delta_scan(q, kn, v, beta, g=g, backend="cupy")
    raise ValueError(op)


def ours_fwd_bwd(op: str, x: dict[str, torch.Tensor]) -> Any:
    q, k, v = heads_first(x["q"], x["k"], x["v"])
    do = torch.randn_like(q[..., : v.shape[-1]])
    if op in ("delta", "gated_delta"):
        kn, beta, g = heads_first(x["kn"], x["beta"], x["g"])
        g = g if op == "gated_delta" else None

        def run_delta() -> Any:
            delta_scan(q, kn, v, beta, g=g, backend="cupy")
            return delta_scan_vjp(q, kn, v, beta, do, g=g, backend="cupy")
        return run_delta
    gk = heads_first(x["g"])[0] if op == "simple_gla" else heads_first(x["gk"])[0] if op == "gla" else None

    def run() -> Any:
        causal_scan(q, k, v, gk=gk, backend="cupy")
        return causal_scan_vjp(q, k, v, do, gk=gk, backend="cupy")
    return run


def fla(op: str, x: dict[str, torch.Tensor], mode: str = "chunk") -> Any:
    import fla.ops as ops

    q, k, v = x["q"], x["k"], x["v"]
    calls = {
        ("linear", "chunk"): lambda: ops.chunk_linear_attn(q, k, v, scale=1.0, normalize=False),
        ("linear", "fused_recurrent"): lambda: ops.fused_recurrent_linear_attn(q, k, v, scale=1.0, normalize=False),
        ("simple_gla", "chunk"): lambda: ops.chunk_simple_gla(q, k, v, g=x["g"], scale=1.0),
        ("gla", "chunk"): lambda: ops.chunk_gla(q, k, v, g=x["gk"], scale=1.0),
        ("delta", "chunk"): lambda: ops.chunk_delta_rule(q, x["kn"], v, x["beta"], scale=1.0),
        ("gated_delta", "chunk"): lambda: ops.chunk_gated_delta_rule(q, x["kn"], v, x["g"], x["beta"], scale=1.0),
    }
    return calls[(op, mode)]


def fla_fwd_bwd(op: str, x: dict[str, torch.Tensor]) -> Any:
    leaves = {name: t.detach().clone().requires_grad_(True) for name, t in x.items()}
    forward = fla(op, leaves)
    do = torch.randn_like(x["v"])

    def run() -> None:
        o = forward()
        o = o[0] if isinstance(o, tuple) else o
        o.backward(do)
    return run


def fla_guard_lifted(run: Any) -> Any:
    """``run`` (an FLA call) with FLA's refusal of its gated backward on this Triton (FLA issue #640) lifted."""
    import fla.ops.common.chunk_o as chunk_o

    def lifted() -> Any:
        saved = chunk_o.TRITON_ABOVE_3_7_1
        chunk_o.TRITON_ABOVE_3_7_1 = True  # the version check that refuses; nothing else reads it there
        try:
            return run()
        finally:
            chunk_o.TRITON_ABOVE_3_7_1 = saved
    return lifted


def fla_gradient_difference(op: str, x: dict[str, torch.Tensor]) -> dict[str, float]:
    """‖FLA's − linattn's‖ / ‖linattn's‖ for dq, dk, dv of one backward with the same ``do`` (FLA's guard lifted)."""
    leaves = {name: t.detach().clone().requires_grad_(True) for name, t in x.items()}
    do = torch.randn_like(x["v"])

    def backward() -> None:
        o = fla(op, leaves)()
        (o[0] if isinstance(o, tuple) else o).backward(do)
    fla_guard_lifted(backward)()
    q, k, v, kn, g, beta, do_h = heads_first(x["q"], x["k"], x["v"], x["kn"], x["g"], x["beta"], do)
    if op == "gated_delta":
        ours_grads = delta_scan_vjp(q, kn, v, beta, do_h, g=g, backend="cupy")
        key = "kn"
    else:
        ours_grads = causal_scan_vjp(q, k, v, do_h, gk=g, backend="cupy")
        key = "k"
    theirs = {"dq": leaves["q"].grad, "dk": leaves[key].grad, "dv": leaves["v"].grad}
    return {name: float(torch.linalg.norm(theirs[name].transpose(1, 2).double() - getattr(ours_grads, name).double())
                        / torch.linalg.norm(getattr(ours_grads, name).double())) for name in theirs}


def sdpa(x: dict[str, torch.Tensor]) -> Any:
    q, k, v = heads_first(x["q"], x["k"], x["v"])
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)


def linear_reference(x: dict[str, torch.Tensor]) -> torch.Tensor:
    """Causal linear attention in float64, (Q Kᵀ ⊙ M) V per batch element: (B, H, T, D)."""
    q, k, v = (t.double() for t in heads_first(x["q"], x["k"], x["v"]))
    T = q.shape[2]
    mask = torch.ones(T, T, device="cuda", dtype=torch.float64).tril()
    return torch.stack([((qb @ kb.transpose(-1, -2)) * mask) @ vb for qb, kb, vb in zip(q, k, v, strict=True)])


def rel_error(o: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.norm(o.double() - ref) / torch.linalg.norm(ref))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="gpu_peers.json")
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32", "fp16"])
    parser.add_argument("--ops", nargs="+", default=["linear", "simple_gla", "gla", "delta", "gated_delta"])
    parser.add_argument("--shapes", choices=["fla", "quick"], default="fla")
    parser.add_argument("--only", nargs="+", default=None, metavar="BxTxHxD",
                        help="run just these of the shapes (a later run can take the rest)")
    parser.add_argument("--modes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"])
    parser.add_argument("--no-extras", action="store_true",
                        help="skip the float32 accuracy, decoding step and T sweep parts")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds; later measurements are skipped")
    parser.add_argument("--fla-guard-lifted", action="store_true",
                        help="time FLA's gated backwards that it refuses on this Triton (see the module's docstring)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = False
    bw = copy_bandwidth()
    rows: list[dict[str, Any]] = []
    result = {"gpu": torch.cuda.get_device_name(), "copy_bandwidth_Bps": bw, "rows": rows,
              "command": "PYTHONPATH=. python docs/scripts/gpu_peers.py " + " ".join(argv or sys.argv[1:])}

    def record(**row: Any) -> None:
        row["at_s"] = round(time.perf_counter() - start, 1)  # when it was done, for planning runs
        rows.append(row)
        print(row, flush=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)

    def timed(name: str, fn: Any, **row: Any) -> None:
        if time.perf_counter() - start > args.budget:
            record(impl=name, ms=None, note="skipped: time budget", **row)
            return
        try:
            ms = median_ms(fn)
            record(impl=name, ms=ms, gpu_ms=gpu_ms(fn, 50 if ms < 2 else 10), **row)
        except Exception as error:  # a peer that rejects a shape or dtype is reported, not fatal
            record(impl=name, ms=None, note=f"{type(error).__name__}: {error}"[:200], **row)
        torch.cuda.empty_cache()

    def compared(name: str, op: str, x: dict[str, torch.Tensor], **row: Any) -> None:
        """The gradient difference of FLA's guard-lifted backward; a failure is reported, as ``timed``'s are."""
        try:
            record(impl=name, op=op, mode="gradient difference", difference=fla_gradient_difference(op, x), **row)
        except Exception as error:
            record(impl=name, op=op, mode="gradient difference", difference=None,
                   note=f"{type(error).__name__}: {error}"[:200], **row)
        torch.cuda.empty_cache()

    shapes = FLA_SHAPES if args.shapes == "fla" else [(16, 2048, 16, 128)]
    if args.only:
        shapes = [s for s in shapes if "x".join(map(str, s)) in args.only]
    for dname in args.dtypes:
        for shape in shapes:
            B, T, H, D = shape
            x = inputs(shape, DTYPES[dname])
            floor = 4 * B * T * H * D * x["q"].element_size() / bw * 1e3
            common = {"shape": list(shape), "dtype": dname}
            record(impl="floor", op="copy q,k,v,o", mode="fwd", ms=floor, **common)
            for op in args.ops if "fwd" in args.modes else ():
                timed("linattn", ours(op, x), op=op, mode="fwd", **common)
                timed("fla chunk", fla(op, x), op=op, mode="fwd", **common)
            if "linear" in args.ops and dname == "fp32":
                timed("fla fused_recurrent", fla("linear", x, "fused_recurrent"), op="linear", mode="fwd", **common)
            timed("torch sdpa", sdpa(x), op="softmax", mode="fwd", **common)
            for op in args.ops if "fwd+bwd" in args.modes else ():
                timed("linattn", ours_fwd_bwd(op, x), op=op, mode="fwd+bwd", **common)
                timed("fla chunk", fla_fwd_bwd(op, x), op=op, mode="fwd+bwd", **common)
                if args.fla_guard_lifted and op in ("simple_gla", "gated_delta"):
                    timed("fla chunk, guard lifted", fla_guard_lifted(fla_fwd_bwd(op, x)), op=op,
                          mode="fwd+bwd", **common)
                    if time.perf_counter() - start <= args.budget:
                        compared("fla chunk, guard lifted", op, x, **common)
            del x
            torch.cuda.empty_cache()

    if not args.no_extras:
        # Accuracy in float32: linattn's kernel and FLA's chunk (TF32) and fused_recurrent against float64.
        x = inputs((16, 2048, 16, 128), torch.float32)
        ref = linear_reference(x)
        import fla.ops as ops
        errors = {
            "linattn": rel_error(ours("linear", x)()[0], ref),
            "fla chunk": rel_error(ops.chunk_linear_attn(x["q"], x["k"], x["v"], scale=1.0, normalize=False)[0]
                                   .transpose(1, 2), ref),
            "fla fused_recurrent": rel_error(ops.fused_recurrent_linear_attn(x["q"], x["k"], x["v"], scale=1.0,
                                                                             normalize=False)[0].transpose(1, 2), ref),
        }
        result["fp32_rel_error_linear_16x2048x16x128"] = errors
        del x, ref

        # One decoding step: B = H = 16, Dk = Dv = 128, float32 state read and written once.
        state = torch.randn(16, 16, 128, 128, device="cuda")
        q1, k1, v1 = (torch.randn(16, 16, 1, 128, device="cuda") for _ in range(3))
        step = lambda: causal_scan(q1, k1, v1, initial_state=state, backend="cupy")  # noqa: E731
        result["decode_step"] = {"ms": median_ms(step), "floor_ms": 2 * state.numel() * 4 / bw * 1e3,
                                 "gpu_ms": gpu_ms(step), "host_ms": host_ms(step)}

        # Time against T for the plot (bf16, B=4, H=16, D=128).
        for shape in SWEEP:
            x = inputs(shape, torch.bfloat16)
            common = {"shape": list(shape), "dtype": "bf16", "sweep": True}
            record(impl="floor", op="copy q,k,v,o", mode="fwd", ms=4 * math.prod(shape) * 2 / bw * 1e3, **common)
            timed("linattn", ours("linear", x), op="linear", mode="fwd", **common)
            timed("fla chunk", fla("linear", x), op="linear", mode="fwd", **common)
            timed("torch sdpa", sdpa(x), op="softmax", mode="fwd", **common)
            del x
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print_table(result)
    return 0


def print_table(result: dict[str, Any]) -> None:
    print(f"{result['gpu']}: copy bandwidth {result['copy_bandwidth_Bps'] / 1e12:.2f} TB/s")
    groups: dict[tuple, dict[str, Any]] = {}
    for r in result["rows"]:
        if r.get("sweep"):
            continue
        key = (tuple(r["shape"]), r["dtype"], r["op"] if r["impl"] != "floor" else "floor", r["mode"])
        if r["mode"] == "gradient difference":
            print(f"{'x'.join(map(str, r['shape']))} {r['dtype']} {r['op']}: FLA (guard lifted) against linattn,"
                  f" gradients: {r['difference']}")
            continue
        groups.setdefault(key, {})[r["impl"]] = (r["ms"], r.get("gpu_ms"))
    floors = {(k[0], k[1]): v["floor"][0] for k, v in groups.items() if k[2] == "floor"}
    print(f"{'shape':>18} {'dt':>4} {'op':>11} {'mode':>7} {'linattn':>8} {'peer':>8} {'x peer':>6} {'floor':>7} "
          f"{'%bw':>5} {'gpu ours':>8} {'gpu peer':>8} {'x gpu':>6}")
    fmt = lambda v: "       -" if v is None else f"{v:8.3f}"  # noqa: E731
    ratio = lambda a, b: f"{b / a:6.2f}" if a and b else "     -"  # noqa: E731
    for (shape, dt, op, mode), impls in groups.items():
        if op == "floor":
            continue
        ours_ms, ours_gpu = impls.get("linattn", (None, None))
        peer, peer_gpu = impls.get("fla chunk", impls.get("torch sdpa", (None, None)))
        if peer is None and "fla chunk, guard lifted" in impls:
            peer, peer_gpu = impls["fla chunk, guard lifted"]
        floor = floors.get((shape, dt))
        share = f"{100 * floor / ours_ms:5.0f}" if ours_ms and floor and mode == "fwd" else "    -"
        print(f"{'x'.join(map(str, shape)):>18} {dt:>4} {op:>11} {mode:>7} {fmt(ours_ms)} {fmt(peer)} "
              f"{ratio(ours_ms, peer)} {fmt(floor)} {share} {fmt(ours_gpu)} {fmt(peer_gpu)} "
              f"{ratio(ours_gpu, peer_gpu)}")
    print("fp32 relative error, linear:", result.get("fp32_rel_error_linear_16x2048x16x128"))
    print("decode step:", result.get("decode_step"))


if __name__ == "__main__":
    sys.exit(main())
