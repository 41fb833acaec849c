"""The gate-gradient kernels (``linattn/backends/cuda/gate_grad.cu``) against float64 NumPy.

    dG_t = e + Σ_{t' ≥ t} (a ⊙ b − c ⊙ d)_{t'}        (summed over the row for a per-step gate)

Tolerance, per element, from how the kernels compute: each step's value is formed in the
accumulation type (float32 for narrower data, whose products are exact there; float64
for float64 data), a sum of D products per row or one difference per entry, so within
``tolerance(acc, D)`` of the sum of its terms' magnitudes m_t = Σ (|a b| + |c d|); the
suffix sums are float64 (``tolerance(float64, T)`` of Σ m); the result is rounded once to
the storage type (half an ulp: ε of the storage type relative to |dG_t| covers it twice).
So |got − want| ≤ ε_dtype |want| + (tolerance(acc, D) + tolerance(float64, T)) M_t with
M_t = |e| + Σ_{t' ≥ t} m_{t'}. Where b and d are float32 beside float16 a and c (the scans'
unrounded gradients), the products round once in float32, within the same tolerance(float32, ·)
of their magnitude, and the result is float32.
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
        # "float16/float32": a, c in float16, b, d (the gradients, unrounded) in float32
        "dtype": draw(st.sampled_from(["float64", "float32", "float16", "float16/float32"])),
        "seed": draw(st.integers(0, 2**31)),
    }


def dtypes(problem: dict[str, Any]) -> tuple[str, str]:
    """(the dtype of a and c, that of b, d and the result)."""
    data, _, grad = problem["dtype"].partition("/")
    return data, grad or data


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
    data, grad = dtypes(p)
    host = [rng.standard_normal(shape).astype(dtype).astype(np.float64) for dtype in (data, grad, data, grad)]
    end = rng.standard_normal((*p["lead"], 1 if p["summed"] else p["D"])) if p["end"] else None
    return host, end


@pytest.mark.usefixtures("nan_memory")
@GPU_SETTINGS
@given(gate_gradient_problems())
def test_gate_gradient_kernels_match_float64_and_repeat_bitwise(cp: Any, problem: dict[str, Any]) -> None:
    host, end = _problem(problem)
    data, grad = dtypes(problem)
    kernel = get_backend("cupy").kernel("gate_gradient")
    a, c = device_operands(cp, host[::2], problem["layout"], data)
    b, d = device_operands(cp, host[1::2], problem["layout"], grad)
    end_dev = None if end is None else cp.asarray(end, dtype="float64" if data == "float64" else "float32")
    first = kernel(a, b, c, d, end_dev, problem["summed"])
    second = kernel(a, b, c, d, end_dev, problem["summed"])
    assert first.dtype == grad and first.shape == (*problem["lead"], problem["T"],
                                                   1 if problem["summed"] else problem["D"])
    assert bool(cp.all(first == second)), "two runs differ"
    want, size = reference(*host, end, problem["summed"])
    check(cp.asnumpy(first), want, size, grad, problem["D"], problem["summed"], str(problem))
    # b and d rounded to a's dtype on the way (the VJP's returned gradients): astype's rounding
    third, b_rounded, d_rounded = kernel(a, b, c, d, end_dev, problem["summed"], round_b=True, round_d=True)
    assert bool(cp.all(third == first)), "rounding copies changed dG"
    assert b_rounded.dtype == d_rounded.dtype == data and b_rounded.shape == d_rounded.shape == b.shape
    assert bool(cp.all(b_rounded == b.astype(data))) and bool(cp.all(d_rounded == d.astype(data)))


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
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("gates", ["step", "key", "key+value"])
def test_vjp_takes_the_gate_gradient_kernel_without_gqa(cp: Any, monkeypatch: pytest.MonkeyPatch, gates: str,
                                                        dtype: str) -> None:
    """causal_scan_vjp on CuPy asks the kernel for each gate when q and k (o and v) share a
    shape, with the final state's term as its end value, and hands it the scans' gradients
    (and o) unrounded: float32, where float16 data would round them (to 11 bits before sums
    that cancel).

    Checked against the float64 gradient of the kernel's operands: the data and the scans'
    float32 outputs dq, dk (o, dv) (checked by test_cuda_scan), whose rounding must be the
    gradients returned (and the forward's o, which the same deterministic kernels give
    again here); the final-state term e = Σ dS ⊙ S_T is a float32 sum of Dk·Dv (or Dv)
    products, allowed tolerance(float32, Dk·Dv) of its terms.
    """
    backend = get_backend("cupy")
    calls = []
    kernel = backend.kernels["gate_gradient"]
    def spy(*args: Any, **rounding: bool) -> Any:
        calls.append(args)
        return kernel(*args, **rounding)

    monkeypatch.setitem(backend.kernels, "gate_gradient", spy)
    # Dv = 96 in float16: a per-step gate's scans then run on tensor cores (Dv a multiple of 8)
    p = {"lead_q": (2, 3, 1), "lead_kv": (2, 3, 1), "T": 150, "Dk": 64, "Dv": 100 if dtype == "float32" else 96,
         "gates": gates, "regime": "mild", "initial": True, "dtype": dtype, "seed": 4}
    rng = np.random.default_rng(5)
    host = linear_inputs(p)
    host["do"] = rng.standard_normal((*p["lead_q"], p["T"], p["Dv"]))
    host["dfinal_state"] = rng.standard_normal((*p["lead_kv"], p["Dk"], p["Dv"]))
    dev = to_device(cp, host, dtype)
    got = causal_scan_vjp(**dev, backend="cupy")
    assert [args[-1] for args in calls] == {"step": [True], "key": [False], "key+value": [False, False]}[gates]
    assert all(args[1].dtype == args[3].dtype == "float32" for args in calls)  # unrounded
    # dk and dv add the final state's read-out (float32, the state's dtype), as the reference does
    assert got.dq.dtype == dtype and got.dk.dtype == got.dv.dtype == "float32"
    o, final = causal_scan(dev["q"], dev["k"], dev["v"], gk=dev["gk"], gv=dev["gv"],
                           initial_state=dev["initial_state"], backend="cupy")
    f64 = lambda x: cp.asnumpy(x).astype(np.float64)  # noqa: E731
    dS_S = f64(dev["dfinal_state"]) * f64(final)
    # the kernel's operands in the order the VJP passes them: (q, dq, k, dk), then (do, o, v, dv)
    given = dict(zip(["dgk", "dgv"], calls, strict=False))
    rounded = {"dgk": (("dq", 1), ("dk", 3)), "dgv": (("dv", 3),)}
    ends = {"dgk": (dS_S.sum(-1), np.abs(dS_S).sum(-1)), "dgv": (dS_S.sum(-2), np.abs(dS_S).sum(-2))}
    for name in ("dgk", "dgv"):
        gate = dev["gk" if name == "dgk" else "gv"]
        if gate is None:
            assert getattr(got, name) is None
            continue
        a, b, c, d = given[name][:4]
        assert bool(cp.all(a == (dev["q"] if name == "dgk" else dev["do"])))
        for grad, i in rounded[name]:
            returned = getattr(got, grad)
            assert bool(cp.all(returned == given[name][i].astype(returned.dtype))), f"{grad}: not the rounded operand"
        if name == "dgv":
            assert bool(cp.all(b.astype(dtype) == o)), "o: not the forward's, unrounded"
        end, end_size = ends[name]
        summed = gate.shape[-1] == 1
        if summed:
            end, end_size = end.sum(-1, keepdims=True), end_size.sum(-1, keepdims=True)
        want, size = reference(f64(a), f64(b), f64(c), f64(d), end, summed)
        extra = tolerance("float32", p["Dk"] * p["Dv"]) * end_size[..., None, :]
        # rounded to float32 here: the final state's term e (the state's dtype) is float32
        assert getattr(got, name).dtype == "float32"
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
