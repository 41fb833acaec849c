"""Helpers shared by the tests."""

import numpy as np


def logit_magnitude(problem) -> float:
    """max |scale · q·k| + |mask| + alibi reach: the size of the logits, which sets how much
    rounding in them moves the softmax (its condition number for absolute logit errors)."""
    from linattn._problem import prepare

    kw = {k: v for k, v in problem.kwargs.items() if k in (
        "causal", "scale", "mask", "window", "alibi_slopes", "layout", "cu_seqlens")}
    full = {"causal": False, "scale": None, "mask": None, "window": None, "alibi_slopes": None,
            "layout": "bthd", "cu_seqlens": None, "backend": None}
    full.update(kw)
    p = prepare(problem.q.astype(np.float64), problem.k.astype(np.float64), problem.v.astype(np.float64), **full)
    s = np.asarray(p.scores(0, p.q_len, 0, p.kv_len))
    finite = s[np.isfinite(s)]
    return float(np.max(np.abs(finite), initial=1.0))
