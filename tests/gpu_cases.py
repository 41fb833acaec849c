"""Shared by the GPU tests (tests/gpu): hypothesis settings and the linear scan's inputs.

Kept outside the test modules so that each test module imports them by name
(the tests run with ``--import-mode=importlib`` and ``tests`` on the path).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import HealthCheck, settings

EXTREME_LOG_GATES = (0.0, -1e-3, -30.0, -1e3)
# The fixtures (CuPy, the NaN-filling allocator) hold for every example of a test, so
# their function scope is what is wanted; kernels compile on first use (no deadline).
GPU_SETTINGS = settings(max_examples=30, deadline=None, derandomize=True,
                        suppress_health_check=[HealthCheck.function_scoped_fixture])


def log_gates(rng: np.random.Generator, shape: tuple[int, ...], regime: str) -> np.ndarray:
    """Log-gates: "mild" decays, "extreme" ones (none to total), or "mixed" with some growth (g > 0)."""
    if regime == "mild":
        return -rng.uniform(0.0, 1.0, shape)
    if regime == "mixed":  # a mean of −0.375 per step keeps e^{G} bounded over the drawn lengths
        return rng.uniform(-1.0, 0.25, shape)
    return rng.choice(EXTREME_LOG_GATES, size=shape)


def linear_inputs(p: dict[str, Any]) -> dict[str, np.ndarray | None]:
    """q, k, v, the gates and the initial state of problem ``p``, in float64, rounded through p["dtype"]."""
    rng = np.random.default_rng(p["seed"])
    T, Dk, Dv, kv = p["T"], p["Dk"], p["Dv"], p["lead_kv"]
    store = lambda x: x.astype(p["dtype"]).astype(np.float64)  # noqa: E731  (the values the kernel reads)
    arrays = {
        "q": store(rng.standard_normal((*p["lead_q"], T, Dk)) / np.sqrt(Dk)),
        "k": store(rng.standard_normal((*kv, T, Dk))),
        "v": store(rng.standard_normal((*kv, T, Dv))),
        "gk": None, "gv": None, "initial_state": None,
    }
    if p["gates"] in ("step", "key", "key+value"):
        arrays["gk"] = store(log_gates(rng, (*kv, T, 1 if p["gates"] == "step" else Dk), p["regime"]))
    if p["gates"] in ("value", "key+value"):
        arrays["gv"] = store(log_gates(rng, (*kv, T, Dv), p["regime"]))
    if p["initial"]:
        arrays["initial_state"] = rng.standard_normal((*kv, Dk, Dv))
    return arrays


def to_device(cp: Any, arrays: dict[str, Any], dtype: str) -> dict[str, Any]:
    """The arrays on the GPU in ``dtype``; the states (initial, final cotangent) in its accumulation dtype."""
    out = {}
    for name, x in arrays.items():
        if x is None:
            out[name] = None
        else:  # states stay in the accumulation precision; the rest in the storage dtype
            out[name] = cp.asarray(x, dtype="float64" if dtype == "float64" else (
                "float32" if name in ("initial_state", "dfinal_state") else dtype))
    return out


def torch_with_cuda() -> Any:
    """PyTorch, where it is installed and sees a CUDA device (else the test skips)."""
    import pytest

    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA device")
    return torch
