r"""The Linear Transformer (Katharopoulos et al., 2020): attention with a feature map.

.. math::

    o_t = \frac{\phi(q_t)^\top \sum_{j \le t} \phi(k_j) v_j^\top}
               {\phi(q_t)^\top \sum_{j \le t} \phi(k_j) + \varepsilon}

in O(T·m·Dv) time through the causal scan S_t = S_{t−1} + φ(k_t) v_tᵀ,
z_t = z_{t−1} + φ(k_t). With ``feature_map="identity", normalize=False, scale=s`` it is
flash-linear-attention's ``chunk_linear_attn`` / ``fused_recurrent_linear_attn``
(o_t = s·S_tᵀ q_t).
"""

from __future__ import annotations

from typing import Any

from linattn import _kernelized
from linattn.compare import register_method
from linattn.feature_maps import FeatureMap, get_feature_map

__all__ = ["linear_attention", "linear_attention_vjp"]


def _resolve_feature_map(feature_map: str | FeatureMap) -> FeatureMap:
    if isinstance(feature_map, FeatureMap):
        return feature_map
    if not isinstance(feature_map, str):
        raise TypeError(f"feature_map must be a name or a linattn.feature_maps.FeatureMap, got {feature_map!r}")
    return get_feature_map(feature_map)


def _featurizer(fm: FeatureMap) -> _kernelized.Featurizer:
    return _kernelized.Featurizer(
        query=lambda x, pos: fm.forward(x),
        key=lambda x, pos: fm.forward(x),
        query_vjp=lambda x, pos, d: fm.vjp(x, d),
        key_vjp=lambda x, pos, d: fm.vjp(x, d),
    )


def _setup(q, k, v, *, feature_map, normalize, eps, scale, causal, form, chunk_size, layout, cu_seqlens,
           backend, initial_state):
    fm = _resolve_feature_map(feature_map)
    options = _kernelized.check_options(causal=causal, normalize=normalize, eps=eps, scale=scale, form=form,
                                        chunk_size=chunk_size, default_scale=1.0)
    problem = _kernelized.prepare(q, k, v, layout=layout, cu_seqlens=cu_seqlens, backend=backend, options=options)
    m = fm.output_dim(problem.shapes.key_dim)
    state = _kernelized.check_state(problem, initial_state, m)
    return problem, _featurizer(fm), state, m


def linear_attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    feature_map: str | FeatureMap = "elu+1",
    normalize: bool = True,
    eps: float = 1e-6,
    scale: float | None = None,
    causal: bool = False,
    form: str = "chunked",
    chunk_size: int = 64,
    initial_state: Any = None,
    output_final_state: bool = False,
    layout: str = "bthd",
    cu_seqlens: Any = None,
    backend: str | None = None,
) -> Any:
    r"""Linear attention with a feature map φ (Katharopoulos et al., 2020).

    .. math::

        o_t = \frac{s\,\phi(q_t)^\top S_t}{s\,\phi(q_t)^\top z_t + \varepsilon}, \quad
        S_t = S_{t-1} + \phi(k_t) v_t^\top, \quad z_t = z_{t-1} + \phi(k_t)

    (causal; non-causal sums over every key), or o_t = s·φ(q_t)ᵀ S_t with
    ``normalize=False``.

    Parameters
    ----------
    q : array, shape (B, T, Hq, Dk)
        Queries (``(B, Hq, T, Dk)`` with ``layout="bhtd"``).
    k : array, shape (B, S, Hkv, Dk)
        Keys; Hq must be a multiple of Hkv (query head h reads kv head h // (Hq/Hkv)).
    v : array, shape (B, S, Hkv, Dv)
        Values.
    feature_map : str or FeatureMap, default "elu+1"
        φ, applied to the raw q and k: "elu+1", "relu", "identity", "taylor", or a
        :class:`linattn.feature_maps.FeatureMap`.
    normalize : bool, default True
        Divide by s·φ(q_t)·z_t + eps (the paper's normaliser).
    eps : float, default 1e-6
        Added to the normaliser, as in the authors' implementation; >= 0.
    scale : float, optional
        s, multiplying φ(q); default 1 (no scale, as in the paper; FLA's ops default to
        1/sqrt(Dk) — pass it to compare with them).
    causal : bool, default False
        Each query sees keys up to its own position (T must equal S).
    form : {"chunked", "parallel", "recurrent"}, default "chunked"
        The algorithm (they agree to rounding); see :func:`linattn.scan.causal_scan`.
    chunk_size : int, default 64
        Chunk length of the chunked form.
    initial_state : array or (array, array), optional
        S_0 of shape (N, Hkv, m, Dv), or the pair (S_0, z_0 of shape (N, Hkv, m)) when
        normalised; N = B, or the number of sequences under ``cu_seqlens``; m the feature
        dim. Causal only.
    output_final_state : bool, default False
        Also return the final state, in the same form.
    layout : {"bthd", "bhtd"}, default "bthd"
    cu_seqlens : array or sequence of int, optional
        Offsets of sequences packed in a batch of one; each runs alone with its own state.
    backend : str, optional
        ``"numpy"`` or another registered backend; None follows the inputs.

    Returns
    -------
    o : array, shape (B, T, Hq, Dv)
        In q's layout and dtype.
    final_state : array or (array, array)
        Only with ``output_final_state=True``: S (N, Hkv, m, Dv), or (S, z) when
        normalised, in the compute dtype (float32 for half-precision inputs).

    Raises
    ------
    TypeError, ValueError
        For bad shapes, dtypes, an unknown feature map or form, eps < 0, a state of the
        wrong shape, causal with T != S.

    Notes
    -----
    Differences from flash-linear-attention: FLA's ops are always causal, default to
    scale = 1/sqrt(Dk), apply no feature map (its layers do), use eps = 1e-10 and keep a
    normalised state as (S, z) with z of shape (N, 1, H, K); linattn's z is (N, Hkv, m).
    Under GQA the state is per key/value head, shared by the query heads of its group.

    References
    ----------
    A. Katharopoulos, A. Vyas, N. Pappas, F. Fleuret. "Transformers are RNNs: Fast
    Autoregressive Transformers with Linear Attention." ICML 2020.

    Examples
    --------
    >>> import numpy as np
    >>> import linattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 9, 2, 4)) for _ in range(3))
    >>> o = linattn.linear_attention(q, k, v, causal=True, chunk_size=4)
    >>> o_def = linattn.linear_attention(q, k, v, causal=True, form="parallel")
    >>> bool(np.allclose(o, o_def))
    True
    """
    problem, featurizer, state, _ = _setup(
        q, k, v, feature_map=feature_map, normalize=normalize, eps=eps, scale=scale, causal=causal, form=form,
        chunk_size=chunk_size, layout=layout, cu_seqlens=cu_seqlens, backend=backend, initial_state=initial_state,
    )
    return _kernelized.forward(problem, featurizer, state, output_final_state)


