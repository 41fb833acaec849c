r"""Performer (Choromanski et al., 2021): softmax attention estimated by random features.

FAVOR+ replaces exp(q·k/√Dk) by φ(q)·φ(k) with random features whose expectation is
that kernel (:func:`linattn.feature_maps.favor_positive`, :func:`~linattn.feature_maps.favor_trig`),
then runs linear attention on the features. The estimate is unbiased for each kernel
value; its variance is in :mod:`linattn.bounds`.
"""

from __future__ import annotations

from typing import Any

import array_api_compat
import numpy as np

from linattn import _checks, _kernelized
from linattn import feature_maps as fmaps
from linattn._random import as_generator
from linattn.compare import register_method

__all__ = ["performer_attention", "performer_attention_vjp"]

KINDS = ("positive", "trig")


def _projection(problem: _kernelized.KernelizedProblem, *, num_features: Any, projection: Any, orthogonal: Any,
                scaling: Any, rng: Any) -> Any:
    xp, dk = problem.xp, problem.shapes.key_dim
    if projection is None:
        if isinstance(num_features, bool) or not isinstance(num_features, int | np.integer) or num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        projection = fmaps.random_projection(int(num_features), dk, orthogonal=orthogonal, scaling=scaling,
                                             rng=as_generator(rng))
    _checks.require_array("projection", projection)
    if projection.ndim != 2 or int(projection.shape[1]) != dk:
        raise ValueError(f"projection must have shape (m, Dk) = (m, {dk}), got {tuple(projection.shape)}")
    device = array_api_compat.device(problem.q)
    if isinstance(projection, np.ndarray) and not array_api_compat.is_numpy_namespace(xp):
        projection = xp.asarray(projection, device=device)  # our own draws are NumPy; move them
    _checks.namespace_of(q=problem.q, projection=projection)
    _checks.require_floating("projection", projection, xp)
    return xp.astype(projection, problem.q.dtype)


def _featurizer(kind: str, W: Any, *, stabilize: bool, stabilize_keys: bool, feature_eps: float,
                kernel_scale: float | None) -> _kernelized.Featurizer:
    if kind == "trig":
        return _kernelized.Featurizer(
            query=lambda x, pos: fmaps.favor_trig(x, W, scale=kernel_scale),
            key=lambda x, pos: fmaps.favor_trig(x, W, scale=kernel_scale),
            query_vjp=lambda x, pos, d: fmaps.favor_trig_vjp(x, d, W, scale=kernel_scale),
            key_vjp=lambda x, pos, d: fmaps.favor_trig_vjp(x, d, W, scale=kernel_scale),
        )
    q_opts = {"stabilize": stabilize, "eps": feature_eps, "scale": kernel_scale}
    k_opts = {**q_opts, "stabilize": stabilize_keys}
    return _kernelized.Featurizer(
        query=lambda x, pos: fmaps.favor_positive(x, W, role="query", **q_opts),
        key=lambda x, pos: fmaps.favor_positive(x, W, role="key", **k_opts),
        query_vjp=lambda x, pos, d: fmaps.favor_positive_vjp(x, d, W, role="query", **q_opts),
        key_vjp=lambda x, pos, d: fmaps.favor_positive_vjp(x, d, W, role="key", **k_opts),
    )


def _setup(q, k, v, *, num_features, kind, orthogonal, scaling, projection, rng, stabilize, feature_eps,
           scale, normalize, eps, causal, form, chunk_size, layout, cu_seqlens, backend, initial_state):
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    _checks.check_bool("stabilize", stabilize)
    if stabilize and kind == "positive" and not normalize:
        raise ValueError("stabilize=True needs normalize=True: the stabiliser's constants cancel only between "
                         "numerator and denominator; pass stabilize=False for unnormalised attention")
    options = _kernelized.check_options(causal=causal, normalize=normalize, eps=eps, scale=None, form=form,
                                        chunk_size=chunk_size, default_scale=1.0)
    problem = _kernelized.prepare(q, k, v, layout=layout, cu_seqlens=cu_seqlens, backend=backend, options=options)
    W = _projection(problem, num_features=num_features, projection=projection, orthogonal=orthogonal,
                    scaling=scaling, rng=rng)
    m = int(W.shape[0]) * (2 if kind == "trig" else 1)
    state = _kernelized.check_state(problem, initial_state, m)
    # The key constant is a maximum over all of the call's keys. Causal attention never uses
    # it: it would let future keys reach past outputs (through eps·e^c) and put states on a
    # per-call scale. Unstabilised key features exp(w·k' − |k'|²/2) are at most exp(|w|²/2).
    featurizer = _featurizer(kind, W, stabilize=stabilize, stabilize_keys=stabilize and not causal,
                             feature_eps=feature_eps, kernel_scale=scale)
    return problem, featurizer, state, m


