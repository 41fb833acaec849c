"""Tests of linattn.testing.validate: planted bugs are caught as the right property, correct kernels pass.

The kernels under test are in tests/validate_kernels.py (NumPy) and below (PyTorch, JAX).
validate's own tolerances are derived (8·ε·sqrt(n)·κ); these tests assert only which
rows pass or fail, so no tolerance is chosen here.
"""

from __future__ import annotations

import functools
import itertools
import json

import numpy as np
import pytest
import validate_kernels as vk

import linattn
from linattn.testing import ValidationReport, assert_valid, validate
from linattn.testing.validation import CASES, METHODS, Adapter, UnsupportedError, canonical_dtype, register_adapter


def statuses(report: ValidationReport) -> dict[tuple[str, str], str]:
    return {(r.case, r.check): r.status for r in report.rows}


def failed(report: ValidationReport) -> dict[tuple[str, str], str]:
    """(case, check) -> the property of every failed row."""
    return {(r.case, r.check): r.failed_property for r in report.rows if r.failed}


# ---- correct implementations pass ----


def fla_linear(q, k, v, *, scale=None, **options):
    """linattn's linear attention with FLA's definition (identity features, scale Dk^-0.5, eps 1e-10)."""
    return linattn.linear_attention(q, k, v, scale=q.shape[-1] ** -0.5 if scale is None else scale, **options)


def fla_linear_vjp(q, k, v, do, *, scale=None, **options):
    return linattn.linear_attention_vjp(q, k, v, do, scale=q.shape[-1] ** -0.5 if scale is None else scale, **options)


def implementations():
    for name, spec in METHODS.items():
        if name == "linear":
            yield name, fla_linear, fla_linear_vjp
        else:
            yield name, spec.forward, spec.vjp


@pytest.mark.parametrize(("method", "forward", "backward"), list(implementations()), ids=list(METHODS))
def test_linattn_passes_every_case_of_its_own_methods_with_its_vjps(method, forward, backward) -> None:
    report = validate(forward, method, backward=backward)
    assert report.passed, str(report)
    assert all(r.status == "pass" for r in report.rows), str(report)  # nothing skipped: it takes every option
    assert any(r.check == "gradients" for r in report.rows)


@pytest.mark.parametrize(("method", "forward", "backward"), list(implementations()), ids=list(METHODS))
def test_linattn_passes_in_float16(method, forward, backward) -> None:
    assert validate(forward, method, backward=backward, dtypes=["fp16"], cases=["basic", "tail"]).passed


def test_a_numpy_loop_passes_and_its_gradients_are_marked_not_differentiable() -> None:
    report = validate(vk.gla_loop, "gla")
    assert report.passed, str(report)
    gradient_rows = [r for r in report.rows if r.check == "gradients"]
    assert gradient_rows
    assert all(r.status == "skip" and "not differentiable" in r.note for r in gradient_rows)
    assert "not differentiable" in report.summary()
    assert {r.status for r in report.rows if r.check != "gradients"} == {"pass"}


def test_a_numpy_loop_passes_in_float16_and_float64() -> None:
    assert validate(vk.gla_loop, "gla", dtypes=("float16", "float64"), grads=False).passed


@pytest.mark.parametrize("kernel", [vk.softmax_np, vk.linear_np])
def test_other_numpy_kernels_pass(kernel) -> None:
    method = "softmax" if kernel is vk.softmax_np else "linear"
    assert validate(kernel, method, grads=False).passed


# ---- planted bugs, each reported as its property ----


def test_an_off_by_one_causal_mask_fails_causality() -> None:
    report = validate(functools.partial(vk.softmax_np, bug="off_by_one"), "softmax", grads=False)
    assert failed(report)[("causality", "causality")] == "causality"
    assert statuses(report)[("noncausal", "output")] == "pass"  # the mask is the only thing wrong
    assert statuses(report)[("t1", "output")] == "pass"  # with one key there is no next key to see


def test_a_wrong_default_scale_fails_default_scale_only_where_the_scale_is_left_out() -> None:
    report = validate(functools.partial(vk.softmax_np, bug="scale"), "softmax", grads=False)
    assert failed(report)[("default_scale", "default scale")] == "default scale"
    assert statuses(report)[("scale", "output")] == "pass"
    assert "scale = 0.25 given" in report.rows_of("default_scale")[0].note  # Dk = 16


