"""Side-by-side comparison of attention methods: error against exact softmax, time, memory.

Methods take part through :func:`register_method`; each family's module registers its
own, so ``linattn compare`` grows with the library and knows nothing about any method.
"""

from __future__ import annotations

import functools
import json
import time
import tracemalloc
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from linattn.flash import flash_attention
from linattn.softmax import softmax_attention

__all__ = ["CompareRow", "ComparedMethod", "compared_methods", "format_table", "register_method", "run_compare"]


@dataclass(frozen=True)
class ComparedMethod:
    """A method as ``linattn compare`` runs it.

    Attributes
    ----------
    name : str
        The name shown and accepted by ``--methods``.
    run : callable
        ``run(q, k, v, causal=...) -> o`` on (B, T, H, D) arrays (NumPy or CuPy; the
        backend follows them).
    description : str
        One line for ``linattn compare --list``.
    supports_causal : bool
        Whether the method has a causal form (Linformer, for one, has none); methods
        without one are left out of causal comparisons.
    reference : callable, optional
        For methods that do not approximate softmax (the gated recurrences): what their
        output is compared with instead, ``reference(q, k, v, causal=...) -> o`` — their
        own definition (the recurrent form) run in float64. None: exact softmax.
    supports_noncausal : bool
        Whether the method has a non-causal form (the recurrences have none).
    """

    name: str
    run: Callable[..., Any]
    description: str
    supports_causal: bool = True
    reference: Callable[..., Any] | None = None
    supports_noncausal: bool = True


_METHODS: dict[str, ComparedMethod] = {}


def register_method(name: str, run: Callable[..., Any], *, description: str, supports_causal: bool = True,
                    reference: Callable[..., Any] | None = None, supports_noncausal: bool = True) -> None:
    """Make ``run`` available to ``linattn compare`` under ``name``.

    Parameters
    ----------
    name : str
        The name shown in the table and accepted by ``--methods``.
    run : callable
        ``run(q, k, v, causal=...) -> o`` on (B, T, H, D) arrays, every other argument
        fixed (feature counts, seeds) so that runs are repeatable.
    description : str
        One line for ``linattn compare --list``.
    supports_causal : bool, default True
        False for methods that cannot be causal; they are skipped in causal comparisons.
    reference : callable, optional
        ``reference(q, k, v, causal=...) -> o``, what the error column measures against
        for a method that does not approximate softmax (its own recurrent form); it is
        called with float64 inputs. None: exact softmax.
    supports_noncausal : bool, default True
        False for methods that are causal by construction (the recurrences); they are
        skipped in non-causal comparisons.
    """
    _METHODS[name] = ComparedMethod(name=name, run=run, description=description, supports_causal=supports_causal,
                                    reference=reference, supports_noncausal=supports_noncausal)


def compared_methods() -> dict[str, ComparedMethod]:
    """The registered methods, by name, in registration order."""
    return dict(_METHODS)


register_method(
    "softmax",
    lambda q, k, v, **kw: softmax_attention(q, k, v, **kw),
    description="exact softmax attention, direct definition (O(T·S) memory)",
)
register_method(
    "flash",
    lambda q, k, v, **kw: flash_attention(q, k, v, **kw)[0],
    description="exact softmax attention, FlashAttention-2 tiles of 64 (O(T) memory)",
)


@dataclass(frozen=True)
class CompareRow:
    """One measurement: a method at one sequence length."""

    method: str
    length: int
    rel_error: float
    seconds: float
    peak_bytes: int
    error_against: str = "softmax"


