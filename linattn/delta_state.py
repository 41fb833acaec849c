r"""Decoding states of DeltaNet and Gated DeltaNet, registered as ``"delta"`` and ``"gated_delta"``.

.. math::

    S_t = e^{g_t} \big(I - \beta_t k_t k_t^\top\big) S_{t-1} + \beta_t k_t v_t^\top, \qquad
    o_t = S_t^\top (s\, q_t)

(g = 0 for ``"delta"``), one S ∈ R^{Dk×Dv} per batch element and value head: the state
of :func:`linattn.delta.delta_rule` / :func:`linattn.delta.gated_delta_rule`, which
:func:`linattn.decoding.step` advances by n tokens at a time with the per-token inputs
``beta=`` (and ``g=``) passed by keyword.

Examples
--------
>>> import numpy as np
>>> import linattn.delta as delta
>>> from linattn.decoding import init_state, step
>>> rng = np.random.default_rng(0)
>>> q, k, v = (rng.standard_normal((1, 6, 2, 4)) for _ in range(3))
>>> g, beta = -rng.random((1, 6, 2)), rng.random((1, 6, 2))
>>> state = init_state("gated_delta", batch=1, heads=2, key_dim=4, value_dim=4, use_qk_l2norm=True)
>>> outputs = []
>>> for t in range(6):
...     o, state = step(state, q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], beta=beta[:, t:t + 1], g=g[:, t:t + 1])
...     outputs.append(o)
>>> full = delta.gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True)
>>> bool(np.allclose(np.concatenate(outputs, axis=1), full))
True
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from linattn import _checks
from linattn import delta as _delta
from linattn._problem import compute_dtype
from linattn.decoding import _allocator, register_state

__all__ = ["DeltaState", "GatedDeltaState"]

# A step of one token runs the loop; a longer block (a prefill) the chunked form with
# chunks of at most this many tokens, so that its cost stays linear in n.
_STEP_CHUNK = 64


@dataclass(frozen=True, eq=False)
class DeltaState:
    r"""Decoding state of :func:`linattn.delta.delta_rule`: S per batch element and value head.

    Attributes
    ----------
    S : array, shape (B, HV, Dk, Dv)
        The state after the tokens so far, float32 or float64; exactly the
        ``final_state`` of the forward, and its ``initial_state``.
    heads : int
        H, the query/key heads (HV / H value heads share each).
    scale : float
        s (default 1/sqrt(Dk)).
    use_qk_l2norm : bool
        Whether q and k are L2-normalised first.
    """

    S: Any
    heads: int
    scale: float
    use_qk_l2norm: bool

    gated = False

    @classmethod
    def initial(cls, *, batch: int, heads: int, key_dim: int, value_dim: int, value_heads: int | None = None,
                dtype: Any = None, xp: Any = None, device: Any = None, scale: float | None = None,
                use_qk_l2norm: bool = False) -> DeltaState:
        """The state before any token: S = 0.

        Parameters
        ----------
        batch, heads, key_dim, value_dim : int
            B, H (query/key heads), Dk, Dv of the tokens to come.
        value_heads : int, optional
            HV, a multiple of H (default H).
        dtype : dtype, optional
            The tokens' dtype (default float64); the state is float32 for half precision.
        xp : module, optional
            The array library (``numpy`` by default).
        device : optional
            Where the state lives.
        scale, use_qk_l2norm
            As in the forward.

        Returns
        -------
        DeltaState or GatedDeltaState
        """
        sizes = {name: _checks.check_positive_int(name, n) for name, n in
                 (("batch", batch), ("heads", heads), ("key_dim", key_dim), ("value_dim", value_dim),
                  ("value_heads", heads if value_heads is None else value_heads))}
        if sizes["value_heads"] % sizes["heads"]:
            raise ValueError(f"value_heads must be a multiple of heads (GVA), got value_heads={value_heads}, "
                             f"heads={heads}")
        xp, dtype, device = _allocator(xp, dtype, device)
        S = xp.zeros((sizes["batch"], sizes["value_heads"], sizes["key_dim"], sizes["value_dim"]), dtype=dtype,
                     device=device)
        return cls._build(S, sizes["heads"], scale, use_qk_l2norm)

    @classmethod
    def from_final_state(cls, final_state: Any, *, heads: int, scale: float | None = None,
                         use_qk_l2norm: bool = False) -> DeltaState:
        """Continue a sequence from the forward's ``final_state`` (B, HV, Dk, Dv).

        Parameters
        ----------
        final_state : array, shape (B, HV, Dk, Dv)
            float32 or float64; used as is (nothing ever writes into it).
        heads : int
            H, the query/key heads of the forward.
        scale, use_qk_l2norm
            The forward's options.

        Returns
        -------
        DeltaState or GatedDeltaState
        """
        xp = _checks.namespace_of(final_state=final_state)
        _checks.require_floating("final_state", final_state, xp)
        if final_state.ndim != 4:
            raise ValueError(f"final_state must have shape (B, HV, Dk, Dv), got {tuple(final_state.shape)}")
        if compute_dtype(xp, final_state.dtype) != final_state.dtype:
            raise TypeError(f"final_state must be float32 or float64, got {final_state.dtype}")
        heads = _checks.check_positive_int("heads", heads)
        if final_state.shape[1] % heads:
            raise ValueError(f"final_state's value heads HV={final_state.shape[1]} must be a multiple of heads={heads}")
        return cls._build(final_state, heads, scale, use_qk_l2norm)

    @classmethod
    def _build(cls, S: Any, heads: int, scale: Any, use_qk_l2norm: Any) -> DeltaState:
        _checks.check_bool("use_qk_l2norm", use_qk_l2norm)
        return cls(S, heads, _checks.check_scale(scale, int(S.shape[2])), use_qk_l2norm)

    @property
    def final_state(self) -> Any:
        """S, the ``final_state`` / ``initial_state`` of the forward."""
        return self.S

    def _step(self, q: Any, k: Any, v: Any, layout: str, *, beta: Any = None, g: Any = None) -> tuple[Any, Any]:
        layout = _checks.check_layout(layout)
        xp = _checks.namespace_of(q=q, k=k, v=v, state=self.S)
        if beta is None:
            raise TypeError("step needs beta=, the write strength of each new token, shape (B, n, HV)")
        if self.gated and g is None:
            raise TypeError("step needs g=, the log-decay of each new token, shape (B, n, HV)")
        if not self.gated and g is not None:
            raise ValueError("g= is for the gated delta rule; this is a DeltaState (init_state('delta', ...))")
        B, HV, Dk, Dv = (int(n) for n in self.S.shape)
        for name, x, dim, heads in (("q", q, Dk, self.heads), ("k", k, Dk, self.heads), ("v", v, Dv, HV)):
            _checks.require_floating(name, x, xp)
            expected = (B, "n", heads, dim) if layout == "bthd" else (B, heads, "n", dim)
            got = tuple(x.shape)
            if x.ndim != 4 or any(e != "n" and e != s for e, s in zip(expected, got, strict=True)):
                raise ValueError(f"{name} must have shape {expected} (layout={layout!r}) to match the state "
                                 f"S {tuple(self.S.shape)} with heads={self.heads}, got {got}")
        if compute_dtype(xp, q.dtype) != self.S.dtype:
            raise TypeError(f"q, k and v of dtype {q.dtype} compute in {compute_dtype(xp, q.dtype)}, but the state "
                            f"holds {self.S.dtype}; create the state with dtype={q.dtype}")
        n = int(q.shape[1] if layout == "bthd" else q.shape[2])
        options = {"scale": self.scale, "initial_state": self.S, "output_final_state": True,
                   "form": "recurrent" if n <= 1 else "chunked", "chunk_size": max(1, min(n, _STEP_CHUNK)),
                   "use_qk_l2norm": self.use_qk_l2norm, "layout": layout}
        if self.gated:
            o, S = _delta.gated_delta_rule(q, k, v, g, beta, **options)
        else:
            o, S = _delta.delta_rule(q, k, v, beta, **options)
        return o, replace(self, S=S)


@dataclass(frozen=True, eq=False)
class GatedDeltaState(DeltaState):
    """Decoding state of :func:`linattn.delta.gated_delta_rule` (same attributes as :class:`DeltaState`)."""

    gated = True


register_state("delta", DeltaState)
register_state("gated_delta", GatedDeltaState)