def test_a_normaliser_without_eps_gives_nan_on_zero_keys() -> None:
    report = validate(functools.partial(vk.linear_np, bug="no_eps"), "linear", grads=False)
    assert failed(report) == {("zero_keys", "output"): "values"}
    assert "NaN" in report.rows_of("zero_keys")[0].note


def test_a_dropped_tail_chunk_is_reported_as_the_tail_chunk() -> None:
    report = validate(functools.partial(vk.gla_loop, bug="tail"), "gla", grads=False)
    assert failed(report)[("tail", "output")] == "tail chunk"
    assert "last T % 64 = 36 steps" in report.rows_of("tail")[0].note
    assert failed(report)[("long", "output")] == "tail chunk"
    assert failed(report)[("basic", "output")] == "values"  # T = 40 < 64: no full chunk, no tail to blame


def test_a_gate_that_leaks_the_future_fails_causality() -> None:
    report = validate(functools.partial(vk.gla_loop, bug="future_gate"), "gla", grads=False)
    assert failed(report)[("causality", "causality")] == "causality"
    assert "moved when only later inputs changed" in report.rows_of("causality")[0].note


def test_a_transposed_initial_state_fails_initial_state_and_state_passing() -> None:
    report = validate(functools.partial(vk.gla_loop, bug="transposed_state"), "gla", grads=False)
    assert failed(report)[("initial_state", "output")] == "initial state"
    assert failed(report)[("state_passing", "state passing")] == "state passing"
    for case in ("basic", "tail", "causality", "gqa"):  # without an initial state everything is right
        assert all(r.status == "pass" for r in report.rows_of(case))


def test_a_backward_with_a_missing_term_fails_gradients_only() -> None:
    report = validate(vk.SoftmaxWithBackward("missing_term"), "softmax")
    assert set(failed(report).values()) == {"gradients"}
    assert {check for _, check in failed(report)} == {"gradients"}
    assert "dq" in report.rows_of("basic")[1].note  # dS enters dq and dk; dv is right
    assert "dv:" not in report.rows_of("basic")[1].note


def test_the_correct_backward_passes() -> None:
    report = validate(vk.SoftmaxWithBackward(), "softmax")
    assert report.passed, str(report)
    assert statuses(report)[("basic", "gradients")] == "pass"


# ---- arguments, skips and errors ----


def test_options_the_implementation_lacks_skip_their_cases_with_the_reason() -> None:
    report = validate(vk.softmax_np, "softmax", grads=False)
    window = report.rows_of("window")
    assert [r.status for r in window] == ["skip"]
    assert "takes no 'window' argument" in window[0].note
    assert report.passed


def test_bfloat16_with_numpy_is_skipped_with_the_reason() -> None:
    report = validate(vk.gla_loop, "gla", dtypes=["bf16"], cases=["basic"])
    assert [(r.status, r.note) for r in report.rows] == [("skip", "NumPy has no bfloat16")]


def test_an_implementation_that_raises_is_an_error_row_and_a_failure() -> None:
    def broken(q, k, v, gk, **options):
        raise RuntimeError("kernel launch failed\nmore text")

    report = validate(broken, "gla", cases=["basic", "t1"])
    assert [r.status for r in report.rows] == ["error", "error"]
    assert report.rows[0].note == "RuntimeError: kernel launch failed"
    assert not report.passed


def test_missing_final_state_is_an_error_row() -> None:
    report = validate(lambda q, k, v, gk, **options: q, "gla", cases=["initial_state"], grads=False)
    assert report.rows[0].status == "error"
    assert "final state" in report.rows[0].note


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"method": "nope"}, "method"), ({"cases": ["nope"]}, "cases"), ({"dtypes": ["int8"]}, "dtypes"),
    ({"adapter": "nope"}, "adapter"), ({"framework": "nope"}, "framework"), ({"cases": ["zero_keys"]}, "cases"),
    ({"dtypes": []}, "dtypes"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, name) -> None:
    arguments = {"impl": vk.gla_loop, "method": "gla", **kwargs}
    with pytest.raises(ValueError, match=name):
        validate(arguments.pop("impl"), arguments.pop("method"), **arguments)


@pytest.mark.parametrize(("kwargs", "name"), [({"grads": 1}, "grads"), ({"seed": 1.5}, "seed"),
                                              ({"backward": 3}, "backward"), ({"adapter": 3}, "adapter")])