def performer_attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    num_features: int = 256,
    kind: str = "positive",
    orthogonal: bool = True,
    scaling: str = "chi",
    projection: Any = None,
    rng: Any = None,
    stabilize: bool = True,
    feature_eps: float = 0.0,
    scale: float | None = None,
    normalize: bool = True,
    eps: float = 0.0,
    causal: bool = False,
    form: str = "chunked",
    chunk_size: int = 64,
    initial_state: Any = None,
    output_final_state: bool = False,
    layout: str = "bthd",
    cu_seqlens: Any = None,
    backend: str | None = None,
) -> Any:
    r"""Performer attention with FAVOR+ random features.

    .. math::

        o_t = \frac{\phi(q_t)^\top \sum_{j} \phi(k_j) v_j^\top}{\phi(q_t)^\top \sum_j \phi(k_j) + \varepsilon},
        \qquad \mathbb{E}_W[\phi(q)\cdot\phi(k)] = e^{\,\text{scale}\; q\cdot k},

    with φ the positive features exp(w_i·x' − |x'|²/2 − c)/√m (``kind="positive"``) or
    the trigonometric ones exp(|x'|²/2)/√r·[sin Wx', cos Wx'] (``kind="trig"``),
    x' = x·scale^{1/2}; sums over j ≤ t when causal.

    Parameters
    ----------
    q, k, v : array
        (B, T, Hq, Dk), (B, S, Hkv, Dk), (B, S, Hkv, Dv) (``layout="bthd"``).
    num_features : int, default 256
        Rows r of the projection W (ignored when ``projection`` is given). The feature
        dim m is r for positive features and 2r for trigonometric ones.
    kind : {"positive", "trig"}, default "positive"
    orthogonal : bool, default True
        Orthogonal random blocks (FAVOR+) or iid rows.
    scaling : {"chi", "sqrt"}, default "chi"
        Row norms: chi-distributed (each row marginally Gaussian) or all sqrt(Dk).
    projection : array, shape (r, Dk), optional
        W itself, so that a caller can feed the same draw to another implementation.
    rng : numpy.random.Generator or int, optional
        Where W is drawn from when ``projection`` is None (required then).
    stabilize : bool, default True
        The official implementation's stabiliser: a per-query constant, and (non-causal
        only) a per-sequence key constant, subtracted in the exponent. They cancel exactly
        between numerator and denominator when ``feature_eps = eps = 0``, so it needs
        ``normalize=True``. Causal attention leaves the keys unstabilised (see Notes), so
        its states are on one scale and pass between calls.
    feature_eps : float, default 0.0
        Added to every positive feature (the official ``numerical_stabilizer``).
    scale : float, optional
        The softmax scale being estimated; default 1/sqrt(Dk).
    normalize : bool, default True
        Divide by φ(q_t)·Σφ(k_j) + eps (softmax's normaliser, estimated).
    eps : float, default 0.0
        Added to the normaliser (the official implementation adds none; positive
        features make it positive).
    causal, form, chunk_size, initial_state, output_final_state, layout, cu_seqlens, backend
        As in :func:`linattn.linear_attention`; states have m = r or 2r features.

    Returns
    -------
    o : array, shape (B, T, Hq, Dv)
    final_state : array or (array, array)
        With ``output_final_state=True``.

    Raises
    ------
    TypeError, ValueError
        num_features < 1, an unknown kind or scaling, a projection whose width is not Dk,
        no rng and no projection, and the errors of :func:`linattn.linear_attention`.

    Notes
    -----
    The official code subtracts the maximum over all keys of the sequence also in causal
    attention. That constant includes future keys: it cancels only when
    ``feature_eps = eps = 0``, and otherwise lets future keys move past outputs (through
    eps·e^{c}). linattn's causal form does not use it, so its outputs are causal for every
    eps; a key feature is then at most exp(|w_i|²/2)/√m, reached only by a key aligned
    with a long row (in float32, overflow needs w_i·k' − |k'|²/2 > 88).
    :class:`linattn.decoding.PerformerState` can keep a running key maximum instead.
    Under ``cu_seqlens`` the non-causal key constant is per sequence.

    References
    ----------
    K. Choromanski et al. "Rethinking Attention with Performers." ICLR 2021.

    Examples
    --------
    >>> import numpy as np
    >>> import linattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 64, 1, 8)) * 0.5 for _ in range(3))
    >>> exact = linattn.softmax_attention(q, k, v)
    >>> approx = linattn.performer_attention(q, k, v, num_features=4096, rng=0)
    >>> bool(np.linalg.norm(approx - exact) / np.linalg.norm(exact) < 0.1)
    True
    """
    problem, featurizer, state, _ = _setup(
        q, k, v, num_features=num_features, kind=kind, orthogonal=orthogonal, scaling=scaling, projection=projection,
        rng=rng, stabilize=stabilize, feature_eps=feature_eps, scale=scale, normalize=normalize, eps=eps,
        causal=causal, form=form, chunk_size=chunk_size, layout=layout, cu_seqlens=cu_seqlens, backend=backend,
        initial_state=initial_state,
    )
    return _kernelized.forward(problem, featurizer, state, output_final_state)