def linear_attention_vjp(
    q: Any,
    k: Any,
    v: Any,
    do: Any,
    *,
    feature_map: str | FeatureMap = "elu+1",
    normalize: bool = True,
    eps: float = 1e-6,
    scale: float | None = None,
    causal: bool = False,
    form: str = "chunked",
    chunk_size: int = 64,
    initial_state: Any = None,
    dfinal_state: Any = None,
    layout: str = "bthd",
    cu_seqlens: Any = None,
    backend: str | None = None,
) -> tuple[Any, ...]:
    r"""Compute the gradients of :func:`linear_attention` w.r.t. q, k, v (and the initial state).

    By the scan's VJP (:func:`linattn.scan.causal_scan_vjp`, same form) and the chain
    rule through the normaliser and the feature map:

    .. math::

        \frac{\partial o_t}{\partial n_t} = \frac{1}{d_t + \varepsilon}, \qquad
        \frac{\partial o_t}{\partial d_t} = -\frac{o_t}{d_t + \varepsilon}, \qquad
        dq_t = s\, J_\phi(q_t)^\top d\phi(q_t), \quad dk_t = J_\phi(k_t)^\top d\phi(k_t),

    with n_t = s·φ(q_t)ᵀS_t and d_t = s·φ(q_t)·z_t.

    Parameters
    ----------
    q, k, v, feature_map, normalize, eps, scale, causal, form, chunk_size, initial_state, layout, cu_seqlens, backend
        As in :func:`linear_attention`.
    do : array, shape (B, T, Hq, Dv)
        Cotangent of the output.
    dfinal_state : array or (array, array), optional
        Cotangent of the final state (same form as ``initial_state``).

    Returns
    -------
    dq, dk, dv : array
        Shaped like q, k, v, in their dtype.
    dinitial_state : array or (array, array)
        Only when ``initial_state`` is given.

    Examples
    --------
    >>> import numpy as np
    >>> import linattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v, do = (rng.standard_normal((1, 6, 1, 3)) for _ in range(4))
    >>> dq, dk, dv = linattn.linear_attention_vjp(q, k, v, do, causal=True)
    >>> dq.shape == q.shape
    True
    """
    problem, featurizer, state, m = _setup(
        q, k, v, feature_map=feature_map, normalize=normalize, eps=eps, scale=scale, causal=causal, form=form,
        chunk_size=chunk_size, layout=layout, cu_seqlens=cu_seqlens, backend=backend, initial_state=initial_state,
    )
    dstate = _kernelized.check_state(problem, dfinal_state, m, name="dfinal_state")
    return _kernelized.vjp(problem, featurizer, do, state, dstate)


register_method(
    "linear",
    lambda q, k, v, causal: linear_attention(q, k, v, causal=causal),
    description="Linear Transformer: elu+1 features, normalised, chunked scan (O(T) memory)",
)