def test_bad_argument_types_raise_type_error_naming_them(kwargs, name) -> None:
    with pytest.raises(TypeError, match=name):
        validate(vk.gla_loop, "gla", **kwargs)


def test_a_backward_with_an_adapter_is_refused() -> None:
    with pytest.raises(ValueError, match="backward"):
        validate(vk.gla_loop, "gla", adapter="fla", framework="numpy", backward=linattn.gla_vjp)


def test_dtype_aliases() -> None:
    assert [canonical_dtype(d) for d in ("fp16", "bf16", "fp32", "fp64", np.float32)] == [
        "float16", "bfloat16", "float32", "float64", "float32"]


def test_the_same_seed_draws_the_same_problems_and_another_seed_others() -> None:
    a, b = (validate(vk.gla_loop, "gla", cases=["basic"], seed=s) for s in (0, 0))
    c = validate(vk.gla_loop, "gla", cases=["basic"], seed=1)
    assert a.rows[0].max_abs_error == b.rows[0].max_abs_error
    assert a.rows[0].worst != c.rows[0].worst or a.rows[0].max_abs_error != c.rows[0].max_abs_error


def test_cases_cover_what_breaks_kernels() -> None:
    names = {c.name for c in CASES}
    assert {"t1", "t23", "tail", "odd_dims", "gqa", "varlen", "initial_state", "state_passing", "causality",
            "extreme", "long", "window", "mask", "default_scale"} <= names
    varlen = next(c for c in CASES if c.name == "varlen")
    assert 0 in varlen.shape.segments and 1 in varlen.shape.segments


# ---- the report ----


def test_the_report_prints_a_table_with_the_tolerance_rule_and_round_trips_as_json() -> None:
    report = validate(functools.partial(vk.gla_loop, bug="tail"), "gla", cases=["basic", "tail"], grads=False)
    text = str(report)
    for column in ("case", "check", "shape", "dtype", "max abs", "rel RMS", "tol", "worst at", "result"):
        assert column in text.splitlines()[1]
    assert "tail chunk: errors only in the last T % 64 = 36 steps" in text
    assert "8*eps*sqrt(n)*kappa" in text
    assert report.summary() in text and report.summary().startswith("FAILED: 0 passed, 2 failed")
    data = json.loads(report.to_json())
    assert data["passed"] is False
    assert data["failed_properties"] == ["tail chunk", "values"]
    assert data["rows"][1]["worst"].startswith("o[")


def test_assert_valid_raises_with_the_report_and_returns_it_on_success() -> None:
    with pytest.raises(AssertionError, match="tail chunk"):
        assert_valid(functools.partial(vk.gla_loop, bug="tail"), "gla", cases=["tail"], grads=False)
    assert assert_valid(vk.gla_loop, "gla", cases=["tail"], grads=False).passed


def test_the_pytest_fixture_is_assert_valid(linattn_validate) -> None:
    assert linattn_validate is assert_valid
    with pytest.raises(AssertionError, match="causality"):
        linattn_validate(functools.partial(vk.gla_loop, bug="future_gate"), "gla", cases=["causality"])


# ---- adapters, with NumPy stand-ins for the peers' functions ----


def fla_chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """chunk_gla's signature and return value ((o, ht), ht None unless asked for)."""
    result = vk.gla_loop(q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=True,
                         cu_seqlens=cu_seqlens)
    return result[0], (result[1] if output_final_state else None)


def fla_naive_head_first(q, k, v, gk, initial_state=None, output_final_state=False):
    """A head-first naive reference: [B, H, T, D], no scale and no cu_seqlens arguments."""
    swap = functools.partial(np.swapaxes, axis1=1, axis2=2)
    o, ht = fla_chunk_gla(swap(q), swap(k), swap(v), swap(gk), initial_state=initial_state,
                          output_final_state=output_final_state)
    return swap(o), ht


def test_the_fla_adapter_calls_chunk_gla_style_functions() -> None:
    report = validate(fla_chunk_gla, "gla", adapter="fla", framework="numpy", grads=False)
    assert report.passed, str(report)
    assert [r.note for r in report.rows if r.status == "skip"] == [
        "FLA's gla needs as many query as key/value heads (GVA: gated_delta_rule only)"]


def test_the_fla_head_first_adapter_transposes_and_skips_what_the_function_lacks() -> None:
    report = validate(fla_naive_head_first, "gla", adapter="fla_head_first", framework="numpy", grads=False)
    assert report.passed, str(report)
    skipped = {r.case for r in report.rows if r.status == "skip"}
    assert skipped == {"gqa", "scale", "default_scale", "varlen"}