def _timed(fn: Callable[[], Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _peak_bytes(fn: Callable[[], Any]) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@dataclass(frozen=True)
class _Device:
    """How compare moves inputs to a backend, waits for its work, and measures its memory."""

    backend: str
    move: Callable[[Any], Any]
    wait: Callable[[], None]
    peak_bytes: Callable[[Callable[[], Any]], int]
    to_host: Callable[[Any], Any]


def _device(backend: str) -> _Device:
    """The ``"numpy"`` host, or a ``"cupy"`` GPU (peak memory from an emptied memory pool)."""
    if backend == "numpy":
        return _Device("numpy", lambda x: x, lambda: None, _peak_bytes, np.asarray)
    if backend != "cupy":
        raise ValueError(f"backend must be 'numpy' or 'cupy', got {backend!r}")
    try:
        import cupy
        cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # ImportError, or CUDARuntimeError without a driver or device
        raise ValueError(f"backend='cupy' needs CuPy and a CUDA device: {error}") from None

    def peak(fn: Callable[[], Any]) -> int:
        pool = cupy.get_default_memory_pool()
        cupy.cuda.Device().synchronize()
        pool.free_all_blocks()
        before = pool.total_bytes()
        fn()
        cupy.cuda.Device().synchronize()
        return int(pool.total_bytes() - before)

    return _Device("cupy", cupy.asarray, lambda: cupy.cuda.Device().synchronize(), peak, cupy.asnumpy)


def run_compare(
    lengths: Sequence[int],
    *,
    dim: int = 64,
    heads: int = 4,
    batch: int = 1,
    dtype: str = "float32",
    causal: bool = True,
    methods: Iterable[str] | None = None,
    repeats: int = 3,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    backend: str = "numpy",
) -> list[CompareRow]:
    """Measure each method at each length against exact softmax computed in float64.

    The relative error is ||o − o_ref||_F / ||o_ref||_F, with o_ref the float64 softmax
    of the same (rounded) inputs; the time is the best of ``repeats`` calls; the peak
    memory is the largest amount traced by :mod:`tracemalloc` during one call (NumPy
    reports its array buffers there), beyond what existed before the call.

    Parameters
    ----------
    lengths : sequence of int
        Sequence lengths T (= S).
    dim, heads, batch : int
        D (= Dk = Dv), H and B.
    dtype : str
        Input dtype ("float16", "float32" or "float64").
    causal : bool
        Causal attention.
    methods : iterable of str, optional
        Registered method names; all by default.
    repeats : int
        Timed calls per measurement.
    seed : int
        Seed of the random inputs (standard normal).
    progress : callable, optional
        Called with a label before each measurement.
    backend : {"numpy", "cupy"}
        Where the methods run. With ``"cupy"`` the inputs are CuPy arrays, each timed
        call waits for the GPU, and the peak memory is what CuPy's memory pool held at
        most during a call. The references always run in float64 on NumPy.

    Returns
    -------
    list of CompareRow
    """
    registry = compared_methods()
    names = list(registry) if methods is None else list(methods)
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ValueError(f"methods must be among {list(registry)}, got unknown {unknown}")
    wrong_kind = [n for n in names if not (registry[n].supports_causal if causal else registry[n].supports_noncausal)]
    if methods is not None and wrong_kind:
        flag, kind = ("--non-causal", "causal") if causal else ("causal mode (no --non-causal)", "non-causal")
        raise ValueError(f"methods {wrong_kind} have no {kind} form; compare them in {flag}")
    names = [n for n in names if n not in wrong_kind]
    device = _device(backend)
    rng = np.random.default_rng(seed)
    rows = []
    for length in lengths:
        q, k, v = (rng.standard_normal((batch, length, heads, dim)).astype(dtype) for _ in range(3))
        wide = [x.astype(np.float64) for x in (q, k, v)]
        exact = softmax_attention(*wide, causal=causal)
        for name in names:
            if progress is not None:
                progress(f"{name} T={length}")
            method = registry[name]
            desired = exact if method.reference is None else np.asarray(method.reference(*wide, causal=causal))
            inputs = [device.move(x) for x in (q, k, v)]
            run = functools.partial(method.run, *inputs, causal=causal)

            def call(run: Callable[[], Any] = run) -> Any:
                out = run()
                device.wait()
                return out

            o = np.asarray(device.to_host(call()), dtype=np.float64)
            norm = float(np.linalg.norm(desired))
            rel_error = float(np.linalg.norm(o - desired)) / norm if norm > 0 else 0.0
            against = "softmax" if method.reference is None else "definition"
            rows.append(CompareRow(name, int(length), rel_error, _timed(call, repeats), device.peak_bytes(call),
                                   against))
    return rows


def format_table(rows: Sequence[CompareRow]) -> str:
    """Render rows as a fixed-width text table."""
    header = (f"{'method':<12} {'T':>7} {'rel. error':>11} {'against':>15} {'time (ms)':>11} "
              f"{'peak memory (MiB)':>18}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.method:<12} {r.length:>7d} {r.rel_error:>11.2e} {r.error_against:>15} {r.seconds * 1e3:>11.2f} "
            f"{r.peak_bytes / 2**20:>18.2f}"
        )
    return "\n".join(lines)


def rows_to_json(rows: Sequence[CompareRow], settings: dict[str, Any]) -> str:
    """Serialise rows and the settings that produced them."""
    return json.dumps({"settings": settings, "rows": [asdict(r) for r in rows]}, indent=2)
