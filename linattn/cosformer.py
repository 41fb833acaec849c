r"""cosFormer (Qin et al., 2022): ReLU features with a cosine re-weighting by distance.

.. math::

    o_i = \frac{\sum_j \mathrm{relu}(q_i)\cdot\mathrm{relu}(k_j)\,
                 \cos\!\big(\tfrac{\pi}{2}\tfrac{i-j}{M}\big)\, v_j}
               {\sum_j \mathrm{relu}(q_i)\cdot\mathrm{relu}(k_j)\,
                 \cos\!\big(\tfrac{\pi}{2}\tfrac{i-j}{M}\big) + \varepsilon}.

Because cos(θ_i − θ_j) = cos θ_i cos θ_j + sin θ_i sin θ_j with θ_i = πi/(2M), the
re-weighting is a feature map, [x cos θ_i, x sin θ_i]
(:func:`linattn.feature_maps.cosformer_features`), and the method is linear attention on
it — causal, chunked, with a state, like the others; but the features depend on the
position, so decoding must know M in advance.
"""

from __future__ import annotations

from typing import Any

from linattn import _checks, _kernelized
from linattn import feature_maps as fmaps
from linattn.compare import register_method

__all__ = ["cosformer_attention", "cosformer_attention_vjp"]


def _featurizer(max_len: int, start: int) -> _kernelized.Featurizer:
    def phi(x: Any, pos: Any) -> Any:
        return fmaps.cosformer_features(fmaps.relu(x), pos + start, max_len)

    def phi_vjp(x: Any, pos: Any, d: Any) -> Any:
        return fmaps.relu_vjp(x, fmaps.cosformer_features_vjp(fmaps.relu(x), d, pos + start, max_len))

    return _kernelized.Featurizer(query=phi, key=phi, query_vjp=phi_vjp, key_vjp=phi_vjp)


def _setup(q, k, v, *, max_len, start_position, eps, causal, form, chunk_size, layout, cu_seqlens, backend,
           initial_state):
    options = _kernelized.check_options(causal=causal, normalize=True, eps=eps, scale=None, form=form,
                                        chunk_size=chunk_size, default_scale=1.0)
    problem = _kernelized.prepare(q, k, v, layout=layout, cu_seqlens=cu_seqlens, backend=backend, options=options)
    start = _checks.check_nonnegative_int("start_position", start_position)
    if start and not causal:
        raise ValueError("start_position needs causal=True: it places a continued sequence after its state")
    longest = max((max(r.stop - r.start, c.stop - c.start) for r, c in problem.segments()), default=0)
    if max_len is None:
        max_len = max(start + longest, 1)
    max_len = _checks.check_positive_int("max_len", max_len)
    if start + longest > max_len:
        raise ValueError(f"max_len must be >= the last position start_position + length = {start} + {longest}, "
                         f"got max_len={max_len}")
    state = _kernelized.check_state(problem, initial_state, 2 * problem.shapes.key_dim)
    return problem, _featurizer(max_len, start), state, 2 * problem.shapes.key_dim