def test_the_fla_adapter_passes_gates_by_name_whatever_their_order() -> None:
    def naive_gated_delta(q, k, v, beta, g, scale=None, initial_state=None, output_final_state=False):
        return linattn.gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                        output_final_state=output_final_state)

    assert validate(naive_gated_delta, "gated_delta_rule", adapter="fla", framework="numpy", grads=False).passed


def sdpa_numpy(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """scaled_dot_product_attention's signature on [B, H, T, D] NumPy arrays."""
    group = q.shape[1] // k.shape[1]
    k, v = (np.repeat(x, group, axis=1) for x in (k, v))
    logits = q @ np.swapaxes(k, -1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if is_causal:
        attn_mask = np.tril(np.ones(logits.shape[-2:], dtype=bool))
    if attn_mask is not None:
        logits = np.where(attn_mask, logits, -np.inf)
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (p / p.sum(axis=-1, keepdims=True)) @ v


def test_the_sdpa_adapter_maps_causal_windows_masks_and_gqa() -> None:
    report = validate(sdpa_numpy, "softmax", adapter="sdpa", framework="numpy", grads=False)
    assert report.passed, str(report)
    assert statuses(report)[("window", "output")] == statuses(report)[("mask", "output")] == "pass"
    assert [r.case for r in report.rows if r.status == "skip"] == ["varlen"]


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
    """mamba-ssm's selective_scan_fn signature (returns out, or (out, last_state))."""
    result = linattn.selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                    delta_softplus=delta_softplus, output_final_state=return_last_state)
    return result


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                              dt_softplus=False, return_final_states=False):
    """mamba-ssm's mamba_chunk_scan_combined: states (N, H, P, N_state), linattn's transposed."""
    state = None if initial_states is None else np.swapaxes(initial_states, -1, -2)
    result = linattn.mamba2(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, initial_state=state,
                            output_final_state=return_final_states, chunk_size=chunk_size)
    return (result[0], np.swapaxes(result[1], -1, -2)) if return_final_states else result


@pytest.mark.parametrize(("fn", "method"), [(selective_scan_fn, "selective_scan"),
                                            (mamba_chunk_scan_combined, "mamba2")])
def test_the_mamba_ssm_adapter(fn, method) -> None:
    report = validate(fn, method, adapter="mamba_ssm", framework="numpy", grads=False)
    assert report.passed, str(report)
    assert "varlen" in {r.case for r in report.rows if r.status == "skip"}


def test_an_adapter_may_be_a_plain_function_or_registered() -> None:
    def reversed_arguments(impl, call):
        if "cu_seqlens" in call.options:
            raise UnsupportedError("no varlen here")
        return impl(*reversed(call.positional()), **call.options)

    def kernel(gk, v, k, q, **options):
        return vk.gla_loop(q, k, v, gk, **options)

    report = validate(kernel, "gla", adapter=reversed_arguments, grads=False)
    assert report.passed, str(report)
    assert report.adapter == "test_an_adapter_may_be_a_plain_function_or_registered.<locals>.reversed_arguments"
    register_adapter(Adapter("reversed", reversed_arguments))
    assert validate(kernel, "gla", adapter="reversed", grads=False, cases=["basic"]).passed


# ---- PyTorch and JAX: autograd gradients ----


