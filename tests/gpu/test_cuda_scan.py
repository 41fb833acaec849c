"""The CUDA scan kernels (``linattn/backends/cuda/scan.cu``) against the float64 NumPy reference.

Tolerances. Each output element is a sum of n = T·Dk products (the scan over time of
the readout over keys), so a kernel accumulating in precision ε may differ from the
exact float64 value by about 8·ε·sqrt(n) relative to the largest output
(:func:`linattn.testing.tolerance`). Data stored in float16 or bfloat16 is read
exactly (the reference gets the same rounded values) and accumulated in float32; only
the output is rounded to the storage type, which adds at most half an ulp of the
largest output: ε_storage relative to max|o| covers it with a factor 2.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from gpu_cases import GPU_SETTINGS, linear_inputs, log_gates, to_device, torch_with_cuda
from hypothesis import given, settings
from hypothesis import strategies as st

from linattn.delta_scan import delta_scan
from linattn.scan import causal_scan, causal_scan_vjp
from linattn.testing import assert_close, machine_epsilon, tolerance

DIMS = (16, 32, 64, 100, 128, 256)


def _rtol(dtype: str, n: int) -> float:
    """Relative (to max|o|) tolerance of a kernel on data stored in ``dtype`` (see the module docstring)."""
    accumulate = "float64" if dtype == "float64" else "float32"
    rounding = 0.0 if dtype in ("float32", "float64") else machine_epsilon(dtype)
    return tolerance(accumulate, n) + rounding


def _check_within(actual: Any, desired: np.ndarray, rtol: float, what: str) -> None:
    """``actual`` within ``rtol`` of ``desired``, elementwise or relative to max|desired|."""
    assert_close(actual, desired, rtol=rtol, atol=rtol * float(np.max(np.abs(desired), initial=0.0)), err_msg=what)


def _check(actual: Any, desired: np.ndarray, dtype: str, n: int, what: str) -> None:
    _check_within(actual, desired, _rtol(dtype, n), what)


@st.composite
def linear_problems(draw: Any) -> dict[str, Any]:
    B, H, G = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    T = draw(st.integers(1, 300))
    Dk, Dv = draw(st.sampled_from(DIMS)), draw(st.sampled_from(DIMS))
    return {
        "lead_q": (B, H, G), "lead_kv": (B, H, 1), "T": T, "Dk": Dk, "Dv": Dv,
        "gates": draw(st.sampled_from(["none", "step", "key", "value", "key+value"])),
        "regime": draw(st.sampled_from(["mild", "extreme", "mixed"])),
        "initial": draw(st.booleans()),
        "dtype": draw(st.sampled_from(["float64", "float32", "float16"])),
        "seed": draw(st.integers(0, 2**31)),
    }


@pytest.mark.usefixtures("nan_memory")
@GPU_SETTINGS
@given(linear_problems())
def test_linear_scan_kernel_matches_the_reference(cp: Any, problem: dict[str, Any]) -> None:
    host = linear_inputs(problem)
    o_ref, s_ref = causal_scan(**host, form="recurrent")
    o, s = causal_scan(**to_device(cp, host, problem["dtype"]), backend="cupy")
    assert str(o.dtype) == problem["dtype"]
    n = problem["T"] * problem["Dk"]
    _check(o, o_ref, problem["dtype"], n, f"outputs of {problem}")
    _check(s, s_ref, "float32" if problem["dtype"] == "float16" else problem["dtype"], n, f"final state of {problem}")


def _long_problem(cp: Any, T: int, dtype: str = "float32", gates: str = "key",
                  Dk: int = 64) -> tuple[dict[str, Any], dict[str, Any]]:
    """One head, long, Dv = 64: few blocks, so the kernel splits time into segments (three passes)."""
    p = {"lead_q": (1, 1, 1), "lead_kv": (1, 1, 1), "T": T, "Dk": Dk, "Dv": 64, "gates": gates,
         "regime": "mild", "initial": True, "dtype": dtype, "seed": 3}
    host = linear_inputs(p)
    for name in ("gk", "gv"):
        if host[name] is not None:
            host[name] = host[name] / 64  # a slow decay, so that early steps still matter at the end
    return host, to_device(cp, host, dtype)


def _check_long_run(cp: Any, scan: Any, host: dict[str, Any], dev: dict[str, Any], prefix: int,
                    bitwise_prefix: bool) -> None:
    """A long float16 run of ``scan`` (causal_scan or delta_scan) through the kernels.

    Two runs bitwise equal; the outputs and final state against the float64 reference
    (n = T·Dk terms per output, as in ``_check``); and a run of the first ``prefix`` steps
    against the long run's, bitwise where ``bitwise_prefix`` (a prefix of whole chunks),
    else within the float16 tolerance.
    """
    first, second = (scan(**dev, backend="cupy") for _ in range(2))
    assert bool(cp.all(first[0] == second[0])) and bool(cp.all(first[1] == second[1]))
    o_ref, s_ref = scan(**host)
    T, Dk = host["k"].shape[-2:]
    _check(first[0], o_ref, "float16", T * Dk, "outputs of the long run")
    _check(first[1], s_ref, "float32", T * Dk, "final state of the long run")
    short = {n: x if n == "initial_state" or x is None else x[..., :prefix, :] for n, x in dev.items()}
    o_prefix, _ = scan(**short, backend="cupy")
    if bitwise_prefix:
        assert bool(cp.all(o_prefix == first[0][..., :prefix, :]))
    else:
        _check(o_prefix, cp.asnumpy(first[0][..., :prefix, :]).astype(np.float64), "float16", prefix * Dk,
               "prefix run vs long run")


def _check_long_linear_run(cp: Any, gates: str, Dk: int, Dv: int, seed: int) -> None:
    """``_check_long_run`` of the linear scan on float16 data, T = 1000, GQA and an initial state.

    T = 1000 is 16 chunks, the last partial; q has two heads per k, v head; the prefix run
    is ten whole chunks, checked bitwise. ``gates`` is "none" or "step" (a slow decay, so
    that early steps still matter at the end).
    """
    p = {"lead_q": (1, 2, 2), "lead_kv": (1, 2, 1), "T": 1000, "Dk": Dk, "Dv": Dv, "gates": gates,
         "regime": "mild", "initial": True, "dtype": "float16", "seed": seed}
    host = linear_inputs(p)
    if host["gk"] is not None:
        host["gk"] = host["gk"] / 64
    _check_long_run(cp, causal_scan, host, to_device(cp, host, "float16"), 640, bitwise_prefix=True)


@st.composite
def tensor_core_problems(draw: Any) -> dict[str, Any]:
    """The calls the tensor-core kernel covers: 16-bit data, no gate or a gate per step, Dk, Dv multiples of 16."""
    B, H, G = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    return {
        "lead_q": (B, H, G), "lead_kv": (B, H, 1), "T": draw(st.integers(1, 300)),
        "Dk": draw(st.sampled_from((32, 64, 128, 256))), "Dv": draw(st.sampled_from((32, 64, 128, 256))),
        "gates": draw(st.sampled_from(["none", "step"])),
        "regime": draw(st.sampled_from(["mild", "extreme", "mixed"])),
        "initial": draw(st.booleans()), "dtype": "float16", "seed": draw(st.integers(0, 2**31)),
    }


def _record_calls(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[bool]:
    """Records, for each call of ``module.name`` (a launcher), whether it ran (True) or declined (False)."""
    calls: list[bool] = []
    launcher = getattr(module, name)

    def recording(*args: Any) -> Any:
        result = launcher(*args)
        calls.append(result is not None)
        return result

    monkeypatch.setattr(module, name, recording)
    return calls


@pytest.fixture
def tensor_core_calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """The calls of the linear scan's tensor-core launcher: ran (True) or declined (False)."""
    from linattn.backends import _cuda_chunk

    return _record_calls(monkeypatch, _cuda_chunk, "chunked_linear_scan")


@pytest.fixture
def delta_tensor_core_calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """The calls of the delta rule's tensor-core launcher: ran (True) or declined (False)."""
    from linattn.backends import _cuda_delta_chunk

    return _record_calls(monkeypatch, _cuda_delta_chunk, "chunked_delta_scan")