def performer_attention_vjp(
    q: Any,
    k: Any,
    v: Any,
    do: Any,
    *,
    num_features: int = 256,
    kind: str = "positive",
    orthogonal: bool = True,
    scaling: str = "chi",
    projection: Any = None,
    rng: Any = None,
    stabilize: bool = True,
    feature_eps: float = 0.0,
    scale: float | None = None,
    normalize: bool = True,
    eps: float = 0.0,
    causal: bool = False,
    form: str = "chunked",
    chunk_size: int = 64,
    initial_state: Any = None,
    dfinal_state: Any = None,
    layout: str = "bthd",
    cu_seqlens: Any = None,
    backend: str | None = None,
) -> tuple[Any, ...]:
    r"""Compute the gradients of :func:`performer_attention` w.r.t. q, k, v (for a fixed W).

    The chain rule through the scan's VJP and the features' VJPs
    (:func:`linattn.feature_maps.favor_positive_vjp`, ``favor_trig_vjp``), with the same
    projection W (pass the same ``projection`` or ``rng`` seed as the forward).

    Parameters
    ----------
    q, k, v, num_features, kind, orthogonal, scaling, projection, rng, stabilize, feature_eps, scale
        As in :func:`performer_attention`.
    normalize, eps, causal, form, chunk_size, initial_state, layout, cu_seqlens, backend
        As in :func:`performer_attention`.
    do : array, shape (B, T, Hq, Dv)
        Cotangent of the output.
    dfinal_state : array or (array, array), optional
        Cotangent of the final state.

    Returns
    -------
    dq, dk, dv : array
    dinitial_state : array or (array, array)
        Only when ``initial_state`` is given.

    Examples
    --------
    >>> import numpy as np
    >>> import linattn
    >>> q, k, v, do = (np.random.default_rng(1).standard_normal((1, 5, 1, 4)) for _ in range(4))
    >>> dq, dk, dv = linattn.performer_attention_vjp(q, k, v, do, num_features=16, rng=0, causal=True)
    >>> dk.shape
    (1, 5, 1, 4)
    """
    problem, featurizer, state, m = _setup(
        q, k, v, num_features=num_features, kind=kind, orthogonal=orthogonal, scaling=scaling, projection=projection,
        rng=rng, stabilize=stabilize, feature_eps=feature_eps, scale=scale, normalize=normalize, eps=eps,
        causal=causal, form=form, chunk_size=chunk_size, layout=layout, cu_seqlens=cu_seqlens, backend=backend,
        initial_state=initial_state,
    )
    dstate = _kernelized.check_state(problem, dfinal_state, m, name="dfinal_state")
    return _kernelized.vjp(problem, featurizer, do, state, dstate)


register_method(
    "performer",
    lambda q, k, v, causal: performer_attention(q, k, v, causal=causal, num_features=256, rng=0),
    description="Performer FAVOR+: 256 orthogonal positive random features (seed 0), normalised",
)