def cosformer_attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    max_len: int | None = None,
    start_position: int = 0,
    eps: float = 1e-6,
    causal: bool = False,
    form: str = "chunked",
    chunk_size: int = 64,
    initial_state: Any = None,
    output_final_state: bool = False,
    layout: str = "bthd",
    cu_seqlens: Any = None,
    backend: str | None = None,
) -> Any:
    r"""CosFormer attention: relu features re-weighted by cos(π/2·(i − j)/M).

    .. math::

        o_i = \frac{\sum_{j} w_{ij}\, v_j}{\sum_{j} w_{ij} + \varepsilon}, \qquad
        w_{ij} = \mathrm{relu}(q_i)\cdot\mathrm{relu}(k_j)\,\cos\!\Big(\frac{\pi}{2}\,\frac{i-j}{M}\Big),

    over j ≤ i when causal, else all j; i and j are positions within their sequence.

    Parameters
    ----------
    q, k, v : array
        (B, T, Hq, Dk), (B, S, Hkv, Dk), (B, S, Hkv, Dv) (``layout="bthd"``).
    max_len : int, optional
        M. Default: the sequence length (max(T, S); under ``cu_seqlens`` the longest
        sequence; plus ``start_position``), as the official implementation, which uses the
        (padded) length of the batch. Every |i − j| ≤ M keeps the weights non-negative.
        A sequence split across calls, or decoded, must fix M in advance.
    start_position : int, default 0
        Position of the first query and key (causal only): a sequence continued from
        ``initial_state`` starts where the state's sequence stopped, e.g. state passing
        is ``run(x2, initial_state=final(run(x1)), start_position=len(x1))`` with one M.
    eps : float, default 1e-6
        Added to the normaliser. (The official code clamps it from below at eps instead;
        the two differ only where the normaliser is < eps.)
    causal, form, chunk_size, initial_state, output_final_state, layout, cu_seqlens, backend
        As in :func:`linattn.linear_attention`; states have m = 2·Dk features, and a
        state passed on carries positions: continue a sequence with the positions it
        would have had (see :mod:`linattn.decoding`).

    Returns
    -------
    o : array, shape (B, T, Hq, Dv)
    final_state : (array, array)
        With ``output_final_state=True``.

    Raises
    ------
    ValueError
        max_len < 1 or shorter than the sequence, and the errors of
        :func:`linattn.linear_attention`.

    References
    ----------
    Z. Qin et al. "cosFormer: Rethinking Softmax in Attention." ICLR 2022.

    Examples
    --------
    >>> import numpy as np
    >>> import linattn
    >>> q, k, v = (np.random.default_rng(0).standard_normal((1, 7, 2, 4)) for _ in range(3))
    >>> o = linattn.cosformer_attention(q, k, v, causal=True, chunk_size=3)
    >>> bool(np.allclose(o, linattn.cosformer_attention(q, k, v, causal=True, form="parallel")))
    True
    """
    problem, featurizer, state, _ = _setup(
        q, k, v, max_len=max_len, start_position=start_position, eps=eps, causal=causal, form=form,
        chunk_size=chunk_size, layout=layout, cu_seqlens=cu_seqlens, backend=backend, initial_state=initial_state,
    )
    return _kernelized.forward(problem, featurizer, state, output_final_state)


def cosformer_attention_vjp(
    q: Any,
    k: Any,
    v: Any,
    do: Any,
    *,
    max_len: int | None = None,
    start_position: int = 0,
    eps: float = 1e-6,
    causal: bool = False,
    form: str = "chunked",
    chunk_size: int = 64,
    initial_state: Any = None,
    dfinal_state: Any = None,
    layout: str = "bthd",
    cu_seqlens: Any = None,
    backend: str | None = None,
) -> tuple[Any, ...]:
    r"""Compute the gradients of :func:`cosformer_attention` w.r.t. q, k, v (and the initial state).

    The chain rule through the scan's VJP, the position features and the relu
    (whose derivative is taken as 0 at 0).

    Parameters
    ----------
    q, k, v, max_len, start_position, eps, causal, form, chunk_size, initial_state, layout, cu_seqlens, backend
        As in :func:`cosformer_attention`.
    do : array, shape (B, T, Hq, Dv)
        Cotangent of the output.
    dfinal_state : (array, array), optional
        Cotangent of the final state.

    Returns
    -------
    dq, dk, dv : array
    dinitial_state : (array, array)
        Only when ``initial_state`` is given.

    Examples
    --------
    >>> import numpy as np
    >>> import linattn
    >>> q, k, v, do = (np.random.default_rng(1).standard_normal((1, 5, 1, 4)) for _ in range(4))
    >>> [g.shape for g in linattn.cosformer_attention_vjp(q, k, v, do, causal=True)]
    [(1, 5, 1, 4), (1, 5, 1, 4), (1, 5, 1, 4)]
    """
    problem, featurizer, state, m = _setup(
        q, k, v, max_len=max_len, start_position=start_position, eps=eps, causal=causal, form=form,
        chunk_size=chunk_size, layout=layout, cu_seqlens=cu_seqlens, backend=backend, initial_state=initial_state,
    )
    dstate = _kernelized.check_state(problem, dfinal_state, m, name="dfinal_state")
    return _kernelized.vjp(problem, featurizer, do, state, dstate)


register_method(
    "cosformer",
    lambda q, k, v, causal: cosformer_attention(q, k, v, causal=causal),
    description="cosFormer: relu features with cos(pi/2 (i-j)/M) re-weighting, M = T",
)
