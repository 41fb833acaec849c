"""Every method end to end on CuPy arrays: the reference code on the GPU, with the kernels where they apply.

Both sides compute in float64 (the GPU side in a different order: other reductions,
the kernels), so they agree to 8·ε64·sqrt(n) relative to the largest output, n = T·D
terms per output element (:func:`linattn.testing.tolerance`). Methods whose error
against softmax is large (the approximations) still compute a deterministic function
of the same inputs, so the same bound applies.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import linattn
from linattn.cli import main
from linattn.compare import compared_methods
from linattn.testing import assert_close

B, T, H, D = 2, 200, 4, 32


def _qkv(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((B, T, H, D)) for _ in range(3)]


@pytest.mark.parametrize("name", sorted(compared_methods()))
def test_every_compared_method_runs_on_cupy(cp: Any, name: str) -> None:
    method = compared_methods()[name]
    host = _qkv()
    for causal in (True, False):
        if not (method.supports_causal if causal else method.supports_noncausal):
            continue
        want = np.asarray(method.run(*host, causal=causal))
        got = method.run(*(cp.asarray(x) for x in host), causal=causal)
        assert isinstance(got, cp.ndarray), f"{name} returned {type(got).__name__}, not a CuPy array"
        assert_close(got, want, dtype="float64", reduction_length=T * D, err_msg=f"{name} causal={causal}")


@pytest.mark.usefixtures("nan_memory")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_public_methods_with_cu_seqlens_on_the_kernels(cp: Any, dtype: str) -> None:
    rng = np.random.default_rng(1)
    cu = np.array([0, 0, 1, 70, 70, 301])  # empty and length-1 segments
    N, Tn = len(cu) - 1, int(cu[-1])
    q, k, v = (rng.standard_normal((1, Tn, H, D)).astype(dtype) for _ in range(3))
    k_unit = k / np.linalg.norm(k, axis=-1, keepdims=True)
    g = (-rng.uniform(0, 1, (1, Tn, H))).astype(dtype)
    gk = (-rng.uniform(0, 1, (1, Tn, H, D))).astype(dtype)
    beta = rng.uniform(0, 1, (1, Tn, H)).astype(dtype)
    u = rng.standard_normal((H, D)).astype(dtype)
    h0 = rng.standard_normal((N, H, D, D)).astype(dtype)
    calls = {
        "linear": lambda m, *x: linattn.linear_attention(*x, cu_seqlens=m.asarray(cu)),
        "simple_gla": lambda m, q, k, v: linattn.simple_gla(q, k, v, m.asarray(g), initial_state=m.asarray(h0),
                                                            cu_seqlens=m.asarray(cu), output_final_state=True),
        "gla": lambda m, q, k, v: linattn.gla(q, k, v, m.asarray(gk), cu_seqlens=m.asarray(cu),
                                              initial_state=m.asarray(h0), output_final_state=True),
        "rwkv6": lambda m, q, k, v: linattn.rwkv6(q, k, v, m.asarray(gk), m.asarray(u), cu_seqlens=m.asarray(cu)),
        "gated_delta_rule": lambda m, q, k, v: linattn.gated_delta_rule(
            q, m.asarray(k_unit), v, m.asarray(g), m.asarray(beta), cu_seqlens=m.asarray(cu),
            initial_state=m.asarray(h0), output_final_state=True),
    }
    for name, call in calls.items():
        want = call(np, q, k, v)
        got = call(cp, *(cp.asarray(x) for x in (q, k, v)))
        for w, x in zip(want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,),
                        strict=True):
            assert_close(x, w, dtype=dtype, reduction_length=Tn * D, err_msg=name)


def test_decoding_steps_on_cupy(cp: Any) -> None:
    from linattn import decoding

    q, k, v = (cp.asarray(x[:, :20]) for x in _qkv(2))
    want = linattn.linear_attention(q, k, v, feature_map="identity", normalize=False, causal=True)
    state = decoding.init_state("linear", batch=B, kv_heads=H, key_dim=D, value_dim=D, feature_map="identity",
                                normalize=False, xp=cp)
    outputs = []
    for t in range(20):
        o, state = decoding.step(state, q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1])
        outputs.append(o)
    assert_close(cp.concatenate(outputs, axis=1), want, dtype="float64", reduction_length=20 * D)


def test_compare_command_on_the_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["compare", "--backend", "cupy", "--lengths", "128", "--methods", "linear", "simple_gla", "delta",
                 "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "simple_gla" in out and "delta" in out
