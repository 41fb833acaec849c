"""The gate-gradient kernels (``linattn/backends/cuda/gate_grad.cu``) against float64 NumPy.

    dG_t = e + Σ_{t' ≥ t} (a ⊙ b − c ⊙ d)_{t'}        (summed over the row for a per-step gate)

Tolerance, per element, from how the kernels compute: each step's value is formed in the
accumulation type (float32 for narrower data, whose products are exact there; float64
for float64 data), a sum of D products per row or one difference per entry, so within
``tolerance(acc, D)`` of the sum of its terms' magnitudes m_t = Σ (|a b| + |c d|); the
suffix sums are float64 (``tolerance(float64, T)`` of Σ m); the result is rounded once to
the storage type (half an ulp: ε of the storage type relative to |dG_t| covers it twice).
So |got − want| ≤ ε_dtype |want| + (tolerance(acc, D) + tolerance(float64, T)) M_t with
M_t = |e| + Σ_{t' ≥ t} m_{t'}.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from gpu_cases import GPU_SETTINGS, linear_inputs, to_device, torch_with_cuda
from hypothesis import given
from hypothesis import strategies as st

from linattn.backends import get_backend
from linattn.scan import causal_scan, causal_scan_vjp
from linattn.testing import machine_epsilon, tolerance


def reference(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray, end: np.ndarray | None, summed: bool
              ) -> tuple[np.ndarray, np.ndarray]:
    """dG in float64, and M_t (the magnitude of what it sums, for the tolerance)."""
    def suffix(x: np.ndarray) -> np.ndarray:
        return np.flip(np.cumsum(np.flip(x, axis=-2), axis=-2), axis=-2)
    r, m = a * b - c * d, np.abs(a * b) + np.abs(c * d)
    if summed:
        r, m = r.sum(axis=-1, keepdims=True), m.sum(axis=-1, keepdims=True)
    want, size = suffix(r), suffix(m)
    if end is not None:
        want, size = want + end[..., None, :], size + np.abs(end)[..., None, :]
    return want, size


def check(got: np.ndarray, want: np.ndarray, size: np.ndarray, dtype: str, D: int, summed: bool, what: str,
          extra: Any = 0.0) -> None:
    acc = "float64" if dtype == "float64" else "float32"
    T = want.shape[-2]
    formed = tolerance(acc, D if summed else 2) + tolerance("float64", T)
    bound = machine_epsilon(dtype) * np.abs(want) + formed * size + extra
    err = np.abs(got.astype(np.float64) - want)
    bad = ~(err <= bound)  # NaN (memory left unwritten) fails
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {err.size} outside the bound; worst ratio "
                           f"{float(np.nanmax(np.where(bad, err / np.maximum(bound, 1e-300), 0.0)))}")


@st.composite
def gate_gradient_problems(draw: Any) -> dict[str, Any]:
    return {
        "lead": draw(st.sampled_from([(1,), (3,), (2, 3), (2, 1, 3)])),
        "T": draw(st.integers(1, 700)),  # several blocks of 32 rows; segments of many steps at W ≥ 32
        "D": draw(st.sampled_from((1, 7, 16, 32, 64, 100, 128, 256))),  # 1 and 7: the unvectorised loads
        "summed": draw(st.booleans()),
        "end": draw(st.booleans()),
        "layout": draw(st.sampled_from(["contiguous", "time-major view", "offset"])),
        "dtype": draw(st.sampled_from(["float64", "float32", "float16"])),
        "seed": draw(st.integers(0, 2**31)),
    }


def device_operands(cp: Any, host: list[np.ndarray], layout: str, dtype: str) -> list[Any]:
    """The operands on the device, contiguous, as (..., T, D) views of time-major (T, ..., D) data,
    or starting one element into their allocation (rows not aligned for vector loads)."""
    out = []
    for x in host:
        if layout == "time-major view":
            y = cp.ascontiguousarray(cp.asarray(np.moveaxis(x, -2, 0), dtype=dtype))
            out.append(cp.moveaxis(y, 0, -2))
        elif layout == "offset":
            flat = cp.empty(x.size + 1, dtype=dtype)
            flat[1:] = cp.asarray(x.ravel(), dtype=dtype)
            out.append(flat[1:].reshape(x.shape))
        else:
            out.append(cp.asarray(x, dtype=dtype))
    return out


def _problem(p: dict[str, Any]) -> tuple[list[np.ndarray], np.ndarray | None]:
    rng = np.random.default_rng(p["seed"])
    shape = (*p["lead"], p["T"], p["D"])
    host = [rng.standard_normal(shape).astype(p["dtype"]).astype(np.float64) for _ in range(4)]
    end = rng.standard_normal((*p["lead"], 1 if p["summed"] else p["D"])) if p["end"] else None
    return host, end


@pytest.mark.usefixtures("nan_memory")
@GPU_SETTINGS
@given(gate_gradient_problems())
def test_gate_gradient_kernels_match_float64_and_repeat_bitwise(cp: Any, problem: dict[str, Any]) -> None:
    host, end = _problem(problem)
    kernel = get_backend("cupy").kernel("gate_gradient")
    dev = device_operands(cp, host, problem["layout"], problem["dtype"])
    end_dev = None if end is None else cp.asarray(end, dtype="float64" if problem["dtype"] == "float64" else "float32")
    first = kernel(*dev, end_dev, problem["summed"])
    second = kernel(*dev, end_dev, problem["summed"])
    assert first.dtype == problem["dtype"] and first.shape == (*problem["lead"], problem["T"],
                                                               1 if problem["summed"] else problem["D"])
    assert bool(cp.all(first == second)), "two runs differ"
    want, size = reference(*host, end, problem["summed"])
    check(cp.asnumpy(first), want, size, problem["dtype"], problem["D"], problem["summed"], str(problem))


@pytest.mark.usefixtures("nan_memory")
@pytest.mark.parametrize(("T", "D", "summed"), [(20000, 128, True), (5000, 128, False), (3001, 33, False)])
def test_gate_gradient_kernels_over_long_runs(cp: Any, T: int, D: int, summed: bool) -> None:
    """Segments of many steps per thread (20000 steps over 1024 segments; 5000 over 32), and a
    column tile cut short (33 columns: 32 and 1)."""
    p = {"lead": (2,), "T": T, "D": D, "summed": summed, "end": True, "dtype": "float32", "seed": 3}
    host, end = _problem(p)
    got = get_backend("cupy").kernel("gate_gradient")(*(cp.asarray(x, dtype="float32") for x in host),
                                                      cp.asarray(end, dtype="float32"), summed)
    want, size = reference(*host, end, summed)
    check(cp.asnumpy(got), want, size, "float32", D, summed, f"T={T}, D={D}")


def test_gate_gradient_kernels_decline_what_they_do_not_cover(cp: Any) -> None:
    """Operands of different shapes (GQA), more than three leading axes, T = 0: None, so the reference runs."""
    kernel = get_backend("cupy").kernel("gate_gradient")
    x = cp.ones((2, 3, 5, 4), dtype="float32")
    assert kernel(x, x, x[:, :1], x[:, :1], None, True) is None
    y = cp.ones((1, 2, 1, 3, 5, 4), dtype="float32")
    assert kernel(y, y, y, y, None, True) is None
    z = cp.ones((2, 0, 4), dtype="float32")
    assert kernel(z, z, z, z, None, True) is None


@pytest.mark.usefixtures("nan_memory")
@pytest.mark.parametrize("gates", ["step", "key", "key+value"])
def test_vjp_takes_the_gate_gradient_kernel_without_gqa(cp: Any, monkeypatch: pytest.MonkeyPatch, gates: str) -> None:
    """causal_scan_vjp on CuPy asks the kernel for each gate when q and k (o and v) share a
    shape, with the final state's term as its end value.

    Checked against the float64 gradient of the same float32 values: the kernels' dq, dk,
    dv (checked by test_cuda_scan) and the forward's o and final state, which the same
    deterministic kernels give again here; the final-state term e = Σ dS ⊙ S_T is a
    float32 sum of Dk·Dv (or Dv) products, allowed tolerance(float32, Dk·Dv) of its terms.
    """
    backend = get_backend("cupy")
    calls = []
    kernel = backend.kernels["gate_gradient"]
    monkeypatch.setitem(backend.kernels, "gate_gradient", lambda *args: calls.append(args[-1]) or kernel(*args))
    p = {"lead_q": (2, 3, 1), "lead_kv": (2, 3, 1), "T": 150, "Dk": 64, "Dv": 100, "gates": gates,
         "regime": "mild", "initial": True, "dtype": "float32", "seed": 4}
    rng = np.random.default_rng(5)
    host = linear_inputs(p)
    host["do"] = rng.standard_normal((*p["lead_q"], p["T"], p["Dv"]))
    host["dfinal_state"] = rng.standard_normal((*p["lead_kv"], p["Dk"], p["Dv"]))
    dev = to_device(cp, host, "float32")
    got = causal_scan_vjp(**dev, backend="cupy")
    assert calls == {"step": [True], "key": [False], "key+value": [False, False]}[gates]
    o, final = causal_scan(dev["q"], dev["k"], dev["v"], gk=dev["gk"], gv=dev["gv"],
                           initial_state=dev["initial_state"], backend="cupy")
    f64 = lambda x: cp.asnumpy(x).astype(np.float64)  # noqa: E731
    dS_S = f64(dev["dfinal_state"]) * f64(final)
    terms = {"dgk": (f64(dev["q"]), f64(got.dq), f64(dev["k"]), f64(got.dk), dS_S.sum(-1), np.abs(dS_S).sum(-1)),
             "dgv": (f64(o), f64(dev["do"]), f64(dev["v"]), f64(got.dv), dS_S.sum(-2), np.abs(dS_S).sum(-2))}
    for name, (a, b, c, d, end, end_size) in terms.items():
        gate = dev["gk" if name == "dgk" else "gv"]
        if gate is None:
            assert getattr(got, name) is None
            continue
        summed = gate.shape[-1] == 1
        if summed:
            end, end_size = end.sum(-1, keepdims=True), end_size.sum(-1, keepdims=True)
        want, size = reference(a, b, c, d, end, summed)
        extra = tolerance("float32", p["Dk"] * p["Dv"]) * end_size[..., None, :]
        check(f64(getattr(got, name)), want, size, "float32", a.shape[-1], summed, name, extra)


def test_bfloat16_torch_tensors_through_the_gate_gradient_kernel(cp: Any) -> None:
    """bfloat16 PyTorch views of (B, T, H, D) data, as a simple-GLA backward hands them over."""
    torch = torch_with_cuda()
    rng = np.random.default_rng(6)
    B, T, H, D = 2, 777, 3, 128
    tensors = [torch.tensor(rng.standard_normal((B, T, H, D)), dtype=torch.bfloat16, device="cuda") for _ in range(4)]
    views = [t.transpose(1, 2) for t in tensors]
    got = get_backend("cupy").kernel("gate_gradient")(*views, None, True)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.bfloat16 and got.shape == (B, H, T, 1)
    host = [v.double().cpu().numpy() for v in views]
    want, size = reference(*host, None, True)
    check(got.double().cpu().numpy(), want, size, "bfloat16", D, True, "bf16 views")