@pytest.fixture(params=["wgmma", "wgmma, one warpgroup", "mma.sync"])
def delta_kernel(request: pytest.FixtureRequest, cp: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """The delta rule's tensor-core scan under test: on warpgroup products (Hopper only; two warpgroups per block
    where Dv > 64, or one) or on mma.sync.

    The warpgroup variants run their tiling whatever the blocks' count (``_FILL`` 0), so
    that the small problems here reach them; "mma.sync" switches them off.
    """
    from linattn.backends import _cuda_delta_chunk
    from linattn.backends import _cuda_launch as cl

    wgmma = request.param.startswith("wgmma")
    if wgmma and cl.compute_capability(cp.cuda.Device().id) != "90":
        pytest.skip("warpgroup products (wgmma) need a Hopper GPU (compute capability 9.0)")
    monkeypatch.setattr(_cuda_delta_chunk, "WGMMA", wgmma)
    if wgmma:
        monkeypatch.setattr(_cuda_delta_chunk, "_FILL", 0.0)
    if request.param.endswith("one warpgroup"):
        monkeypatch.setattr(_cuda_delta_chunk, "WG_GROUPS", (1,))
    return request.param


@pytest.fixture
def launched_kernels(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the kernels launched through ``_cuda_launch.function``, in order."""
    from linattn.backends import _cuda_launch as cl

    names: list[str] = []
    function = cl.function

    def recording(source: str, name: str, *args: Any) -> Any:
        names.append(name)
        return function(source, name, *args)

    monkeypatch.setattr(cl, "function", recording)
    return names


@pytest.fixture(params=["wgmma", "mma.sync"])
def linear_kernel(request: pytest.FixtureRequest, cp: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """The linear scan's tensor-core kernel under test: on warpgroup products (Hopper only) or on mma.sync.

    On a Hopper GPU the library runs the first (16-bit data, Dk <= 256); "mma.sync"
    switches it off, so that both are tested on the same GPU.
    """
    from linattn.backends import _cuda_chunk
    from linattn.backends import _cuda_launch as cl

    if request.param == "wgmma" and cl.compute_capability(cp.cuda.Device().id) != "90":
        pytest.skip("warpgroup products (wgmma) need a Hopper GPU (compute capability 9.0)")
    monkeypatch.setattr(_cuda_chunk, "WGMMA", request.param == "wgmma")
    return request.param


def _linear_scan_name(linear_kernel: str) -> str:
    """The kernel that ``linear_kernel`` (the fixture's parameter) runs the linear scan's outputs on."""
    return "chunk_linear_scan_wg" if linear_kernel == "wgmma" else "chunk_linear_scan"


@pytest.mark.usefixtures("nan_memory")
@GPU_SETTINGS
@given(tensor_core_problems())
def test_tensor_core_kernel_matches_the_reference(cp: Any, tensor_core_calls: list[bool], launched_kernels: list[str],
                                                  linear_kernel: str, problem: dict[str, Any]) -> None:
    host = linear_inputs(problem)
    o_ref, s_ref = causal_scan(**host, form="recurrent")
    tensor_core_calls.clear()
    launched_kernels.clear()
    o, s = causal_scan(**to_device(cp, host, "float16"), backend="cupy")
    assert tensor_core_calls == [True]  # this call ran on the tensor-core kernel
    assert launched_kernels[-1] == _linear_scan_name(linear_kernel), launched_kernels  # Dk = 256 too
    n = problem["T"] * problem["Dk"]
    _check(o, o_ref, "float16", n, f"outputs of {problem}")
    _check(s, s_ref, "float32", n, f"final state of {problem}")


@st.composite
def wide_problems(draw: Any) -> dict[str, Any]:
    """float16 calls of every kernel (tensor-core and CUDA-core), forwards or reversed in time."""
    problem = draw(st.one_of(tensor_core_problems(), linear_problems()))
    return {**problem, "dtype": "float16", "reverse": draw(st.booleans())}


def _check_wide(cp: Any, host: dict[str, Any], dev: dict[str, Any], reverse: bool, what: str) -> None:
    """``linear_scan(..., wide=True)``: float32 outputs, the float16 call's bitwise once rounded, within
    float32's accumulation tolerance of the float64 reference (no storage rounding: ``_rtol("float32", n)``).

    The GLA kernel declines wide calls (the CUDA-core kernel writes them), so it is off here
    for the float16 call as well: both run on one kernel.
    """
    from linattn.backends import _cuda_gla_chunk, _cuda_scan

    args = [dev[name] for name in ("q", "k", "v", "gk", "gv", "initial_state")]
    wide = _cuda_scan.linear_scan(*args, reverse=reverse, wide=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_cuda_gla_chunk, "ENABLED", False)
        narrow = _cuda_scan.linear_scan(*args, reverse=reverse)
    assert wide is not None and narrow is not None
    assert wide[0].dtype == "float32" and narrow[0].dtype == "float16"
    assert bool(cp.all(wide[0].astype("float16") == narrow[0])), f"{what}: rounded wide outputs differ"
    assert bool(cp.all(wide[1] == narrow[1])), f"{what}: final states differ"
    flip = (lambda x: None if x is None else np.flip(x, axis=-2)) if reverse else (lambda x: x)
    o_ref, _ = causal_scan(*(flip(host[name]) for name in ("q", "k", "v")), gk=flip(host["gk"]), gv=flip(host["gv"]),
                           initial_state=host["initial_state"])
    T, Dk = host["k"].shape[-2:]
    _check(wide[0], flip(o_ref), "float32", T * Dk, f"wide outputs of {what}")


@pytest.mark.usefixtures("nan_memory", "linear_kernel")
@GPU_SETTINGS
@given(wide_problems())
def test_wide_outputs_are_the_unrounded_sums(cp: Any, problem: dict[str, Any]) -> None:
    """``wide`` (the outputs that a gate's gradient sums, causal_scan_vjp) on every kernel."""
    host = linear_inputs(problem)
    _check_wide(cp, host, to_device(cp, host, "float16"), problem["reverse"], str(problem))


@pytest.mark.usefixtures("nan_memory", "linear_kernel")
@pytest.mark.parametrize("gates", ["step", "key"])
def test_wide_outputs_over_time_segments(cp: Any, gates: str) -> None:
    """``wide`` through the three passes of a time-segmented scan (tensor cores; "key": CUDA cores)."""
    host, dev = _long_problem(cp, 5001, "float16", gates)
    _check_wide(cp, host, dev, False, f"T = 5001, {gates}")


@pytest.mark.usefixtures("nan_memory", "linear_kernel")
@pytest.mark.parametrize("gates", ["none", "step"])
@pytest.mark.parametrize("Dk", [64, 256])
def test_tensor_core_time_segments_match_the_reference(cp: Any, tensor_core_calls: list[bool], gates: str,
                                                       Dk: int) -> None:
    host, dev = _long_problem(cp, 5001, "float16", gates, Dk)
    from linattn.backends import _cuda_chunk

    plan = _cuda_chunk.linear_plan("float16", Dk, 64, gates == "step", cp.cuda.Device().id)
    assert plan is not None and _cuda_chunk._segments(1, 5001, plan, cp.cuda.Device().id) > 1  # three passes
    o_ref, s_ref = causal_scan(**host)
    o, s = causal_scan(**dev, backend="cupy")
    assert tensor_core_calls == [True]
    _check(o, o_ref, "float16", 5001 * Dk, "outputs")
    _check(s, s_ref, "float32", 5001 * Dk, "final state")


@pytest.mark.usefixtures("nan_memory", "linear_kernel")
@pytest.mark.parametrize("regime", ["spans <= 16", "spans > 16", "growth"])
def test_tensor_core_score_decays_match_the_reference_on_each_path(cp: Any, tensor_core_calls: list[bool],
                                                                   regime: str) -> None:
    """Each way the tensor-core kernels decay the scores (chunk_decays' ``factored``), against the reference.

    "spans <= 16": log-gates in [-1, 0], so every 16-step block spans at most 15: the
    diagonal blocks take the factored decays C_i C_{CH+j}, as the blocks below them do.
    "spans > 16": log-gates in [-2.5, -1.5], every block spans more than 16: an expf per
    score on the diagonal blocks (decays e^{-1.5} to e^{-37}, far from negligible there),
    the factors below. "growth": some log-gates > 0: an expf per score everywhere.
    """
    p = {"lead_q": (1, 2, 2), "lead_kv": (1, 2, 1), "T": 700, "Dk": 128, "Dv": 128, "gates": "step",
         "regime": "mild", "initial": True, "dtype": "float16", "seed": 16}
    host = linear_inputs(p)
    rng, shape = np.random.default_rng(16), host["gk"].shape
    low, high = {"spans <= 16": (-1.0, 0.0), "spans > 16": (-2.5, -1.5), "growth": (-1.0, 0.25)}[regime]
    host["gk"] = rng.uniform(low, high, shape).astype("float16").astype(np.float64)
    o_ref, s_ref = causal_scan(**host, form="recurrent")
    tensor_core_calls.clear()
    o, s = causal_scan(**to_device(cp, host, "float16"), backend="cupy")
    assert tensor_core_calls == [True]
    _check(o, o_ref, "float16", 700 * 128, f"outputs, {regime}")
    _check(s, s_ref, "float32", 700 * 128, f"final state, {regime}")


@pytest.mark.usefixtures("nan_memory")
@pytest.mark.parametrize("gates", ["none", "step"])
def test_tensor_core_kernels_at_dk_256_are_exact_deterministic_and_prefix_invariant(
        cp: Any, tensor_core_calls: list[bool], launched_kernels: list[str], linear_kernel: str, gates: str) -> None:
    """Dk = 256. mma.sync: two groups of warps with one q tile in flight, refilled by the warps that read it.
    wgmma: two warpgroups that split the keys of 64 value columns, the second's partial
    outputs added to the first's through shared memory, and with a gate one q tile,
    refilled once both have read it.

    T = 1000 (16 chunks, the last partial), four column blocks, GQA and an initial state:
    the reference, two runs bitwise equal (a refill racing its readers, or a partial
    output read before it is written, would differ), and a prefix run of whole chunks,
    bitwise equal to the long run's outputs there (each chunk's work, float16's
    power-of-two scales included, depends only on earlier chunks).
    """
    from linattn.backends import _cuda_chunk

    device = cp.cuda.Device().id
    plan = _cuda_chunk.linear_plan("float16", 256, 256, gates == "step", device)
    if linear_kernel == "wgmma":
        assert isinstance(plan, _cuda_chunk._WarpgroupPlan) and plan.key_split and plan.columns == 64
    else:
        assert plan == _cuda_chunk._chunk_plan("float16", 256, 256, _cuda_chunk._shared_limit(device))
        assert plan is not None and plan.groups == 2 and plan.q_tiles == 1
    _check_long_linear_run(cp, gates, 256, 256, seed=14)
    assert tensor_core_calls == [True] * 3
    assert set(launched_kernels) == {_linear_scan_name(linear_kernel)}, launched_kernels


@pytest.mark.usefixtures("nan_memory")
@pytest.mark.parametrize("gates", ["none", "step"])
@pytest.mark.parametrize("narrow", [True, False])
def test_warpgroup_kernel_is_exact_deterministic_and_prefix_invariant(cp: Any, tensor_core_calls: list[bool],
                                                                      monkeypatch: pytest.MonkeyPatch, gates: str,
                                                                      narrow: bool) -> None:
    """The warpgroup kernel with padded keys (Dk = 96 of 128) and a partial column tile (Dv = 192).

    Four leading indices leave multiprocessors idle, so the launcher runs one warpgroup
    of 64 columns per block (three column blocks); with ``NARROW`` off, two warpgroups
    share each block's q and k tiles and the second column block has 64 of its 128
    columns. T = 1000 (16 chunks, the last partial), GQA and an initial state: the
    reference, two runs bitwise equal (a product reading a tile before its copy or its
    writes landed would differ), and a prefix run of whole chunks, bitwise equal to the
    long run's outputs there.
    """
    from linattn.backends import _cuda_chunk
    from linattn.backends import _cuda_launch as cl

    device = cp.cuda.Device().id
    if cl.compute_capability(device) != "90":
        pytest.skip("warpgroup products (wgmma) need a Hopper GPU (compute capability 9.0)")
    monkeypatch.setattr(_cuda_chunk, "NARROW", narrow)
    plan = _cuda_chunk.linear_plan("float16", 96, 192, gates == "step", device)
    assert isinstance(plan, _cuda_chunk._WarpgroupPlan) and plan.dkp == 128 and plan.groups == 2
    run = _cuda_chunk._one_warpgroup_where_it_fills(plan, 4, 192, 1000, device)
    assert run.groups == (1 if narrow else 2)
    _check_long_linear_run(cp, gates, 96, 192, seed=15)
    assert tensor_core_calls == [True] * 3


@pytest.mark.usefixtures("nan_memory", "linear_kernel")
@pytest.mark.parametrize("gates", ["none", "step"])
@pytest.mark.parametrize("Dk", [64, 256])
def test_vjp_through_the_tensor_core_kernel_matches_the_reference(cp: Any, tensor_core_calls: list[bool],
                                                                  gates: str, Dk: int) -> None:
    """The VJP's scans (role-swapped, on reversed views) on float16 data run on tensor cores.

    dq, dk, dv and dS_0 are kernel outputs (float16 for the data, float32 for the state),
    checked as the forward's outputs are; the gate's gradient, which the reference
    computes from them, is checked in float64 by the test above.
    """
    p = {"lead_q": (2, 2, 1), "lead_kv": (2, 2, 1), "T": 150, "Dk": Dk, "Dv": 128, "gates": gates,
         "regime": "mild", "initial": True, "dtype": "float16", "seed": 9}
    host = linear_inputs(p)
    rng = np.random.default_rng(10)
    do = rng.standard_normal((*p["lead_q"], p["T"], p["Dv"])).astype(np.float16).astype(np.float64)
    dfinal = rng.standard_normal((*p["lead_kv"], p["Dk"], p["Dv"]))
    ref = causal_scan_vjp(**host, do=do, dfinal_state=dfinal, form="recurrent")
    got = causal_scan_vjp(**to_device(cp, {**host, "do": do, "dfinal_state": dfinal}, "float16"), backend="cupy")
    assert tensor_core_calls and all(tensor_core_calls)
    n = p["T"] * max(p["Dk"], p["Dv"])
    _check(got.dq, ref.dq, "float16", n, "dq")
    _check(got.dinitial_state, ref.dinitial_state, "float32", n, "dinitial_state")
    # dk and dv are a scan's output plus the final state's read-out, each rounded to
    # float16 and rounded again when added: three half-ulp roundings, within 2 eps.
    rtol = tolerance("float32", n) + 2 * machine_epsilon("float16")
    for name in ("dk", "dv"):
        want = getattr(ref, name)
        _check_within(getattr(got, name), want, rtol, name)


def _rtol_3xtf32(n: int) -> float:
    """Relative (to max|o|) tolerance of the float32 tensor-core kernel (``cuda/chunk_tf32.cu``).

    The float32 allowance for the accumulation plus the split products' own error: each
    product of two-part TF32 operands is within 5·2^-22 = 10 ε (ε of float32) of the
    exact one (the kernel's header), random in sign over the n = T·Dk terms of an output.
    """
    return _rtol("float32", n) + 10 * machine_epsilon("float32") * math.sqrt(n)


@st.composite
def float32_tensor_core_problems(draw: Any) -> dict[str, Any]:
    """The calls the float32 tensor-core kernel covers: float32 data, no gate, Dk <= 128 (Dk, Dv multiples of 4)."""
    B, H, G = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    return {
        "lead_q": (B, H, G), "lead_kv": (B, H, 1), "T": draw(st.integers(1, 300)),
        "Dk": draw(st.sampled_from((16, 32, 64, 100, 128))), "Dv": draw(st.sampled_from(DIMS)),
        "gates": "none", "regime": "mild", "initial": draw(st.booleans()), "dtype": "float32",
        "seed": draw(st.integers(0, 2**31)),
    }


@pytest.fixture(params=[4, 2, 1])
def tf32_warps(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """The float32 tensor-core kernel's block width under test (warps, 16 value columns each), forced."""
    from linattn.backends import _cuda_chunk

    monkeypatch.setattr(_cuda_chunk, "_TF32_WARPS", (request.param,))
    return request.param


@pytest.mark.usefixtures("nan_memory", "tf32_warps")
@settings(GPU_SETTINGS, max_examples=20)  # per block width: each example compiles its sizes' variants
@given(float32_tensor_core_problems())
def test_float32_tensor_core_kernel_matches_the_reference(cp: Any, tensor_core_calls: list[bool],
                                                          problem: dict[str, Any]) -> None:
    host = linear_inputs(problem)
    o_ref, s_ref = causal_scan(**host, form="recurrent")
    tensor_core_calls.clear()
    o, s = causal_scan(**to_device(cp, host, "float32"), backend="cupy")
    assert tensor_core_calls == [True]  # this call ran on the 3xTF32 kernel
    n = problem["T"] * problem["Dk"]
    rtol = _rtol_3xtf32(n)
    for got, want, what in ((o, o_ref, "outputs"), (s, s_ref, "final state")):
        _check_within(got, want, rtol, f"{what} of {problem}")


@pytest.mark.usefixtures("nan_memory")
def test_float32_tensor_core_kernel_meets_the_float32_target_deterministically_and_prefix_invariant(
        cp: Any, tensor_core_calls: list[bool]) -> None:
    """A long float32 run (T = 4096, D = 128): error <= 1e-5 of max|o| against float64, the GPU issue's target.

    Also: two runs bitwise equal, and a run of the first 2048 steps (64 whole chunks)
    bitwise equal to the long run's first 2048 outputs.
    """
    p = {"lead_q": (1, 2, 1), "lead_kv": (1, 2, 1), "T": 4096, "Dk": 128, "Dv": 128, "gates": "none",
         "regime": "mild", "initial": True, "dtype": "float32", "seed": 11}
    host = linear_inputs(p)
    dev = to_device(cp, host, "float32")
    first, second = (causal_scan(**dev, backend="cupy") for _ in range(2))
    assert tensor_core_calls == [True, True]
    assert bool(cp.all(first[0] == second[0])) and bool(cp.all(first[1] == second[1]))
    o_ref, s_ref = causal_scan(**host)
    for got, want in ((first[0], o_ref), (first[1], s_ref)):
        error = float(np.max(np.abs(cp.asnumpy(got) - want)) / np.max(np.abs(want)))
        assert error <= 1e-5, error
    short = {n: x if n == "initial_state" or x is None else x[..., :2048, :] for n, x in dev.items()}
    assert bool(cp.all(causal_scan(**short, backend="cupy")[0] == first[0][..., :2048, :]))


@pytest.mark.usefixtures("nan_memory")
def test_float32_tensor_core_time_segments_and_gradients_match_the_reference(cp: Any,
                                                                             tensor_core_calls: list[bool]) -> None:
    """One long head takes the three-pass path; the VJP's scans (forward and reversed) run on the kernel too."""
    from linattn.backends import _cuda_chunk

    host, dev = _long_problem(cp, 5001, "float32", "none")
    plan = _cuda_chunk.linear_plan("float32", 64, 64, False, cp.cuda.Device().id)
    assert isinstance(plan, _cuda_chunk._Tf32Plan) and _cuda_chunk._segments(1, 5001, plan, cp.cuda.Device().id) > 1
    o_ref, s_ref = causal_scan(**host)
    o, s = causal_scan(**dev, backend="cupy")
    assert tensor_core_calls == [True]
    rtol = _rtol_3xtf32(5001 * 64)
    _check_within(o, o_ref, rtol, "outputs")
    _check_within(s, s_ref, rtol, "final state")

    p = {"lead_q": (2, 2, 2), "lead_kv": (2, 2, 1), "T": 150, "Dk": 64, "Dv": 100, "gates": "none",
         "regime": "mild", "initial": True, "dtype": "float32", "seed": 7}
    host = linear_inputs(p)
    rng = np.random.default_rng(8)
    do = rng.standard_normal((*p["lead_q"], p["T"], p["Dv"])).astype(np.float32).astype(np.float64)
    dfinal = rng.standard_normal((*p["lead_kv"], p["Dk"], p["Dv"]))
    ref = causal_scan_vjp(**host, do=do, dfinal_state=dfinal, form="recurrent")
    tensor_core_calls.clear()
    got = causal_scan_vjp(**to_device(cp, {**host, "do": do, "dfinal_state": dfinal}, "float32"), backend="cupy")
    assert tensor_core_calls and all(tensor_core_calls)
    rtol = _rtol_3xtf32(p["T"] * max(p["Dk"], p["Dv"]))  # the gradient scans sum over T·max(Dk, Dv) products
    for name in ("dq", "dk", "dv", "dinitial_state"):
        want = getattr(ref, name)
        _check_within(getattr(got, name), want, rtol, name)


def _flip(x: np.ndarray | None) -> np.ndarray | None:
    return None if x is None else np.flip(x, axis=-2)


def _reversed_reference(host: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The scan from the last step to the first, by its definition: the forward scan of the flipped arrays."""
    o, s = causal_scan(*(_flip(host[n]) for n in ("q", "k", "v")), gk=_flip(host["gk"]), gv=_flip(host["gv"]),
                       initial_state=host["initial_state"], form="recurrent")
    return _flip(o), s


@pytest.mark.usefixtures("nan_memory")
@GPU_SETTINGS
@given(linear_problems())
def test_reversed_scan_kernel_matches_the_reference(cp: Any, problem: dict[str, Any]) -> None:
    """The backend's ``causal_scan_reversed`` (the gradients' backward scans) reads its operands backwards in place."""
    from linattn.backends import get_backend

    host = linear_inputs(problem)
    o_ref, s_ref = _reversed_reference(host)
    dev = to_device(cp, host, problem["dtype"])
    result = get_backend("cupy").kernel("causal_scan_reversed")(*(dev[n] for n in ("q", "k", "v", "gk", "gv")),
                                                               dev["initial_state"])
    assert result is not None
    n = problem["T"] * problem["Dk"]
    _check(result[0], o_ref, problem["dtype"], n, f"outputs of {problem}")
    _check(result[1], s_ref, "float32" if problem["dtype"] == "float16" else problem["dtype"], n,
           f"final state of {problem}")


@pytest.mark.parametrize("gates", ["none", "step", "key"])
def test_reversed_scan_reads_torch_tensors_in_place(cp: Any, tensor_core_calls: list[bool],
                                                    gla_tensor_core_calls: list[bool], gates: str) -> None:
    """PyTorch has no negative strides, so a flip would copy; the reversed kernels read the tensors as they are.

    Long and one head: without a gate or with one per step the linear tensor-core kernel
    takes its three-pass time-segmented path; with one per key the GLA tensor-core kernels
    run. The memory the call allocates is its output, the segments' states and (per key)
    the intra-chunk scores P: less than the copies of q, k and v that flipping them would
    need on top of those.
    """
    torch = torch_with_cuda()
    from linattn.backends import get_backend

    host, _ = _long_problem(cp, 5001, "float16", gates if gates != "none" else "key")
    if gates == "none":
        host["gk"] = None
    elif gates == "step":
        host["gk"] = host["gk"][..., :1]
    o_ref, s_ref = _reversed_reference(host)
    dev = {name: None if x is None else torch.tensor(x, device="cuda").to(
        torch.float32 if name == "initial_state" else torch.float16) for name, x in host.items()}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    o, s = get_backend("cupy").kernel("causal_scan_reversed")(*(dev[n] for n in ("q", "k", "v", "gk", "gv")),
                                                             dev["initial_state"])
    torch.cuda.synchronize()
    allocated = torch.cuda.max_memory_allocated() - before
    assert tensor_core_calls == ([] if gates == "key" else [True])
    assert gla_tensor_core_calls == ([True] if gates == "key" else [])
    _check(o.double().cpu().numpy(), o_ref, "float16", 5001 * 64, "outputs")
    _check(s.double().cpu().numpy(), s_ref, "float32", 5001 * 64, "final state")
    # Flipping would hold copies of q, k and v (3 × q's bytes) besides the output; the
    # segments' states (3·2 + 1 of 64 × 64 float32 here: each of two segments' own, entering
    # and exit states, and the last) take less than one;
    # P takes two float16 parts of 64 × 64 and a float32 scale per chunk of 64 steps.
    q_bytes = dev["q"].numel() * dev["q"].element_size()
    p_bytes = math.ceil(5001 / 64) * (2 * 64 * 64 * 2 + 4) if gates == "key" else 0
    assert allocated < o.numel() * o.element_size() + 2 * q_bytes + p_bytes


@st.composite
def delta_problems(draw: Any) -> dict[str, Any]:
    return {
        "lead": (draw(st.integers(1, 2)), draw(st.integers(1, 3))), "T": draw(st.integers(1, 200)),
        "Dk": draw(st.sampled_from(DIMS)), "Dv": draw(st.sampled_from(DIMS)),
        "beta": draw(st.sampled_from(["step", "value"])), "gated": draw(st.booleans()),
        "regime": draw(st.sampled_from(["mild", "extreme"])), "initial": draw(st.booleans()),
        "dtype": draw(st.sampled_from(["float64", "float32", "float16"])), "seed": draw(st.integers(0, 2**31)),
    }


def _delta_inputs(problem: dict[str, Any], groups: int = 1) -> dict[str, Any]:
    """A delta-rule problem; with ``groups`` > 1, q has a group axis that the state lacks (GQA)."""
    rng = np.random.default_rng(problem["seed"])
    lead, T, Dk, Dv = (*problem["lead"], 1), problem["T"], problem["Dk"], problem["Dv"]
    store = lambda x: x.astype(problem["dtype"]).astype(np.float64)  # noqa: E731
    k = rng.standard_normal((*lead, T, Dk))
    return {
        "q": store(rng.standard_normal((*lead[:-1], groups, T, Dk)) / np.sqrt(Dk)),
        "k": store(k / np.linalg.norm(k, axis=-1, keepdims=True)),  # |k| = 1: the state cannot grow
        "v": store(rng.standard_normal((*lead, T, Dv))),
        "beta": store(rng.uniform(0, problem.get("beta_max", 1.0), (*lead, T, 1 if problem["beta"] == "step" else Dv))),
        "g": store(log_gates(rng, (*lead, T, 1), problem["regime"])) if problem["gated"] else None,
        "initial_state": rng.standard_normal((*lead, Dk, Dv)) if problem["initial"] else None,
    }


@pytest.mark.usefixtures("nan_memory")
@GPU_SETTINGS
@given(delta_problems())
def test_delta_kernel_matches_the_reference(cp: Any, problem: dict[str, Any]) -> None:
    T, Dk = problem["T"], problem["Dk"]
    host = _delta_inputs(problem)
    o_ref, s_ref = delta_scan(**host, form="recurrent")
    o, s = delta_scan(**to_device(cp, host, problem["dtype"]), backend="cupy")
    n = T * Dk
    _check(o, o_ref, problem["dtype"], n, f"outputs of {problem}")
    _check(s, s_ref, "float32" if problem["dtype"] == "float16" else problem["dtype"], n, f"final state of {problem}")


# (Dk, Dv) pairs the delta rule's tensor-core kernels cover (Dk <= 128, tiles of whole warps).
DELTA_TENSOR_CORE_DIMS = ((16, 64), (32, 32), (32, 128), (64, 64), (64, 256), (128, 32), (128, 128), (128, 256))


@st.composite
def delta_tensor_core_problems(draw: Any) -> dict[str, Any]:
    """The calls the delta rule's tensor-core kernels cover: 16-bit data, β and the gate per step, Dk <= 128."""
    Dk, Dv = draw(st.sampled_from(DELTA_TENSOR_CORE_DIMS))
    return {
        "lead": (draw(st.integers(1, 2)), draw(st.integers(1, 3))), "T": draw(st.integers(1, 300)), "Dk": Dk,
        "Dv": Dv, "beta": "step", "beta_max": draw(st.sampled_from([1.0, 2.0])), "gated": draw(st.booleans()),
        "regime": draw(st.sampled_from(["mild", "extreme", "mixed"])), "initial": draw(st.booleans()),
        "dtype": "float16", "seed": draw(st.integers(0, 2**31)),
    }


@pytest.mark.usefixtures("nan_memory")
@GPU_SETTINGS
@given(delta_tensor_core_problems(), st.integers(1, 2), st.booleans())
def test_delta_tensor_core_kernels_match_the_reference(cp: Any, delta_tensor_core_calls: list[bool],
                                                       launched_kernels: list[str], delta_kernel: str,
                                                       problem: dict[str, Any], groups: int, widest: bool) -> None:
    """cuda/delta_chunk.cu and delta_wgmma.cu against the loop: GQA, β up to 2 (negative eigenvalues), every gate
    regime, every tiling.

    With |k| = 1 and β in [0, 2] every transition is a contraction (eigenvalues in
    [−1, 1]; the "mixed" gates' growth is bounded over these lengths), so rounding errors
    do not grow through the chunks and the forward kernel's tolerance applies.
    """
    from linattn.backends import _cuda_delta_chunk

    host = _delta_inputs(problem, groups)
    o_ref, s_ref = delta_scan(**host, form="recurrent")
    delta_tensor_core_calls.clear()
    launched_kernels.clear()
    fill = _cuda_delta_chunk._FILL
    _cuda_delta_chunk._FILL = 0.0 if widest else fill  # 0: the widest tiling; else (few leading indices) narrow ones
    try:
        o, s = delta_scan(**to_device(cp, host, "float16"), backend="cupy")
    finally:
        _cuda_delta_chunk._FILL = fill
    assert delta_tensor_core_calls == [True]  # this call ran on the tensor-core kernels
    scan = "delta_chunk_scan_wg" if delta_kernel.startswith("wgmma") else "delta_chunk_scan"
    assert launched_kernels[-1] == scan, launched_kernels
    n = problem["T"] * problem["Dk"]
    where = f"{problem}, groups={groups}, widest={widest}, {delta_kernel}"
    _check(o, o_ref, "float16", n, f"outputs of {where}")
    _check(s, s_ref, "float32", n, f"final state of {where}")


@pytest.mark.usefixtures("nan_memory", "delta_kernel")
def test_delta_tensor_core_kernels_are_deterministic_and_prefix_invariant(cp: Any,
                                                                         delta_tensor_core_calls: list[bool]) -> None:
    """T = 2500, gated (40 chunks): the reference, two runs bitwise equal, a prefix run against the long run."""
    problem = {"lead": (2, 2), "T": 2500, "Dk": 128, "Dv": 128, "beta": "step", "gated": True, "regime": "mild",
               "initial": True, "dtype": "float16", "seed": 23}
    host = _delta_inputs(problem)
    host["g"] = host["g"] / 64  # a slow decay, so that early steps still matter at the end
    # The prefix not bitwise: float16's power-of-two scales follow the maxima of whole
    # chunks, and the long run's last chunk of the prefix holds later steps too (the scaled
    # values' low parts can round differently in float16's subnormal range).
    _check_long_run(cp, delta_scan, host, to_device(cp, host, "float16"), 1234, bitwise_prefix=False)
    assert delta_tensor_core_calls == [True] * 3


@pytest.fixture
def hopper(cp: Any) -> None:
    """Skips the test where the GPU has no warpgroup products (wgmma: Hopper, compute capability 9.0)."""
    from linattn.backends import _cuda_launch as cl

    if cl.compute_capability(cp.cuda.Device().id) != "90":
        pytest.skip("warpgroup products (wgmma) need a Hopper GPU (compute capability 9.0)")


# Past 128 keys (padded to 256) the warpgroup scan alone covers the delta rule: its two
# warpgroups split the keys of 64 value columns. Dv = 72: a second, partial tile of columns.
DELTA_KEY_SPLIT_DIMS = ((136, 64), (200, 72), (256, 32), (256, 128), (256, 256))


@st.composite
def delta_key_split_problems(draw: Any) -> dict[str, Any]:
    """``delta_tensor_core_problems`` with 128 < Dk <= 256."""
    Dk, Dv = draw(st.sampled_from(DELTA_KEY_SPLIT_DIMS))
    return {**draw(delta_tensor_core_problems()), "Dk": Dk, "Dv": Dv}


@pytest.mark.usefixtures("nan_memory", "hopper")
@GPU_SETTINGS
@given(delta_key_split_problems(), st.integers(1, 2))
def test_delta_key_split_kernel_matches_the_reference(cp: Any, delta_tensor_core_calls: list[bool],
                                                      launched_kernels: list[str], problem: dict[str, Any],
                                                      groups: int) -> None:
    """delta_wgmma.cu at Dk > 128 (the warpgroups' partial K S and outputs summed through shared memory) against
    the loop, as the test above; the tolerance is the same (n = T·Dk terms per output)."""
    host = _delta_inputs(problem, groups)
    o_ref, s_ref = delta_scan(**host, form="recurrent")
    delta_tensor_core_calls.clear()
    launched_kernels.clear()
    o, s = delta_scan(**to_device(cp, host, "float16"), backend="cupy")
    assert delta_tensor_core_calls == [True]
    assert launched_kernels[-1] == "delta_chunk_scan_wg", launched_kernels
    n = problem["T"] * problem["Dk"]
    _check(o, o_ref, "float16", n, f"outputs of {problem}, groups={groups}")
    _check(s, s_ref, "float32", n, f"final state of {problem}, groups={groups}")


@pytest.mark.usefixtures("nan_memory", "hopper")
@pytest.mark.parametrize("gated", [False, True])
def test_delta_key_split_kernel_is_deterministic_and_prefix_invariant(cp: Any, delta_tensor_core_calls: list[bool],
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      gated: bool) -> None:
    """Dk = 256, T = 2500 (40 chunks): as the test of the narrower tilings; the mma.sync scan declines Dk = 256."""
    from linattn.backends import _cuda_delta_chunk

    problem = {"lead": (2, 1), "T": 2500, "Dk": 256, "Dv": 128, "beta": "step", "gated": gated, "regime": "mild",
               "initial": True, "dtype": "float16", "seed": 29}
    host = _delta_inputs(problem)
    if gated:
        host["g"] = host["g"] / 64  # a slow decay, so that early steps still matter at the end
    dev = to_device(cp, host, "float16")
    _check_long_run(cp, delta_scan, host, dev, 1234, bitwise_prefix=False)  # not bitwise: as the test above
    assert delta_tensor_core_calls == [True] * 3
    monkeypatch.setattr(_cuda_delta_chunk, "WGMMA", False)
    delta_scan(**{n: x if x is None else x[..., :100, :] for n, x in dev.items() if n != "initial_state"},
               backend="cupy")
    assert delta_tensor_core_calls == [True] * 3 + [False]


def _check_bfloat16_torch_delta(cp: Any, calls: list[bool], D: int) -> None:
    """PyTorch bfloat16 (B, T, H, D) data as (B, H, T, D) views, GQA by broadcasting: no float32 copy in or out."""
    torch = torch_with_cuda()
    rng = np.random.default_rng(24)
    B, T, H, G = 2, 333, 2, 2
    k = rng.standard_normal((B, T, H, D))
    host = {"q": rng.standard_normal((B, T, H, G, D)) / np.sqrt(D), "k": k / np.linalg.norm(k, axis=-1, keepdims=True),
            "v": rng.standard_normal((B, T, H, D)), "beta": rng.uniform(0, 1, (B, T, H)),
            "g": -rng.uniform(0, 0.5, (B, T, H))}
    tensors = {n: torch.tensor(x, dtype=torch.bfloat16, device="cuda") for n, x in host.items()}

    def operands(a: dict[str, Any]) -> dict[str, Any]:  # (B, T, H[, G], D) -> (B, H, G | 1, T, D) views
        def heads_first(x: Any) -> Any:
            return x.permute(0, 2, 1, 3)[:, :, None]

        return {"q": a["q"].permute(0, 2, 3, 1, 4), "k": heads_first(a["k"]), "v": heads_first(a["v"]),
                "beta": heads_first(a["beta"][..., None]), "g": heads_first(a["g"][..., None])}

    o, s = delta_scan(**operands(tensors), backend="cupy")
    assert calls == [True]
    assert isinstance(o, torch.Tensor) and o.dtype == torch.bfloat16 and s.dtype == torch.float32
    rounded = {n: x.cpu().numpy() for n, x in operands({n: t.double() for n, t in tensors.items()}).items()}
    want, want_s = delta_scan(**rounded, form="recurrent")
    _check(o.double().cpu().numpy(), want, "bfloat16", T * D, f"bf16 outputs, D = {D}")
    _check(s.double().cpu().numpy(), want_s, "float32", T * D, f"bf16 run's final state, D = {D}")


@pytest.mark.usefixtures("delta_kernel")
def test_delta_tensor_core_kernels_read_bfloat16_torch_tensors(cp: Any, delta_tensor_core_calls: list[bool]) -> None:
    _check_bfloat16_torch_delta(cp, delta_tensor_core_calls, 128)


@pytest.mark.usefixtures("nan_memory", "hopper")
def test_delta_key_split_kernel_reads_bfloat16_torch_tensors(cp: Any, delta_tensor_core_calls: list[bool]) -> None:
    _check_bfloat16_torch_delta(cp, delta_tensor_core_calls, 256)


# (Dk, Dv) pairs the per-key-gated tensor-core kernels cover (Dk <= 128; 40 pads to 48 keys).
GLA_TENSOR_CORE_DIMS = ((16, 64), (32, 32), (40, 128), (64, 256), (96, 32), (128, 64), (128, 128), (128, 256))


@pytest.fixture
def gla_tensor_core_calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """The calls of the per-key-gated scan's tensor-core launcher: ran (True) or declined (False)."""
    from linattn.backends import _cuda_gla_chunk

    return _record_calls(monkeypatch, _cuda_gla_chunk, "chunked_gla_scan")


@st.composite
def gla_tensor_core_problems(draw: Any) -> dict[str, Any]:
    """The calls cuda/gla_chunk.cu covers: 16-bit data, a log-gate per key, Dk <= 128, Dv multiples of 8."""
    B, H, G = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    Dk, Dv = draw(st.sampled_from(GLA_TENSOR_CORE_DIMS))
    return {
        "lead_q": (B, H, G), "lead_kv": (B, H, 1), "T": draw(st.integers(1, 300)), "Dk": Dk, "Dv": Dv,
        "gates": "key", "regime": draw(st.sampled_from(["mild", "extreme", "mixed"])),
        "initial": draw(st.booleans()), "dtype": "float16", "seed": draw(st.integers(0, 2**31)),
    }


@pytest.mark.usefixtures("nan_memory")
@GPU_SETTINGS
@given(gla_tensor_core_problems(), st.booleans())
def test_gla_tensor_core_kernels_match_the_reference(cp: Any, gla_tensor_core_calls: list[bool],
                                                     problem: dict[str, Any], widest: bool) -> None:
    """cuda/gla_chunk.cu against the loop: GQA, padded keys, every gate regime (total, none, growth), every tiling."""
    from linattn.backends import _cuda_gla_chunk

    host = linear_inputs(problem)
    o_ref, s_ref = causal_scan(**host, form="recurrent")
    gla_tensor_core_calls.clear()
    fill = _cuda_gla_chunk._FILL
    _cuda_gla_chunk._FILL = 0.0 if widest else fill  # 0: the widest tiling; else (few leading indices) narrow ones
    try:
        o, s = causal_scan(**to_device(cp, host, "float16"), backend="cupy")
    finally:
        _cuda_gla_chunk._FILL = fill
    assert gla_tensor_core_calls == [True]  # this call ran on the tensor-core kernels
    n = problem["T"] * problem["Dk"]
    _check(o, o_ref, "float16", n, f"outputs of {problem}, widest={widest}")
    _check(s, s_ref, "float32", n, f"final state of {problem}, widest={widest}")


# Past 128 keys the launcher runs both kernels over two parts of the keys: 136 = 72 + 64,
# 200 = 104 + 96 (Dv = 72: a partial tile of columns), 256 = 128 + 128.
GLA_KEY_SPLIT_DIMS = ((136, 64), (200, 72), (256, 128), (256, 256))


@st.composite
def gla_key_split_problems(draw: Any) -> dict[str, Any]:
    """``gla_tensor_core_problems`` with 128 < Dk <= 256."""
    Dk, Dv = draw(st.sampled_from(GLA_KEY_SPLIT_DIMS))
    return {**draw(gla_tensor_core_problems()), "Dk": Dk, "Dv": Dv}


@pytest.mark.usefixtures("nan_memory")
@GPU_SETTINGS
@given(gla_key_split_problems())
def test_gla_key_split_kernels_match_the_reference(cp: Any, gla_tensor_core_calls: list[bool],
                                                   launched_kernels: list[str], problem: dict[str, Any]) -> None:
    """Dk > 128: P and the scan once for each part of the keys, the second part's outputs added to the first's
    (float32) before their one rounding; the state's rows are the parts'. The tolerance as above (n = T·Dk)."""
    host = linear_inputs(problem)
    o_ref, s_ref = causal_scan(**host, form="recurrent")
    gla_tensor_core_calls.clear()
    launched_kernels.clear()
    o, s = causal_scan(**to_device(cp, host, "float16"), backend="cupy")
    assert gla_tensor_core_calls == [True]
    assert launched_kernels == ["gla_chunk_prepare", "gla_chunk_scan"] * 2, launched_kernels
    n = problem["T"] * problem["Dk"]
    _check(o, o_ref, "float16", n, f"outputs of {problem}")
    _check(s, s_ref, "float32", n, f"final state of {problem}")


@pytest.mark.usefixtures("nan_memory")
@pytest.mark.parametrize("Dk", [128, 256])
def test_gla_tensor_core_kernels_are_deterministic_and_prefix_invariant(cp: Any, gla_tensor_core_calls: list[bool],
                                                                       Dk: int) -> None:
    """T = 2500 (40 chunks): the reference, two runs bitwise equal, a prefix run against the long run; at Dk = 256
    the kernels run over two parts of the keys (the second adding the first's float32 outputs)."""
    p = {"lead_q": (2, 2, 1), "lead_kv": (2, 2, 1), "T": 2500, "Dk": Dk, "Dv": 128, "gates": "key",
         "regime": "mild", "initial": True, "dtype": "float16", "seed": 25}
    host = linear_inputs(p)
    host["gk"] = host["gk"] / 64  # a slow decay, so that early steps still matter at the end
    # The prefix not bitwise: float16's power-of-two scales follow the maxima of whole chunks.
    _check_long_run(cp, causal_scan, host, to_device(cp, host, "float16"), 1234, bitwise_prefix=False)
    assert gla_tensor_core_calls == [True] * 3


@pytest.mark.usefixtures("nan_memory")
@pytest.mark.parametrize(("regime", "widest", "Dk"), [
    *((regime, widest, 128) for regime in ("slow", "zero", "extreme", "mixed") for widest in (True, False)),
    ("slow", False, 256), ("mixed", True, 256)])
def test_gla_tensor_core_time_segments_match_the_reference(cp: Any, gla_tensor_core_calls: list[bool], regime: str,
                                                           widest: bool, Dk: int) -> None:
    """Few leading indices and T = 5001: the three passes (each segment's own state and log-decays per key, the
    join, the outputs), with the widest tiling or the launcher's; GQA, an initial state; two runs bitwise equal.
    At Dk = 256 each part of the keys takes the three passes from its rows of the initial state.

    "slow": mild gates / 64, so each segment's entering state still matters at its end;
    "zero": g = 0, so the join carries every state whole (each segment's decay is e^0);
    "extreme" and "mixed" as in the hypothesis tests (total decays, growth).
    """
    from linattn.backends import _cuda_gla_chunk, _cuda_scan

    p = {"lead_q": (1, 2, 2), "lead_kv": (1, 2, 1), "T": 5001, "Dk": Dk, "Dv": 128, "gates": "key",
         "regime": "mild" if regime in ("slow", "zero") else regime, "initial": True, "dtype": "float16", "seed": 27}
    host = linear_inputs(p)
    host["gk"] = host["gk"] / 64 if regime == "slow" else (0 * host["gk"] if regime == "zero" else host["gk"])
    fill = _cuda_gla_chunk._FILL
    _cuda_gla_chunk._FILL = 0.0 if widest else fill
    try:
        device = cp.cuda.Device().id
        for _, keys in _cuda_gla_chunk.key_parts(Dk):
            plans = _cuda_gla_chunk._scan_plans("float16", keys, 128, _cuda_gla_chunk._shared_limit(device))
            _, segments, _ = _cuda_gla_chunk.choose_tiling(plans, 4, 128, 5001, _cuda_scan._sm_count(device))
            assert segments > 1  # the three passes
        dev = to_device(cp, host, "float16")
        first, second = (causal_scan(**dev, backend="cupy") for _ in range(2))
    finally:
        _cuda_gla_chunk._FILL = fill
    assert gla_tensor_core_calls == [True, True]
    assert bool(cp.all(first[0] == second[0])) and bool(cp.all(first[1] == second[1]))
    o_ref, s_ref = causal_scan(**host)
    _check(first[0], o_ref, "float16", 5001 * Dk, f"outputs ({regime}, widest={widest}, Dk={Dk})")
    _check(first[1], s_ref, "float32", 5001 * Dk, f"final state ({regime}, widest={widest}, Dk={Dk})")


@pytest.mark.parametrize("D", [128, 256])
def test_gla_tensor_core_kernels_read_bfloat16_torch_tensors(cp: Any, gla_tensor_core_calls: list[bool],
                                                             D: int) -> None:
    """PyTorch bfloat16 (B, T, H, D) data, as flash-linear-attention lays it out, read as (B, H, T, D) views."""
    torch = torch_with_cuda()
    rng = np.random.default_rng(26)
    B, T, H = 2, 333, 3
    host = {"q": rng.standard_normal((B, T, H, D)) / np.sqrt(D), "k": rng.standard_normal((B, T, H, D)),
            "v": rng.standard_normal((B, T, H, D)), "gk": np.log(rng.uniform(0.9, 1.0, (B, T, H, D)))}
    tensors = {n: torch.tensor(x, dtype=torch.bfloat16, device="cuda") for n, x in host.items()}
    o, s = causal_scan(**{n: t.transpose(1, 2) for n, t in tensors.items()}, backend="cupy")
    assert gla_tensor_core_calls == [True]
    assert isinstance(o, torch.Tensor) and o.dtype == torch.bfloat16 and s.dtype == torch.float32
    want, want_s = causal_scan(**{n: t.double().cpu().numpy().transpose(0, 2, 1, 3) for n, t in tensors.items()},
                               form="recurrent")
    _check(o.double().cpu().numpy(), want, "bfloat16", T * D, "bf16 outputs")
    _check(s.double().cpu().numpy(), want_s, "float32", T * D, "bf16 run's final state")


def _check_delta_gradients(got: Any, ref: Any, host: dict[str, Any], dfinal: np.ndarray | None, dtype: str,
                           what: str) -> None:
    """The delta rule's gradients against the float64 reference.

    dq, dk, dv, dbeta and dS_0 are sums over the steps and one state dimension, as the
    outputs are (n = T·max(Dk, Dv) terms). dg_t is a reverse cumulative sum over s ≥ t of
    q_s·dq_s − v_s·dv_s (plus ⟨dS_T, S_T⟩), so its rounding is bounded by the same
    relative tolerance times the magnitudes of those terms, not of dg itself (which may
    cancel).
    """
    T, Dk, Dv = host["k"].shape[-2], host["k"].shape[-1], host["v"].shape[-1]
    n = T * max(Dk, Dv)
    for name in ("dq", "dk", "dv", "dbeta"):
        _check(getattr(got, name), getattr(ref, name), dtype, n, f"{name} of {what}")
    if ref.dinitial_state is not None:
        _check(got.dinitial_state, ref.dinitial_state, "float32" if dtype == "float16" else dtype, n,
               f"dinitial_state of {what}")
    if ref.dg is None:
        assert got.dg is None
        return
    terms = np.abs(host["q"] * ref.dq).sum(-1, keepdims=True) + np.abs(host["v"] * ref.dv).sum(-1, keepdims=True)
    terms = np.broadcast_to(terms, np.broadcast_shapes(terms.shape, ref.dg.shape)).sum(axis=-3, keepdims=True)
    bound = np.flip(np.cumsum(np.flip(terms, -2), -2), -2)
    if dfinal is not None:
        _, s_T = delta_scan(**host, form="recurrent")
        bound = bound + np.abs(dfinal * s_T).sum(axis=(-2, -1))[..., None, None]
    actual = np.asarray(got.dg.get() if hasattr(got.dg, "get") else got.dg, dtype=np.float64)
    error = np.abs(actual - ref.dg)
    allowed = _rtol(dtype, n) * bound + machine_epsilon(dtype) * np.abs(ref.dg)
    assert np.all(error <= allowed), f"dg of {what}: worst error/allowed {np.max(error / allowed):.3g}"


@pytest.mark.usefixtures("nan_memory")
@settings(GPU_SETTINGS, max_examples=15)  # each example compiles three kernels for its sizes and flags
@given(delta_problems(), st.integers(1, 2), st.booleans())
def test_delta_vjp_kernels_match_the_reference(cp: Any, problem: dict[str, Any], groups: int, dfinal: bool) -> None:
    """cuda/delta_grad.cu against the reverse-mode loop, GQA (q with a group axis) and dS_T included."""
    from linattn.delta_grad import delta_scan_vjp

    host = _delta_inputs(problem, groups)
    rng = np.random.default_rng(problem["seed"] + 1)
    do = rng.standard_normal((*host["q"].shape[:-1], problem["Dv"])).astype(problem["dtype"]).astype(np.float64)
    dF = rng.standard_normal((*host["k"].shape[:-2], problem["Dk"], problem["Dv"])) if dfinal else None
    ref = delta_scan_vjp(**host, do=do, dfinal_state=dF)
    got = delta_scan_vjp(**to_device(cp, {**host, "do": do, "dfinal_state": dF}, problem["dtype"]), backend="cupy")
    assert str(got.dq.dtype) == problem["dtype"]
    _check_delta_gradients(got, ref, host, dF, problem["dtype"], f"{problem}, groups={groups}, dS_T={dfinal}")


@pytest.mark.usefixtures("nan_memory")
def test_delta_vjp_kernels_are_deterministic_over_a_long_run(cp: Any) -> None:
    """T = 2500 (many tiles, several column blocks at Dv = 128): the reference, and two runs bitwise equal."""
    from linattn.delta_grad import delta_scan_vjp

    problem = {"lead": (1, 2), "T": 2500, "Dk": 64, "Dv": 128, "beta": "step", "gated": True, "regime": "mild",
               "initial": True, "dtype": "float32", "seed": 21}
    host = _delta_inputs(problem)
    host["g"] = host["g"] / 64  # a slow decay, so that early steps still matter at the end
    do = np.random.default_rng(22).standard_normal((1, 2, 1, 2500, 128)).astype(np.float32).astype(np.float64)
    ref = delta_scan_vjp(**host, do=do)
    dev = to_device(cp, {**host, "do": do}, "float32")
    first, second = (delta_scan_vjp(**dev, backend="cupy") for _ in range(2))
    _check_delta_gradients(first, ref, host, None, "float32", "the long run")
    for name in ("dq", "dk", "dv", "dbeta", "dg", "dinitial_state"):
        assert bool(cp.all(getattr(first, name) == getattr(second, name))), name


@pytest.mark.usefixtures("nan_memory")
@pytest.mark.parametrize("gates", ["none", "step", "key+value"])
def test_vjp_through_the_kernels_matches_the_reference(cp: Any, gates: str) -> None:
    p = {"lead_q": (2, 2, 2), "lead_kv": (2, 2, 1), "T": 150, "Dk": 64, "Dv": 100, "gates": gates,
         "regime": "mild", "initial": True, "dtype": "float64", "seed": 7}
    host = linear_inputs(p)
    rng = np.random.default_rng(8)
    do = rng.standard_normal((*p["lead_q"], p["T"], p["Dv"]))
    dfinal = rng.standard_normal((*p["lead_kv"], p["Dk"], p["Dv"]))
    ref = causal_scan_vjp(**host, do=do, dfinal_state=dfinal, form="recurrent")
    dev = to_device(cp, {**host, "do": do, "dfinal_state": dfinal}, "float64")
    got = causal_scan_vjp(**dev, backend="cupy")
    for name in ("dq", "dk", "dv", "dgk", "dgv", "dinitial_state"):
        want = getattr(ref, name)
        if want is None:
            assert getattr(got, name) is None
            continue
        # Gradients are scans too (over T·max(Dk, Dv) products), plus reverse cumulative
        # sums over T for the gates.
        assert_close(getattr(got, name), want, dtype="float64", reduction_length=p["T"] * 100, err_msg=name)




@pytest.mark.usefixtures("nan_memory")
@pytest.mark.parametrize("gates", ["key", "value", "key+value", "step"])
def test_time_segments_match_the_reference(cp: Any, gates: str) -> None:
    """The CUDA-core three-pass path; the middle pass sums each gate kind over a segment (cuda/segments.cu)."""
    from linattn.backends import _cuda_scan

    host, dev = _long_problem(cp, 3001, gates=gates)
    # The three-pass path, even if the device held only one block per multiprocessor.
    sms = _cuda_scan._sm_count(cp.cuda.Device().id)
    assert _cuda_scan._segments(2, 3001, sms, sms) > 1
    o_ref, s_ref = causal_scan(**host)
    o, s = causal_scan(**dev, backend="cupy")
    _check(o, o_ref, "float32", 3001 * 64, "outputs")
    _check(s, s_ref, "float32", 3001 * 64, "final state")


@pytest.mark.usefixtures("nan_memory")
@pytest.mark.parametrize("T", [200, 3001])
def test_kernels_are_deterministic(cp: Any, T: int) -> None:
    _, dev = _long_problem(cp, T)
    o1, s1 = causal_scan(**dev, backend="cupy")
    o2, s2 = causal_scan(**dev, backend="cupy")
    assert bool(cp.all(o1 == o2)) and bool(cp.all(s1 == s2))


@pytest.mark.usefixtures("nan_memory")
def test_prefix_outputs_do_not_depend_on_later_steps(cp: Any) -> None:
    host, dev = _long_problem(cp, 2500)
    o_full, _ = causal_scan(**dev, backend="cupy")
    P = 1234
    prefix = dict(dev)
    for name in ("q", "k", "v", "gk"):
        prefix[name] = dev[name][..., :P, :]
    o_prefix, _ = causal_scan(**prefix, backend="cupy")
    _check(o_full[..., :P, :], causal_scan(**{**host, **{n: host[n][..., :P, :] for n in ("q", "k", "v", "gk")}})[0],
           "float32", P * 64, "prefix of the long run")
    _check(o_prefix, cp.asnumpy(o_full[..., :P, :]).astype(np.float64), "float32", P * 64, "prefix run vs long run")


@pytest.mark.usefixtures("linear_kernel")
def test_bfloat16_torch_tensors_round_trip_without_float32_copies(cp: Any) -> None:
    torch = torch_with_cuda()
    rng = np.random.default_rng(5)
    B, T, H, D = 2, 333, 3, 128
    host = [rng.standard_normal((B, T, H, D)) / s for s in (np.sqrt(D), 1.0, 1.0)]
    tensors = [torch.tensor(x, dtype=torch.bfloat16, device="cuda") for x in host]
    rounded = [t.double().cpu().numpy() for t in tensors]
    g = torch.tensor(-rng.uniform(0, 1, (B, T, H)), dtype=torch.bfloat16, device="cuda")
    views = [t.transpose(1, 2) for t in tensors]  # (B, H, T, D) views of the (B, T, H, D) data
    o, s = causal_scan(*views, gk=g.transpose(1, 2)[..., None], backend="cupy")
    assert isinstance(o, torch.Tensor) and o.dtype == torch.bfloat16 and s.dtype == torch.float32
    want, want_s = causal_scan(*(x.transpose(0, 2, 1, 3) for x in rounded),
                               gk=g.double().cpu().numpy().transpose(0, 2, 1)[..., None])
    _check(o.float().cpu().numpy(), want, "bfloat16", T * D, "bf16 outputs")
    _check(s.cpu().numpy(), want_s, "float32", T * D, "bf16 run's final state")


@pytest.mark.parametrize("gates", ["none", "step", "key"])
def test_torch_tensors_run_on_the_callers_stream(cp: Any, gates: str) -> None:
    """Inputs made on a side stream behind a long GPU sleep: the kernels must run on that stream.

    Had they run on another stream they would read the inputs before they are written.
    The operands also cover the conversions a launch makes in the caller's library: a
    strided last axis (q) and one float32 operand among float16 ones (promoted: the
    CUDA-core kernel then reads all in float32).
    """
    torch = torch_with_cuda()
    p = {"lead_q": (2, 3, 1), "lead_kv": (2, 3, 1), "T": 700, "Dk": 64, "Dv": 64, "gates": gates,
         "regime": "mild", "initial": True, "dtype": "float16", "seed": 11}
    host = linear_inputs(p)
    o_ref, s_ref = causal_scan(**host)
    base = {name: None if x is None else torch.tensor(x, device="cuda").to(
        torch.float32 if name == "initial_state" else torch.float16) for name, x in host.items()}
    wide = torch.tensor(np.repeat(host["q"], 2, axis=-1), dtype=torch.float16, device="cuda")
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the inputs exist
        dev = {name: None if x is None else x * 1 for name, x in base.items()}  # written on the side stream
        dev["q"] = (wide * 1)[..., ::2]  # last-axis stride 2
        o, s = causal_scan(**dev, backend="cupy")
        o_short, _ = causal_scan(**{**dev, "v": dev["v"].float()}, backend="cupy")  # promoted to float32
    side.synchronize()
    n = p["T"] * p["Dk"]
    _check(o.double().cpu().numpy(), o_ref, "float16", n, "outputs")
    _check(s.double().cpu().numpy(), s_ref, "float32", n, "final state")
    assert o_short.dtype == torch.float32
    _check(o_short.double().cpu().numpy(), o_ref, "float32", n, "outputs of the promoted call")