def gla_torch(q, k, v, gk, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, bug=None):
    """GLA in PyTorch, one step at a time (autograd gives its gradients)."""
    import torch

    batch, length, q_heads, key_dim = q.shape
    kv_heads, value_dim = v.shape[2], v.shape[3]
    scale = key_dim**-0.5 if scale is None else scale
    dtype = q.dtype
    q, k, v, gk = (x.float() for x in (q, k, v, gk))
    if cu_seqlens is None:
        sequences = [(b, b, 0, length) for b in range(batch)]
    else:
        bounds = [int(x) for x in cu_seqlens]
        sequences = [(n, 0, lo, hi) for n, (lo, hi) in enumerate(itertools.pairwise(bounds))]
    rows = [[None] * length for _ in range(batch)]
    finals = []
    for n, b, lo, hi in sequences:
        S = q.new_zeros(kv_heads, key_dim, value_dim) if initial_state is None else initial_state[n].float()
        for t in range(lo, hi):
            update = k[b, t][..., None] * v[b, t][:, None, :]
            S = gk[b, t].exp()[..., None] * S + (update.detach() if bug == "no_k_grad" else update)
            reads = q[b, t].reshape(kv_heads, q_heads // kv_heads, key_dim)
            rows[b][t] = scale * torch.einsum("hgk,hkv->hgv", reads, S).reshape(q_heads, value_dim)
        finals.append(S)
    o = torch.stack([torch.stack(row) for row in rows]).to(dtype)
    return (o, torch.stack(finals)) if output_final_state else o


def test_a_pytorch_implementation_passes_with_its_autograd_gradients() -> None:
    pytest.importorskip("torch")
    report = validate(gla_torch, "gla", framework="torch", dtypes=["float32", "bf16"], device="cpu",
                      cases=["basic", "tail", "gqa", "initial_state", "varlen", "causality"])
    assert report.passed, str(report)
    assert sum(r.check == "gradients" and r.status == "pass" for r in report.rows) == 10


def test_pytorch_gradients_that_autograd_cannot_see_fail() -> None:
    pytest.importorskip("torch")
    report = validate(functools.partial(gla_torch, bug="no_k_grad"), "gla", framework="torch", cases=["basic"])
    assert failed(report) == {("basic", "gradients"): "gradients"}
    assert "dk:" in report.rows[1].note and "dv:" in report.rows[1].note


def test_torch_sdpa_through_the_sdpa_adapter() -> None:
    torch = pytest.importorskip("torch")
    report = validate(torch.nn.functional.scaled_dot_product_attention, "softmax", adapter="sdpa", device="cpu")
    assert report.passed, str(report)
    assert statuses(report)[("gqa", "gradients")] == "pass"


def test_flash_linear_attention_naive_gla_through_the_fla_adapter() -> None:
    pytest.importorskip("torch")
    naive = pytest.importorskip("fla.ops.gla.naive")
    report = validate(naive.naive_recurrent_gla, "gla", adapter="fla", device="cpu")
    assert report.passed, str(report)


def gla_jax(q, k, v, gk, scale=None, initial_state=None, output_final_state=False):
    """GLA in JAX with lax.scan over time (jax.vjp gives its gradients)."""
    import jax
    import jax.numpy as jnp

    batch, _length, q_heads, key_dim = q.shape
    kv_heads, value_dim = v.shape[2], v.shape[3]
    scale = key_dim**-0.5 if scale is None else scale
    if initial_state is None:
        initial_state = jnp.zeros((batch, kv_heads, key_dim, value_dim), jnp.float32)

    def step(S, inputs):
        qt, kt, vt, gt = inputs
        S = jnp.exp(gt)[..., None] * S + kt[..., None] * vt[..., None, :]
        reads = qt.reshape(batch, kv_heads, q_heads // kv_heads, key_dim)
        return S, scale * jnp.einsum("bhgk,bhkv->bhgv", reads, S).reshape(batch, q_heads, value_dim)

    per_step = tuple(jnp.swapaxes(x.astype(jnp.float32), 0, 1) for x in (q, k, v, gk))
    final, o = jax.lax.scan(step, initial_state.astype(jnp.float32), per_step)
    o = jnp.swapaxes(o, 0, 1).astype(q.dtype)
    return (o, final) if output_final_state else o


def test_a_jax_implementation_passes_with_jax_vjp_gradients() -> None:
    pytest.importorskip("jax")
    # every call traces and compiles lax.scan anew: a few cases keep this test at a few seconds
    report = validate(gla_jax, "gla", framework="jax", cases=["basic", "initial_state", "causality"])
    assert report.passed, str(report)
    assert sum(r.check == "gradients" and r.status == "pass" for r in report.rows) == 2
    assert validate(gla_jax, "gla", framework="jax", dtypes=["bf16"], cases=["gqa"]).passed


def test_a_numpy_function_under_jax_is_reported_not_differentiable() -> None:
    pytest.importorskip("jax")

    def through_numpy(q, k, v, gk, **options):
        import jax.numpy as jnp

        return jnp.asarray(vk.gla_loop(*(np.asarray(x) for x in (q, k, v, gk)), **options))

    report = validate(through_numpy, "gla", framework="jax", cases=["basic"])
    assert [r.status for r in report.rows] == ["pass", "skip"]
    assert report.rows[1].note.startswith("not differentiable: jax.vjp failed")
