r"""Decoding: a state per method and a :func:`step` that feeds it the next token(s).

Autoregressive generation produces a sequence a token at a time. Every causal method has
a state that summarises the past, and

.. code-block:: python

    o, state = step(state, q, k, v)

takes n new tokens — q of shape (B, n, Hq, Dk), k and v of shape (B, n, Hkv, Dk|Dv)
(``layout="bthd"``; n = 1 for plain decoding, a few for speculative decoding, the whole
prompt for a prefill) — and returns their outputs, equal to rounding to the last n rows
of the method's causal forward on the whole sequence, and the state after them.

=============== ========================================== ============================
state           holds                                      memory per (batch, kv head)
=============== ========================================== ============================
LinearState     S = Σ φ(k_j) v_jᵀ, z = Σ φ(k_j)            O(m·Dv), constant
PerformerState  the same, W, and the key stabiliser c      O(m·Dv), constant
CosformerState  the same and the position counter          O(Dk·Dv), constant
HybridState     a ring buffer of the last w keys/values     O(w·D + m·Dv), constant
                (local heads), a LinearState (global ones)
SoftmaxState    every key and value so far (a KV cache)    O(t·D), growing
=============== ========================================== ============================

**Functional.** :func:`step` never writes into the state it is given (nor into any of
its arrays): it returns a new state. A state can therefore be branched — stepped twice
with different tokens (beam search, speculative decoding, sampling several
continuations) — and each branch is exactly the sequence it would have been on its own.
States are frozen dataclasses holding arrays of the caller's library (NumPy, CuPy, any
array-API library), in float32 or float64 (half-precision tokens are computed in
float32, as everywhere in linattn), so they can also be compared with a kernel's.

**Prefill.** A step with the whole prompt is a prefill: it returns the prompt's outputs
and the state after it. The kernelized states can also start from the final state of
the method's causal forward (``from_final_state``): a prompt run by
:func:`linattn.linear_attention`, :func:`linattn.performer_attention` or
:func:`linattn.cosformer_attention` with ``output_final_state=True`` is continued by
decoding, and their ``final_state`` is in the forward's own form, for its
``initial_state``.

Examples
--------
>>> import numpy as np
>>> import linattn
>>> from linattn.decoding import init_state, step
>>> rng = np.random.default_rng(0)
>>> q, k, v = (rng.standard_normal((1, 6, 2, 4)) for _ in range(3))
>>> state = init_state("linear", batch=1, kv_heads=2, key_dim=4, value_dim=4)
>>> outputs = []
>>> for t in range(6):
...     o, state = step(state, q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1])
...     outputs.append(o)
>>> bool(np.allclose(np.concatenate(outputs, axis=1), linattn.linear_attention(q, k, v, causal=True)))
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import array_api_compat
import numpy as np

from linattn import _checks, _kernelized, favor
from linattn import feature_maps as fmaps
from linattn._problem import compute_dtype, from_grouped, to_grouped
from linattn.feature_maps import FeatureMap, get_feature_map
from linattn.hybrid import split_heads
from linattn.scan import causal_scan
from linattn.softmax import softmax_attention

__all__ = [
    "METHODS",
    "CosformerState",
    "HybridState",
    "LinearState",
    "PerformerState",
    "SoftmaxState",
    "available_methods",
    "init_state",
    "performer_key_shift",
    "register_state",
    "step",
]

# Longest block the scan of one step runs as a single chunk; a longer block (a prefill)
# is chunked, so that its cost stays linear in n.
_STEP_CHUNK = 64

KEY_STABILIZERS = ("running", "fixed")


# ---------------------------------------------------------------------------------------
# Shared checks and layout
# ---------------------------------------------------------------------------------------


def _allocator(xp: Any, dtype: Any, device: Any) -> tuple[Any, Any, Any]:
    """Return (namespace, state dtype, device) for a new state: float32 for half precision."""
    module = np if xp is None else xp
    probe = module.zeros((0,)) if device is None else module.zeros((0,), device=device)
    ns = array_api_compat.array_namespace(probe)
    dtype = ns.float64 if dtype is None else dtype
    try:
        floating = ns.isdtype(dtype, "real floating")
    except (TypeError, ValueError):
        floating = False
    if not floating:
        raise TypeError(f"dtype must be a real floating dtype (float16, float32, float64), got {dtype!r}")
    return ns, compute_dtype(ns, dtype), array_api_compat.device(probe)


def _sizes(**sizes: Any) -> dict[str, int]:
    return {name: _checks.check_positive_int(name, value) for name, value in sizes.items()}


@dataclass(frozen=True)
class _Tokens:
    """The n new tokens of one step, checked against a state, in the state's dtype."""

    xp: Any
    shapes: _checks.AttentionShapes
    input_dtype: Any
    layout: str
    q: Any  # (B, n, Hq, Dk) after the layout conversion (bthd)
    k: Any
    v: Any

    @property
    def n(self) -> int:
        return self.shapes.q_len

    def grouped(self) -> tuple[Any, Any, Any]:
        """The tokens grouped by key/value head: q (B, Hkv, G, n, Dk), k and v (B, Hkv, 1, n, D)."""
        return tuple(to_grouped(self.xp, x, "bthd", self.shapes.kv_heads) for x in (self.q, self.k, self.v))

    def output(self, o: Any) -> Any:
        """(B, n, Hq, Dv) in the state's dtype -> the caller's layout and dtype."""
        if self.layout == "bhtd":
            o = self.xp.permute_dims(o, (0, 2, 1, 3))
        return self.xp.astype(o, self.input_dtype)

    def grouped_output(self, o5: Any) -> Any:
        return self.output(from_grouped(self.xp, o5, "bthd"))

    def empty_output(self) -> Any:
        s = self.shapes
        o = self.xp.zeros((s.batch, 0, s.q_heads, s.value_dim), dtype=self.q.dtype,
                          device=array_api_compat.device(self.q))
        return self.output(o)


def _tokens(q: Any, k: Any, v: Any, layout: str, *, like: Any, batch: int, kv_heads: int, value_dim: int,
            key_dim: int | None = None) -> _Tokens:
    """Check the new tokens against the state (``like`` is one of its arrays) and convert them."""
    layout = _checks.check_layout(layout)
    xp = _checks.namespace_of(q=q, k=k, v=v)
    shapes = _checks.check_qkv(q, k, v, layout, xp)
    _checks.namespace_of(q=q, state=like)
    if shapes.q_len != shapes.kv_len:
        raise ValueError(f"q, k and v must hold the same number n of new tokens, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)} (layout={layout!r})")
    if shapes.batch != batch:
        raise ValueError(f"q, k and v have batch size {shapes.batch}, but the state holds batch={batch}")
    if shapes.kv_heads != kv_heads:
        raise ValueError(f"k and v have {shapes.kv_heads} key/value heads, but the state holds kv_heads={kv_heads} "
                         f"(k {tuple(k.shape)}, layout={layout!r})")
    if shapes.value_dim != value_dim:
        raise ValueError(f"v has head dim Dv={shapes.value_dim}, but the state holds value_dim={value_dim} "
                         f"(v {tuple(v.shape)}, layout={layout!r})")
    if key_dim is not None and shapes.key_dim != key_dim:
        raise ValueError(f"q and k have head dim Dk={shapes.key_dim}, but the state holds key_dim={key_dim} "
                         f"(q {tuple(q.shape)}, layout={layout!r})")
    dtype = compute_dtype(xp, q.dtype)
    if dtype != like.dtype:
        raise TypeError(f"q, k and v of dtype {q.dtype} compute in {dtype}, but the state holds {like.dtype}; "
                        f"create the state with dtype={q.dtype}")
    input_dtype = q.dtype
    if layout == "bhtd":
        q, k, v = (xp.permute_dims(x, (0, 2, 1, 3)) for x in (q, k, v))
    q, k, v = (xp.astype(x, dtype) for x in (q, k, v))
    return _Tokens(xp, shapes, input_dtype, layout, q, k, v)


def _check_state_arrays(name: str, S: Any, z: Any, normalize: bool) -> Any:
    """Validate a kernelized final state (S, or the pair (S, z)) and return its namespace."""
    xp = _checks.namespace_of(**{f"{name}[0] (S)" if normalize else name: S, f"{name}[1] (z)": z})
    label = f"{name}[0] (S)" if normalize else name
    _checks.require_floating(label, S, xp)
    if S.ndim != 4:
        raise ValueError(f"{label} must have shape (B, Hkv, m, Dv), got {tuple(S.shape)}")
    if compute_dtype(xp, S.dtype) != S.dtype:
        raise TypeError(f"{label} must be float32 or float64 (states are kept in at least float32), got {S.dtype}")
    if normalize:
        if tuple(z.shape) != tuple(S.shape[:3]):
            raise ValueError(f"{name}[1] (z) must have shape (B, Hkv, m) = {tuple(S.shape[:3])} to match S, "
                             f"got {tuple(z.shape)}")
        if z.dtype != S.dtype:
            raise TypeError(f"{name}[1] (z) must have S's dtype {S.dtype}, got {z.dtype}")
    return xp


def _split_final_state(final_state: Any, normalize: bool) -> tuple[Any, Any]:
    if normalize:
        if not isinstance(final_state, tuple | list) or len(final_state) != 2:
            raise ValueError("final_state must be a pair (S, z) when normalize=True, S of shape (B, Hkv, m, Dv) "
                             f"and z of shape (B, Hkv, m), got {type(final_state).__name__}")
        S, z = final_state
        if z is None:
            raise TypeError("final_state[1] (z) must be an array, got None")
    else:
        if isinstance(final_state, tuple | list):
            raise ValueError("final_state must be one array S (B, Hkv, m, Dv) when normalize=False, got a "
                             f"{type(final_state).__name__} of {len(final_state)}")
        S, z = final_state, None
    _check_state_arrays("final_state", S, z, normalize)
    return S, z


# ---------------------------------------------------------------------------------------
# The scan step shared by the kernelized states
# ---------------------------------------------------------------------------------------


def _scan_step(xp: Any, S: Any, z: Any | None, fq: Any, fk: Any, v: Any, eps: float) -> tuple[Any, Any, Any]:
    r"""Advance (S, z) over n tokens and read each one out (grouped layout).

    S_t = S_{t−1} + φ(k_t) v_tᵀ, z_t = z_{t−1} + φ(k_t), o_t = φ(q_t)ᵀS_t / (φ(q_t)·z_t + eps)
    (o_t = φ(q_t)ᵀS_t when z is None); fq (B, Hkv, G, n, m) already scaled, fk
    (B, Hkv, 1, n, m), v (B, Hkv, 1, n, Dv), S (B, Hkv, m, Dv), z (B, Hkv, m). As in
    :mod:`linattn._kernelized`, z travels as an extra column of S with a column of ones on v.
    """
    state = S
    if z is not None:
        state = xp.concat([S, xp.expand_dims(z, axis=-1)], axis=-1)
        ones = xp.ones((*v.shape[:-1], 1), dtype=v.dtype, device=array_api_compat.device(v))
        v = xp.concat([v, ones], axis=-1)
    n = int(fq.shape[-2])
    raw, final = causal_scan(fq, fk, v, initial_state=xp.expand_dims(state, axis=2), form="chunked",
                             chunk_size=min(n, _STEP_CHUNK))
    final = final[:, :, 0, ...]
    if z is None:
        return raw, final, None
    return raw[..., :-1] / (raw[..., -1:] + eps), final[..., :-1], final[..., -1]


def _zeros(xp: Any, shape: tuple[int, ...], dtype: Any, device: Any) -> Any:
    return xp.zeros(shape, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------
# Linear Transformer
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LinearState:
    r"""Decoding state of :func:`linattn.linear_attention` (causal): S and z.

    .. math::

        S_t = S_{t-1} + \phi(k_t) v_t^\top, \qquad z_t = z_{t-1} + \phi(k_t), \qquad
        o_t = \frac{s\,\phi(q_t)^\top S_t}{s\,\phi(q_t)^\top z_t + \varepsilon}

    (o_t = s·φ(q_t)ᵀS_t with ``normalize=False``), per batch element and key/value head;
    the query heads of a GQA group share it.

    Attributes
    ----------
    S : array, shape (B, Hkv, m, Dv)
        Σ_j φ(k_j) v_jᵀ over the tokens so far; m = the feature map's output dim.
    z : array, shape (B, Hkv, m), or None
        Σ_j φ(k_j); None with ``normalize=False``.
    feature_map : FeatureMap
        φ.
    normalize : bool
    eps : float
    scale : float
        s.

    Notes
    -----
    ``final_state`` is S, or (S, z) when normalised: exactly the ``final_state`` of
    ``linear_attention(..., causal=True, output_final_state=True)`` and its
    ``initial_state``, so a state moves freely between the forward and decoding.

    Examples
    --------
    >>> import numpy as np
    >>> import linattn
    >>> from linattn.decoding import LinearState, step
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 7, 4, 3)) for _ in range(3))
    >>> k, v = k[:, :, :2], v[:, :, :2]  # GQA: 4 query heads, 2 key/value heads
    >>> prompt = linattn.linear_attention(q[:, :5], k[:, :5], v[:, :5], causal=True, output_final_state=True)
    >>> state = LinearState.from_final_state(prompt[1])
    >>> o, state = step(state, q[:, 5:], k[:, 5:], v[:, 5:])  # two tokens at once
    >>> bool(np.allclose(o, linattn.linear_attention(q, k, v, causal=True)[:, 5:]))
    True
    """

    S: Any
    z: Any
    feature_map: FeatureMap
    normalize: bool
    eps: float
    scale: float

    @classmethod
    def initial(cls, *, batch: int, kv_heads: int, key_dim: int, value_dim: int, dtype: Any = None, xp: Any = None,
                device: Any = None, feature_map: str | FeatureMap = "elu+1", normalize: bool = True,
                eps: float = 1e-6, scale: float | None = None) -> LinearState:
        """The state before any token: S = 0, z = 0.

        Parameters
        ----------
        batch, kv_heads, key_dim, value_dim : int
            B, Hkv, Dk, Dv of the tokens to come.
        dtype : dtype, optional
            The tokens' dtype (default float64); the state is float32 for half precision.
        xp : module, optional
            The array library (``numpy`` by default; ``cupy``, ``array_api_strict``, ...).
        device : optional
            Where the state's arrays live (the library's default when None).
        feature_map, normalize, eps, scale
            As in :func:`linattn.linear_attention` (scale default 1).

        Returns
        -------
        LinearState
        """
        fm, options = _linear_options(feature_map, normalize, eps, scale)
        sizes = _sizes(batch=batch, kv_heads=kv_heads, key_dim=key_dim, value_dim=value_dim)
        xp, dtype, device = _allocator(xp, dtype, device)
        m = fm.output_dim(sizes["key_dim"])
        S = _zeros(xp, (sizes["batch"], sizes["kv_heads"], m, sizes["value_dim"]), dtype, device)
        z = _zeros(xp, S.shape[:3], dtype, device) if normalize else None
        return cls(S, z, fm, options.normalize, options.eps, options.scale)

    @classmethod
    def from_final_state(cls, final_state: Any, *, feature_map: str | FeatureMap = "elu+1", normalize: bool = True,
                         eps: float = 1e-6, scale: float | None = None) -> LinearState:
        """Continue a sequence from the ``final_state`` of :func:`linattn.linear_attention`.

        Parameters
        ----------
        final_state : array or (array, array)
            S (B, Hkv, m, Dv), or (S, z (B, Hkv, m)) when normalised, float32 or float64;
            used as is (not copied: nothing ever writes into it).
        feature_map, normalize, eps, scale
            The options of the forward that produced it.

        Returns
        -------
        LinearState
        """
        fm, options = _linear_options(feature_map, normalize, eps, scale)
        S, z = _split_final_state(final_state, normalize)
        return cls(S, z, fm, options.normalize, options.eps, options.scale)

    @property
    def final_state(self) -> Any:
        """S, or (S, z) when normalised: the form of ``linear_attention``'s states."""
        return self.S if self.z is None else (self.S, self.z)

    def _step(self, q: Any, k: Any, v: Any, layout: str) -> tuple[Any, LinearState]:
        B, Hkv, m, Dv = (int(n) for n in self.S.shape)
        tokens = _tokens(q, k, v, layout, like=self.S, batch=B, kv_heads=Hkv, value_dim=Dv)
        dk = tokens.shapes.key_dim
        if self.feature_map.output_dim(dk) != m:
            raise ValueError(f"q and k have head dim Dk={dk}, which feature map {self.feature_map.name!r} maps to "
                             f"{self.feature_map.output_dim(dk)} features, but the state has m={m}")
        if tokens.n == 0:
            return tokens.empty_output(), self
        q5, k5, v5 = tokens.grouped()
        fq = self.feature_map.forward(q5) * self.scale
        fk = self.feature_map.forward(k5)
        o, S, z = _scan_step(tokens.xp, self.S, self.z, fq, fk, v5, self.eps)
        return tokens.grouped_output(o), replace(self, S=S, z=z)


def _linear_options(feature_map: Any, normalize: Any, eps: Any, scale: Any) -> tuple[FeatureMap, Any]:
    if not isinstance(feature_map, str | FeatureMap):
        raise TypeError(f"feature_map must be a name or a linattn.feature_maps.FeatureMap, got {feature_map!r}")
    fm = get_feature_map(feature_map)
    options = _kernelized.check_options(causal=True, normalize=normalize, eps=eps, scale=scale, form="chunked",
                                        chunk_size=1, default_scale=1.0)
    return fm, options


# ---------------------------------------------------------------------------------------
# Performer
# ---------------------------------------------------------------------------------------


def _projection_like(projection: Any, like: Any, key_dim: int | None, dtype: Any) -> Any:
    """W (r, Dk) in the library, device and dtype of ``like`` (our own draws are NumPy: move them)."""
    _checks.require_array("projection", projection)
    xp = array_api_compat.array_namespace(like)
    if isinstance(projection, np.ndarray) and not array_api_compat.is_numpy_namespace(xp):
        projection = xp.asarray(projection, device=array_api_compat.device(like))
    _checks.namespace_of(projection=projection, state=like)
    _checks.require_floating("projection", projection, xp)
    if projection.ndim != 2 or int(projection.shape[0]) < 1 or (
            key_dim is not None and int(projection.shape[1]) != key_dim):
        width = "Dk" if key_dim is None else f"Dk={key_dim}"
        raise ValueError(f"projection must have shape (r, Dk) with r >= 1 and {width}, got {tuple(projection.shape)}")
    return xp.astype(projection, dtype)


def _kernel_scale(scale: Any, key_dim: int) -> float:
    scale = _checks.check_scale(scale, key_dim)
    if scale <= 0:
        raise ValueError(f"scale must be positive (the features use sqrt(scale)), got {scale!r}")
    return scale


def performer_key_shift(k: Any, projection: Any, *, scale: float | None = None, layout: str = "bthd") -> Any:
    r"""The key stabiliser c that non-causal :func:`linattn.performer_attention` uses over the keys k.

    .. math::

        c_{b,h} = \max_{t,\,i}\; w_i \cdot k'_{b,t,h}, \qquad k' = k\,\text{scale}^{1/2},

    the maximum over every key of the sequence and every feature, one per batch element
    and key/value head (``favor_positive(..., role="key", stabilize=True)``), which the
    non-causal forward subtracts from every key's exponent (the causal forward uses
    c = 0, so that future keys cannot reach past outputs). Decoding with
    ``PerformerState(..., key_stabilizer="fixed", key_shift=c)`` computes the features
    of a forward that used the constant c.

    Parameters
    ----------
    k : array, shape (B, T, Hkv, Dk)
        The keys the forward saw (``(B, Hkv, T, Dk)`` with ``layout="bhtd"``), T >= 1.
    projection : array, shape (r, Dk)
        W.
    scale : float, optional
        The kernel's softmax scale; default 1/sqrt(Dk).
    layout : {"bthd", "bhtd"}, default "bthd"

    Returns
    -------
    array, shape (B, Hkv)
        In k's compute dtype (float32 for half precision).

    Raises
    ------
    TypeError, ValueError
        k not a floating 4-D array with T >= 1, a projection whose width is not Dk.

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.decoding import performer_key_shift
    >>> from linattn.feature_maps import random_projection
    >>> w = random_projection(8, 4, rng=0)
    >>> k = np.random.default_rng(1).standard_normal((2, 5, 3, 4))
    >>> c = performer_key_shift(k, w)
    >>> c.shape
    (2, 3)
    >>> bool(np.isclose(c[1, 2], (k[1, :, 2] / 4**0.25 @ w.T).max()))
    True
    """
    layout = _checks.check_layout(layout)
    _checks.require_array("k", k)
    xp = array_api_compat.array_namespace(k)
    _checks.require_floating("k", k, xp)
    if k.ndim != 4 or (int(k.shape[1]) if layout == "bthd" else int(k.shape[2])) < 1:
        raise ValueError(f"k must be 4-D {'(B, T, Hkv, Dk)' if layout == 'bthd' else '(B, Hkv, T, Dk)'} with "
                         f"T >= 1 for layout={layout!r}, got shape {tuple(k.shape)}")
    dtype = compute_dtype(xp, k.dtype)
    dk = int(k.shape[-1])
    k = xp.astype(k, dtype)
    W = _projection_like(projection, k, dk, dtype)
    heads = int(k.shape[2] if layout == "bthd" else k.shape[1])
    k5 = to_grouped(xp, k, layout, heads)  # (B, Hkv, 1, T, Dk)
    u = xp.matmul(k5 * math.sqrt(_kernel_scale(scale, dk)), xp.matrix_transpose(W))
    return xp.max(u, axis=(-2, -1))[:, :, 0]


@dataclass(frozen=True, eq=False)
class PerformerState:
    r"""Decoding state of :func:`linattn.performer_attention` (causal): S, z, W and the key constant c.

    .. math::

        S_t = S_{t-1} + \phi(k_t) v_t^\top, \quad z_t = z_{t-1} + \phi(k_t), \quad
        o_t = \frac{\phi(q_t)^\top S_t}{\phi(q_t)^\top z_t + \varepsilon},

    with the FAVOR+ features φ of the fixed projection W. Positive features carry the
    stabilisers of :func:`linattn.feature_maps.favor_positive`: a per-query constant
    (computable from q_t alone: the same in decoding as in the forward) and a key
    constant c shared by all keys. The causal forward uses c = 0 (its states are on the
    unstabilised scale, and no future key can reach a past output); the non-causal
    forward takes c as the max of w_i·k'_t over the whole sequence. With
    ``stabilize=True`` decoding keeps the state as e^{−c}·(S, z), c chosen by
    ``key_stabilizer``:

    - ``"running"`` (default): c_t = max(c_{t−1}, max_i w_i·k'_t), the maximum over the
      keys seen so far. When it grows, the state is rescaled, S ← e^{c_{t−1} − c_t} S
      (as online softmax rescales its running sum), so every feature stays ≤ 1 as in the
      forward and nothing overflows, however long the sequence.
    - ``"fixed"``: c = ``key_shift`` for every key, never rescaled. A key with
      w_i·k'_t − |k'_t|²/2 − c beyond the exp range (709 in float64, 88.7 in float32)
      overflows; c = 0 is the unstabilised estimator (features ≤ e^{|w_i|²/2}).

    **When decoding equals the causal forward.** With ``feature_eps = eps = 0`` (the
    defaults) a constant shared by the keys multiplies numerator and denominator alike
    and cancels: decoding with either key stabiliser equals
    ``performer_attention(..., causal=True)`` to rounding, with or without states (and
    up to underflow: a key e^{745} below one constant and not the other is 0 in one and
    not the other). With ``feature_eps > 0`` or ``eps > 0`` the constant no longer
    cancels, and the output depends on which c is used: the causal forward (c = 0) is
    reproduced exactly by ``key_stabilizer="fixed", key_shift=0``. ``"running"`` refuses
    ``feature_eps > 0`` (rescaling the state would rescale the added eps too). ``stabilize=False`` (no constants) and
    ``kind="trig"`` (no stabiliser) equal the forward with the same options to rounding
    for any eps. As in the forward, ``stabilize=True`` needs ``normalize=True``.

    Attributes
    ----------
    S : array, shape (B, Hkv, m, Dv)
        e^{−c} Σ_j φ(k_j) v_jᵀ (c = 0 without the key stabiliser).
    z : array, shape (B, Hkv, m), or None
        e^{−c} Σ_j φ(k_j); None with ``normalize=False``.
    key_shift : array, shape (B, Hkv), or None
        c (−inf before the first key in ``"running"`` mode); None when unused.
    projection : array, shape (r, Dk)
        W, in the state's library and dtype; m = r (positive) or 2r (trig).
    kind, stabilize, key_stabilizer, feature_eps, scale, normalize, eps
        The options (``scale`` resolved: the kernel's softmax scale).

    Examples
    --------
    >>> import numpy as np
    >>> import linattn
    >>> from linattn.decoding import PerformerState, step
    >>> from linattn.feature_maps import random_projection
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 8, 2, 4)) for _ in range(3))
    >>> w = random_projection(16, 4, rng=1)
    >>> full = linattn.performer_attention(q, k, v, projection=w, causal=True)
    >>> state = PerformerState.initial(batch=1, kv_heads=2, key_dim=4, value_dim=4, projection=w)
    >>> o, state = step(state, q[:, :3], k[:, :3], v[:, :3])  # prefill 3, then one by one
    >>> outs = [o]
    >>> for t in range(3, 8):
    ...     o, state = step(state, q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1])
    ...     outs.append(o)
    >>> bool(np.allclose(np.concatenate(outs, axis=1), full))
    True

    Decoding can continue the forward's own final state (on the unstabilised scale, c = 0):

    >>> _, final = linattn.performer_attention(q[:, :5], k[:, :5], v[:, :5], projection=w, causal=True,
    ...                                        output_final_state=True)
    >>> o, state = step(PerformerState.from_final_state(final, projection=w), q[:, 5:], k[:, 5:], v[:, 5:])
    >>> bool(np.allclose(o, full[:, 5:]))
    True

    and the forward can continue decoding's (``final_state`` undoes the e^{−c}):

    >>> o = linattn.performer_attention(q[:, 5:], k[:, 5:], v[:, 5:], projection=w, causal=True,
    ...                                 initial_state=PerformerState.from_final_state(final, projection=w).final_state)
    >>> bool(np.allclose(o, full[:, 5:]))
    True
    """

    S: Any
    z: Any
    key_shift: Any
    projection: Any
    kind: str
    stabilize: bool
    key_stabilizer: str | None
    feature_eps: float
    scale: float
    normalize: bool
    eps: float

    @classmethod
    def initial(cls, *, batch: int, kv_heads: int, key_dim: int, value_dim: int, projection: Any, dtype: Any = None,
                xp: Any = None, device: Any = None, kind: str = "positive", stabilize: bool = True,
                key_stabilizer: str = "running", key_shift: Any = None, feature_eps: float = 0.0,
                scale: float | None = None, normalize: bool = True, eps: float = 0.0) -> PerformerState:
        """The state before any token.

        Parameters
        ----------
        batch, kv_heads, key_dim, value_dim, dtype, xp, device
            As in :meth:`LinearState.initial`.
        projection : array, shape (r, Dk)
            W, e.g. ``linattn.feature_maps.random_projection(r, Dk, rng=seed)`` — the draw
            ``performer_attention(num_features=r, rng=seed)`` makes. Fixed for the
            whole sequence.
        kind, stabilize, feature_eps, scale, normalize, eps
            As in :func:`linattn.performer_attention`.
        key_stabilizer : {"running", "fixed"}, default "running"
            How the key constant c is chosen (see the class notes); positive features
            with ``stabilize=True`` only.
        key_shift : float or array of shape (B, Hkv), optional
            c: required with ``"fixed"``; with ``"running"`` the value to start from
            (default −inf: the first keys set it).

        Returns
        -------
        PerformerState
        """
        sizes = _sizes(batch=batch, kv_heads=kv_heads, key_dim=key_dim, value_dim=value_dim)
        xp, dtype, device = _allocator(xp, dtype, device)
        like = _zeros(xp, (0,), dtype, device)
        W = _projection_like(projection, like, sizes["key_dim"], dtype)
        m = int(W.shape[0]) * (2 if kind == "trig" else 1)
        S = _zeros(xp, (sizes["batch"], sizes["kv_heads"], m, sizes["value_dim"]), dtype, device)
        z = _zeros(xp, S.shape[:3], dtype, device) if normalize is True else None
        return cls._build(S, z, W, kind=kind, stabilize=stabilize, key_stabilizer=key_stabilizer,
                          key_shift=key_shift, feature_eps=feature_eps, scale=scale, normalize=normalize, eps=eps,
                          unset_shift=-math.inf)

    @classmethod
    def from_final_state(cls, final_state: Any, *, projection: Any, kind: str = "positive", stabilize: bool = True,
                         key_stabilizer: str = "running", key_shift: Any = None, feature_eps: float = 0.0,
                         scale: float | None = None, normalize: bool = True, eps: float = 0.0) -> PerformerState:
        """Continue a sequence from the ``final_state`` of :func:`linattn.performer_attention`.

        Parameters
        ----------
        final_state : array or (array, array)
            S (B, Hkv, m, Dv), or (S, z) when normalised.
        projection, kind, stabilize, feature_eps, scale, normalize, eps
            The forward's options and its W.
        key_stabilizer : {"running", "fixed"}, default "running"
        key_shift : float or array of shape (B, Hkv), optional
            The key constant c the state is scaled by, e^{−c}·(S, z) (positive features
            with ``stabilize=True``; ``"running"`` continues from it, ``"fixed"`` keeps
            it). Default 0: performer_attention's states are on the unstabilised scale.

        Returns
        -------
        PerformerState
        """
        S, z = _split_final_state(final_state, normalize is True)
        W = _projection_like(projection, S, None, S.dtype)
        return cls._build(S, z, W, kind=kind, stabilize=stabilize, key_stabilizer=key_stabilizer,
                          key_shift=key_shift, feature_eps=feature_eps, scale=scale, normalize=normalize, eps=eps,
                          unset_shift=0.0)

    @classmethod
    def _build(cls, S: Any, z: Any, W: Any, *, kind: Any, stabilize: Any, key_stabilizer: Any, key_shift: Any,
               feature_eps: Any, scale: Any, normalize: Any, eps: Any, unset_shift: float) -> PerformerState:
        from linattn.performer import KINDS

        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        _checks.check_bool("stabilize", stabilize)
        options = _kernelized.check_options(causal=True, normalize=normalize, eps=eps, scale=None, form="chunked",
                                            chunk_size=1, default_scale=1.0)
        if isinstance(feature_eps, bool) or not isinstance(feature_eps, int | float) or not (
                math.isfinite(feature_eps) and feature_eps >= 0):
            raise ValueError(f"feature_eps must be a finite number >= 0, got {feature_eps!r}")
        m = int(W.shape[0]) * (2 if kind == "trig" else 1)
        if int(S.shape[2]) != m:
            raise ValueError(f"final_state has m={int(S.shape[2])} features, but projection {tuple(W.shape)} with "
                             f"kind={kind!r} makes {m}")
        kernel_scale = _kernel_scale(scale, int(W.shape[1]))
        mode, shift = None, None
        if kind == "positive" and stabilize:
            if not options.normalize:  # as performer_attention
                raise ValueError("stabilize=True needs normalize=True: the stabiliser's constants cancel only "
                                 "between numerator and denominator; pass stabilize=False for unnormalised attention")
            if key_stabilizer not in KEY_STABILIZERS:
                raise ValueError(f"key_stabilizer must be one of {KEY_STABILIZERS}, got {key_stabilizer!r}")
            mode = key_stabilizer
            if mode == "running" and feature_eps > 0:
                raise ValueError("key_stabilizer='running' needs feature_eps=0: rescaling the state when the "
                                 "maximum grows would rescale the added feature_eps too; use "
                                 "key_stabilizer='fixed' with a key_shift")
            if key_shift is None and mode == "fixed" and unset_shift == -math.inf:
                raise ValueError("key_shift is required: key_stabilizer='fixed' needs the constant c")
            shift = _key_shift_array(unset_shift if key_shift is None else key_shift, S)
        elif key_shift is not None:
            raise ValueError("key_shift is only used by positive features with stabilize=True, got one with "
                             f"kind={kind!r}, stabilize={stabilize}")
        return cls(S, z, shift, W, kind, stabilize, mode, float(feature_eps), kernel_scale, options.normalize,
                   options.eps)

    @property
    def final_state(self) -> Any:
        """e^{c}·S, or e^{c}·(S, z) when normalised: performer_attention's states, on the unstabilised scale.

        (e^{c} overflows where c exceeds the exp range: such a state has no unstabilised form.)
        """
        if self.key_shift is None:
            return self.S if self.z is None else (self.S, self.z)
        xp = array_api_compat.array_namespace(self.S)
        scale = xp.exp(self.key_shift)  # c = −inf only before any key, where S = 0
        S = self.S * _expand_to(xp, scale, 4)
        return S if self.z is None else (S, self.z * _expand_to(xp, scale, 3))

    def _query_features(self, q5: Any) -> Any:
        if self.kind == "trig":
            return favor.favor_trig(q5, self.projection, scale=self.scale)
        return favor.favor_positive(q5, self.projection, role="query", stabilize=self.stabilize,
                                    eps=self.feature_eps, scale=self.scale)

    def _key_features(self, xp: Any, k5: Any) -> tuple[Any, Any]:
        """φ(k) for the block and the key constant after it (None when there is none)."""
        W = self.projection
        if self.kind == "trig":
            return favor.favor_trig(k5, W, scale=self.scale), None
        if not self.stabilize:
            return favor.favor_positive(k5, W, role="key", stabilize=False, eps=self.feature_eps,
                                        scale=self.scale), None
        # favor_positive shifts the block by its own maximum c_block; move it to c:
        # exp(a − c) = exp(a − c_block)·exp(c_block − c), with c_block − c <= 0 when running.
        u = xp.matmul(k5 * math.sqrt(self.scale), xp.matrix_transpose(W))
        c_block = xp.max(u, axis=(-2, -1))[:, :, 0]  # (B, Hkv)
        shift = xp.maximum(self.key_shift, c_block) if self.key_stabilizer == "running" else self.key_shift
        phi = favor.favor_positive(k5, W, role="key", stabilize=True, eps=0.0, scale=self.scale)
        phi = phi * _expand_to(xp, xp.exp(c_block - shift), 5)
        if self.feature_eps > 0:
            phi = phi + self.feature_eps / math.sqrt(int(W.shape[0]))
        return phi, shift

    def _step(self, q: Any, k: Any, v: Any, layout: str) -> tuple[Any, PerformerState]:
        B, Hkv, _, Dv = (int(n) for n in self.S.shape)
        tokens = _tokens(q, k, v, layout, like=self.S, batch=B, kv_heads=Hkv, value_dim=Dv,
                         key_dim=int(self.projection.shape[1]))
        if tokens.n == 0:
            return tokens.empty_output(), self
        xp = tokens.xp
        q5, k5, v5 = tokens.grouped()
        fk, shift = self._key_features(xp, k5)
        S, z = self.S, self.z
        if self.key_stabilizer == "running":  # the running maximum grew: rescale what the state holds
            decay = xp.exp(self.key_shift - shift)
            S = S * _expand_to(xp, decay, 4)
            z = None if z is None else z * _expand_to(xp, decay, 3)
        o, S, z = _scan_step(xp, S, z, self._query_features(q5), fk, v5, self.eps)
        return tokens.grouped_output(o), replace(self, S=S, z=z, key_shift=shift)


def _expand_to(xp: Any, x: Any, ndim: int) -> Any:
    """(B, Hkv) -> (B, Hkv, 1, ...) with ``ndim`` dims."""
    return xp.reshape(x, (*x.shape, *(1,) * (ndim - x.ndim)))


def _key_shift_array(key_shift: Any, S: Any) -> Any:
    """The key constant c as a (B, Hkv) array of the state's library and dtype."""
    xp = array_api_compat.array_namespace(S)
    shape = tuple(int(n) for n in S.shape[:2])
    device = array_api_compat.device(S)
    if isinstance(key_shift, int | float) and not isinstance(key_shift, bool):
        if key_shift == -math.inf:  # the running maximum before any key
            return xp.full(shape, -math.inf, dtype=S.dtype, device=device)
        if not math.isfinite(key_shift):
            raise ValueError(f"key_shift must be finite, got {key_shift!r}")
        return xp.full(shape, float(key_shift), dtype=S.dtype, device=device)
    _checks.require_array("key_shift", key_shift)
    _checks.namespace_of(key_shift=key_shift, state=S)
    _checks.require_floating("key_shift", key_shift, xp)
    if tuple(key_shift.shape) != shape:
        raise ValueError(f"key_shift must be a number or have shape (B, Hkv) = {shape}, got {tuple(key_shift.shape)}")
    return xp.astype(key_shift, S.dtype)


# ---------------------------------------------------------------------------------------
# cosFormer
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class CosformerState:
    r"""Decoding state of :func:`linattn.cosformer_attention` (causal): S, z and the position.

    With θ_t = πt/(2M) and φ(x_t) = [relu(x_t) cos θ_t, relu(x_t) sin θ_t]
    (:func:`linattn.feature_maps.cosformer_features`),

    .. math::

        S_t = S_{t-1} + \phi(k_t) v_t^\top, \quad z_t = z_{t-1} + \phi(k_t), \quad
        o_t = \frac{\phi(q_t)^\top S_t}{\phi(q_t)^\top z_t + \varepsilon}
            = \frac{\sum_{j \le t} \mathrm{relu}(q_t)\cdot\mathrm{relu}(k_j)
                     \cos\!\big(\frac{\pi}{2}\frac{t-j}{M}\big) v_j}{\cdots + \varepsilon}.

    The features depend on the position, so the state carries the number of tokens so
    far (a step's tokens sit at positions ``position .. position + n − 1``) and M, which
    must be fixed before the first token: the forward's default M is the sequence
    length, which decoding cannot know. Decoding equals
    ``cosformer_attention(..., causal=True, max_len=M)`` on the whole sequence; a step
    that would take the sequence past M tokens is an error, as the forward is.

    Attributes
    ----------
    S : array, shape (B, Hkv, 2·Dk, Dv)
    z : array, shape (B, Hkv, 2·Dk)
    position : int
        Tokens so far; the next token's position.
    max_len : int
        M.
    eps : float

    Examples
    --------
    >>> import numpy as np
    >>> import linattn
    >>> from linattn.decoding import CosformerState, step
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 6, 1, 4)) for _ in range(3))
    >>> full = linattn.cosformer_attention(q, k, v, causal=True, max_len=10)
    >>> _, final = linattn.cosformer_attention(q[:, :4], k[:, :4], v[:, :4], causal=True, max_len=10,
    ...                                        output_final_state=True)
    >>> state = CosformerState.from_final_state(final, max_len=10, position=4)
    >>> o, state = step(state, q[:, 4:], k[:, 4:], v[:, 4:])
    >>> bool(np.allclose(o, full[:, 4:])), state.position
    (True, 6)
    """

    S: Any
    z: Any
    position: int
    max_len: int
    eps: float

    @classmethod
    def initial(cls, *, batch: int, kv_heads: int, key_dim: int, value_dim: int, max_len: int, dtype: Any = None,
                xp: Any = None, device: Any = None, eps: float = 1e-6) -> CosformerState:
        """The state before any token (position 0).

        Parameters
        ----------
        batch, kv_heads, key_dim, value_dim, dtype, xp, device
            As in :meth:`LinearState.initial`.
        max_len : int
            M >= 1, the longest the sequence may grow (required).
        eps : float, default 1e-6
            As in :func:`linattn.cosformer_attention`.

        Returns
        -------
        CosformerState
        """
        sizes = _sizes(batch=batch, kv_heads=kv_heads, key_dim=key_dim, value_dim=value_dim)
        max_len, eps = _cosformer_options(max_len, eps)
        xp, dtype, device = _allocator(xp, dtype, device)
        S = _zeros(xp, (sizes["batch"], sizes["kv_heads"], 2 * sizes["key_dim"], sizes["value_dim"]), dtype, device)
        return cls(S, _zeros(xp, S.shape[:3], dtype, device), 0, max_len, eps)

    @classmethod
    def from_final_state(cls, final_state: Any, *, max_len: int, position: int, eps: float = 1e-6) -> CosformerState:
        """Continue a sequence from the ``final_state`` of :func:`linattn.cosformer_attention`.

        Parameters
        ----------
        final_state : (array, array)
            (S (B, Hkv, 2·Dk, Dv), z (B, Hkv, 2·Dk)), from a forward with the same ``max_len``.
        max_len : int
            M of that forward (pass it explicitly there: its default is the prompt length).
        position : int
            The prompt's length: the position of the next token.
        eps : float, default 1e-6

        Returns
        -------
        CosformerState
        """
        max_len, eps = _cosformer_options(max_len, eps)
        position = _checks.check_nonnegative_int("position", position)
        if position > max_len:
            raise ValueError(f"position must be <= max_len={max_len}, got position={position}")
        S, z = _split_final_state(final_state, True)
        if int(S.shape[2]) % 2:
            raise ValueError(f"final_state[0] (S) must have an even m = 2·Dk features, got m={int(S.shape[2])}")
        return cls(S, z, position, max_len, eps)

    @property
    def final_state(self) -> tuple[Any, Any]:
        """(S, z): the form of ``cosformer_attention``'s states."""
        return self.S, self.z

    def _step(self, q: Any, k: Any, v: Any, layout: str) -> tuple[Any, CosformerState]:
        B, Hkv, m, Dv = (int(n) for n in self.S.shape)
        tokens = _tokens(q, k, v, layout, like=self.S, batch=B, kv_heads=Hkv, value_dim=Dv, key_dim=m // 2)
        n, p = tokens.n, self.position
        if p + n > self.max_len:
            raise ValueError(f"max_len={self.max_len} exceeded: the state is at position {p} and {n} more tokens "
                             f"would make the sequence {p + n} long; create the state with a larger max_len")
        if n == 0:
            return tokens.empty_output(), self
        xp = tokens.xp
        positions = xp.arange(p, p + n, device=array_api_compat.device(tokens.q))
        q5, k5, v5 = tokens.grouped()
        fq, fk = (fmaps.cosformer_features(fmaps.relu(x), positions, self.max_len) for x in (q5, k5))
        o, S, z = _scan_step(xp, self.S, self.z, fq, fk, v5, self.eps)
        return tokens.grouped_output(o), replace(self, S=S, z=z, position=p + n)


def _cosformer_options(max_len: Any, eps: Any) -> tuple[int, float]:
    max_len = _checks.check_positive_int("max_len", max_len)
    options = _kernelized.check_options(causal=True, normalize=True, eps=eps, scale=None, form="chunked",
                                        chunk_size=1, default_scale=1.0)
    return max_len, options.eps


# ---------------------------------------------------------------------------------------
# Exact softmax: a KV cache
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SoftmaxState:
    r"""Decoding state of causal :func:`linattn.softmax_attention`: a KV cache.

    A step's n queries attend to every cached key and to the new keys up to their own
    position (bottom-right alignment, as FlashAttention's KV-cache decoding):

    .. math::

        o_{p+r} = \sum_{j \le p + r} \frac{e^{\,\text{scale}\; q_{p+r}\cdot k_j}}
                                        {\sum_{l \le p+r} e^{\,\text{scale}\; q_{p+r}\cdot k_l}}\, v_j,
        \qquad r = 0 .. n-1,

    where p is the number of cached tokens. The cache grows by n per step: O(t) memory,
    the price of exactness. With ``max_len`` it is preallocated instead (a static cache,
    rows ``position ..`` zero) and a step past it is an error.

    Attributes
    ----------
    keys : array, shape (B, L, Hkv, Dk)
        The keys so far in rows ``0 .. position − 1`` (FlashAttention's ``k_cache``
        layout); L = position, or max_len when preallocated.
    values : array, shape (B, L, Hkv, Dv)
    position : int
        Tokens so far.
    scale : float
        Default 1/sqrt(Dk).
    max_len : int or None

    Examples
    --------
    >>> import numpy as np
    >>> import linattn
    >>> from linattn.decoding import SoftmaxState, step
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 5, 2, 4)) for _ in range(3))
    >>> state = SoftmaxState.initial(batch=1, kv_heads=2, key_dim=4, value_dim=4)
    >>> o1, state = step(state, q[:, :3], k[:, :3], v[:, :3])
    >>> o2, state = step(state, q[:, 3:], k[:, 3:], v[:, 3:])
    >>> bool(np.allclose(np.concatenate([o1, o2], axis=1), linattn.softmax_attention(q, k, v, causal=True)))
    True
    >>> state.keys.shape
    (1, 5, 2, 4)
    """

    keys: Any
    values: Any
    position: int
    scale: float
    max_len: int | None

    @classmethod
    def initial(cls, *, batch: int, kv_heads: int, key_dim: int, value_dim: int, dtype: Any = None, xp: Any = None,
                device: Any = None, scale: float | None = None, max_len: int | None = None) -> SoftmaxState:
        """The empty cache.

        Parameters
        ----------
        batch, kv_heads, key_dim, value_dim, dtype, xp, device
            As in :meth:`LinearState.initial`.
        scale : float, optional
            Logit scale; default 1/sqrt(Dk).
        max_len : int, optional
            Preallocate the cache for this many tokens; None lets it grow.

        Returns
        -------
        SoftmaxState
        """
        sizes = _sizes(batch=batch, kv_heads=kv_heads, key_dim=key_dim, value_dim=value_dim)
        scale = _checks.check_scale(scale, sizes["key_dim"])
        if max_len is not None:
            max_len = _checks.check_positive_int("max_len", max_len)
        xp, dtype, device = _allocator(xp, dtype, device)
        rows = 0 if max_len is None else max_len
        keys = _zeros(xp, (sizes["batch"], rows, sizes["kv_heads"], sizes["key_dim"]), dtype, device)
        values = _zeros(xp, (sizes["batch"], rows, sizes["kv_heads"], sizes["value_dim"]), dtype, device)
        return cls(keys, values, 0, scale, max_len)

    def _step(self, q: Any, k: Any, v: Any, layout: str) -> tuple[Any, SoftmaxState]:
        B, _, Hkv, Dk = (int(n) for n in self.keys.shape)
        tokens = _tokens(q, k, v, layout, like=self.keys, batch=B, kv_heads=Hkv, value_dim=int(self.values.shape[3]),
                         key_dim=Dk)
        n, p = tokens.n, self.position
        if self.max_len is not None and p + n > self.max_len:
            raise ValueError(f"max_len={self.max_len} exceeded: the cache holds {p} tokens and {n} more would make "
                             f"{p + n}; create the state with a larger max_len (or max_len=None to grow)")
        if n == 0:
            return tokens.empty_output(), self
        xp = tokens.xp
        keys = xp.concat([self.keys[:, :p, ...], tokens.k], axis=1)
        values = xp.concat([self.values[:, :p, ...], tokens.v], axis=1)
        o = softmax_attention(tokens.q, keys, values, causal=True, scale=self.scale)
        if self.max_len is not None:  # keep the preallocated shape
            keys = xp.concat([keys, self.keys[:, p + n:, ...]], axis=1)
            values = xp.concat([values, self.values[:, p + n:, ...]], axis=1)
        return tokens.output(o), replace(self, keys=keys, values=values, position=p + n)


# ---------------------------------------------------------------------------------------
# Hybrid: a ring buffer for the local heads, a linear state for the global ones
# ---------------------------------------------------------------------------------------


def _take(xp: Any, x: Any, index: Sequence[int], axis: int) -> Any:
    return xp.take(x, xp.asarray(list(index), dtype=xp.int64, device=array_api_compat.device(x)), axis=axis)


def _ring_step(xp: Any, ring: Any, position: int, new: Any) -> tuple[Any, Any]:
    """Read a ring buffer's past tokens (oldest first) and write the new ones into it.

    ``ring`` (B, w, H, D) holds token j in slot j mod w for the last min(position, w)
    tokens; ``new`` (B, n, H, D) are tokens position .. position + n − 1. Returns the
    past (B, min(position, w), H, D) and the ring after the new tokens, shape unchanged.
    """
    w, n = int(ring.shape[1]), int(new.shape[1])
    if w == 0:
        return ring, ring
    past_slots = [j % w for j in range(max(0, position - w), position)]
    past = _take(xp, ring, past_slots, axis=1) if past_slots else ring[:, :0, ...]
    # Slot s keeps its token unless a new token lands on it (the newest one wins);
    # indices >= w pick from the new tokens appended after the ring.
    index = list(range(w))
    for r in range(n):
        index[(position + r) % w] = w + r
    return past, _take(xp, xp.concat([ring, new], axis=1), index, axis=1)


@dataclass(frozen=True, eq=False)
class HybridState:
    r"""Decoding state of :func:`linattn.hybrid_attention` (causal): a ring buffer and a linear state.

    A local query head h sees its own key and the w before it,

    .. math::

        o^{(h)}_t = \sum_{j = t-w}^{t} \frac{e^{\,\text{scale}\; q_t\cdot k_j}}
                                         {\sum_{l=t-w}^{t} e^{\,\text{scale}\; q_t\cdot k_l}}\, v_j,

    so the state keeps only the last w keys and values of the key/value heads that local
    heads read, in a ring buffer of fixed size w: token j sits in slot j mod w and a new
    token overwrites the oldest. Memory is O(w) whatever the length. Global heads are
    linear attention over the whole past, through a :class:`LinearState` over the
    key/value heads they read.

    Attributes
    ----------
    keys : array, shape (B, w, Hkv_local, Dk), or None
        The ring of keys: slot j mod w holds token j for the last min(position, w) tokens
        (zeros elsewhere); Hkv_local = ``len(local_kv_heads)``; None without local heads.
    values : array, shape (B, w, Hkv_local, Dv), or None
    linear : LinearState or None
        Over the key/value heads ``global_kv_heads``; None without global heads.
    position : int
        Tokens so far.
    window : int
        w.
    local_heads : tuple of int
        The local query heads, in increasing order.
    q_heads, kv_heads, key_dim, value_dim : int
        Hq, Hkv, Dk, Dv.
    scale : float
        Softmax scale of the local heads.

    Examples
    --------
    >>> import numpy as np
    >>> import linattn
    >>> from linattn.decoding import HybridState, step
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 9, 4, 3)) for _ in range(3))
    >>> full = linattn.hybrid_attention(q, k, v, local_heads=[0, 3], window=2)
    >>> state = HybridState.initial(batch=1, q_heads=4, kv_heads=4, key_dim=3, value_dim=3,
    ...                             local_heads=[0, 3], window=2)
    >>> outs = []
    >>> for t in range(9):
    ...     o, state = step(state, q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1])
    ...     outs.append(o)
    >>> bool(np.allclose(np.concatenate(outs, axis=1), full)), state.keys.shape
    (True, (1, 2, 2, 3))
    """

    keys: Any
    values: Any
    linear: LinearState | None
    position: int
    window: int
    local_heads: tuple[int, ...]
    q_heads: int
    kv_heads: int
    key_dim: int
    value_dim: int
    scale: float

    @classmethod
    def initial(cls, *, batch: int, q_heads: int, kv_heads: int, key_dim: int, value_dim: int,
                local_heads: int | Sequence[int], window: int, dtype: Any = None, xp: Any = None, device: Any = None,
                scale: float | None = None, feature_map: str | FeatureMap = "elu+1", normalize: bool = True,
                eps: float = 1e-6, linear_scale: float | None = None) -> HybridState:
        """The state before any token: an empty ring, a zero linear state.

        Parameters
        ----------
        batch, kv_heads, key_dim, value_dim, dtype, xp, device
            As in :meth:`LinearState.initial`.
        q_heads : int
            Hq, a multiple of Hkv.
        local_heads : int or sequence of int
            A count (the first n query heads) or the indices of the local heads.
        window : int
            w >= 0: a local head sees its own key and the w before it.
        scale, feature_map, normalize, eps, linear_scale
            As in :func:`linattn.hybrid_attention`.

        Returns
        -------
        HybridState
        """
        sizes = _sizes(batch=batch, q_heads=q_heads, kv_heads=kv_heads, key_dim=key_dim, value_dim=value_dim)
        B, Hq, Hkv, Dk, Dv = (sizes[n] for n in ("batch", "q_heads", "kv_heads", "key_dim", "value_dim"))
        if Hq % Hkv:
            raise ValueError(f"q_heads must be a multiple of kv_heads, got q_heads={Hq}, kv_heads={Hkv}")
        window = _checks.check_nonnegative_int("window", window)
        local, global_ = split_heads(local_heads, Hq)
        scale = _checks.check_scale(scale, Dk)
        xp, dtype, device = _allocator(xp, dtype, device)
        G = Hq // Hkv
        local_kv = sorted({h // G for h in local})
        global_kv = sorted({h // G for h in global_})
        keys = values = linear = None
        if local:
            keys = _zeros(xp, (B, window, len(local_kv), Dk), dtype, device)
            values = _zeros(xp, (B, window, len(local_kv), Dv), dtype, device)
        if global_:
            linear = LinearState.initial(batch=B, kv_heads=len(global_kv), key_dim=Dk, value_dim=Dv, dtype=dtype,
                                         xp=xp, device=device, feature_map=feature_map, normalize=normalize, eps=eps,
                                         scale=linear_scale)
        else:  # no global head: still reject bad options
            _linear_options(feature_map, normalize, eps, linear_scale)
        return cls(keys, values, linear, 0, window, tuple(local), Hq, Hkv, Dk, Dv, scale)

    @property
    def group(self) -> int:
        """G = Hq / Hkv."""
        return self.q_heads // self.kv_heads

    @property
    def local_kv_heads(self) -> tuple[int, ...]:
        """The key/value heads the local heads read: the ring's heads, in order."""
        return tuple(sorted({h // self.group for h in self.local_heads}))

    @property
    def global_kv_heads(self) -> tuple[int, ...]:
        """The key/value heads the global heads read: the linear state's heads, in order."""
        return tuple(sorted({h // self.group for h in range(self.q_heads) if h not in self.local_heads}))

    def _step(self, q: Any, k: Any, v: Any, layout: str) -> tuple[Any, HybridState]:
        like = self.keys if self.keys is not None else self.linear.S
        tokens = _tokens(q, k, v, layout, like=like, batch=int(like.shape[0]), kv_heads=self.kv_heads,
                         value_dim=self.value_dim, key_dim=self.key_dim)
        if tokens.shapes.q_heads != self.q_heads:
            raise ValueError(f"q has {tokens.shapes.q_heads} heads, but the state holds q_heads={self.q_heads} "
                             f"(q {tuple(q.shape)}, layout={layout!r})")
        if tokens.n == 0:
            return tokens.empty_output(), self
        xp, G, local = tokens.xp, self.group, list(self.local_heads)
        parts, new = [], {"position": self.position + tokens.n}
        if local:
            local_kv = list(self.local_kv_heads)
            k_new, v_new = (_take(xp, x, local_kv, axis=2) for x in (tokens.k, tokens.v))
            past_k, new["keys"] = _ring_step(xp, self.keys, self.position, k_new)
            past_v, new["values"] = _ring_step(xp, self.values, self.position, v_new)
            # each local query head with its own copy of its key/value head, as hybrid_attention does
            kv_of_head = [local_kv.index(h // G) for h in local]
            keys, values = (_take(xp, xp.concat(pair, axis=1), kv_of_head, axis=2)
                            for pair in ((past_k, k_new), (past_v, v_new)))
            parts.append(softmax_attention(_take(xp, tokens.q, local, axis=2), keys, values, causal=True,
                                           window=(self.window, 0), scale=self.scale))
        global_kv = list(self.global_kv_heads)
        if global_kv:
            # every query head of the global key/value heads (a local one among them is dropped below)
            heads = [h * G + g for h in global_kv for g in range(G)]
            o_global, new["linear"] = step(self.linear, _take(xp, tokens.q, heads, axis=2),
                                           _take(xp, tokens.k, global_kv, axis=2),
                                           _take(xp, tokens.v, global_kv, axis=2))
            parts.append(o_global)
        joined = xp.concat(parts, axis=2) if len(parts) > 1 else parts[0]
        order = [local.index(h) if h in self.local_heads else len(local) + global_kv.index(h // G) * G + h % G
                 for h in range(self.q_heads)]
        return tokens.output(_take(xp, joined, order, axis=2)), replace(self, **new)


# ---------------------------------------------------------------------------------------
# The generic entry points
# ---------------------------------------------------------------------------------------

_STATES = {
    "linear": LinearState,
    "performer": PerformerState,
    "cosformer": CosformerState,
    "hybrid": HybridState,
    "softmax": SoftmaxState,
}

METHODS = tuple(_STATES)
"""The methods of this module's own states (:func:`available_methods` adds registered ones)."""

DecodingState = Any  # LinearState | PerformerState | CosformerState | HybridState | SoftmaxState | registered


def register_state(method: str, state_class: type) -> None:
    """Make ``init_state(method, ...)`` build ``state_class.initial(...)``.

    The gated recurrences register their states here from their own modules. A state
    class is a frozen dataclass with a classmethod ``initial(**options)`` and a method
    ``_step(q, k, v, layout, **inputs) -> (o, new_state)`` that never mutates ``self``;
    ``inputs`` are the method's other per-token arrays (gates, beta, ...), passed to
    :func:`step` by keyword.

    Parameters
    ----------
    method : str
        The name for :func:`init_state`.
    state_class : type
        The state class.

    Raises
    ------
    TypeError
        If the class has no ``initial`` or no ``_step``.
    """
    if not (hasattr(state_class, "initial") and hasattr(state_class, "_step")):
        raise TypeError(f"state_class must define initial() and _step(), got {state_class!r}")
    _STATES[method] = state_class


def available_methods() -> tuple[str, ...]:
    """The methods :func:`init_state` knows now, registered ones included.

    Returns
    -------
    tuple of str
    """
    return tuple(_STATES)


def init_state(method: str, **options: Any) -> DecodingState:
    """The state before the first token of ``method``: ``<Method>State.initial(**options)``.

    Parameters
    ----------
    method : {"linear", "performer", "cosformer", "hybrid", "softmax"}
    **options
        The keyword arguments of that state's ``initial``: always ``batch``,
        ``kv_heads``, ``key_dim``, ``value_dim`` (and optionally ``dtype``, ``xp``,
        ``device``), plus the method's own (``projection`` for performer, ``max_len`` for
        cosformer, ``q_heads``, ``local_heads`` and ``window`` for hybrid, ...).

    Returns
    -------
    LinearState, PerformerState, CosformerState, HybridState or SoftmaxState

    Raises
    ------
    ValueError
        An unknown method; and the errors of ``initial``.

    Examples
    --------
    >>> from linattn.decoding import init_state
    >>> state = init_state("cosformer", batch=2, kv_heads=1, key_dim=4, value_dim=3, max_len=100)
    >>> type(state).__name__, state.S.shape, state.position
    ('CosformerState', (2, 1, 8, 3), 0)
    """
    if method not in _STATES:
        raise ValueError(f"method must be one of {available_methods()}, got {method!r}")
    return _STATES[method].initial(**options)


def step(state: DecodingState, q: Any, k: Any, v: Any, *, layout: str = "bthd",
         **inputs: Any) -> tuple[Any, DecodingState]:
    r"""Feed n new tokens to a decoding state: their outputs and the state after them.

    For the tokens at positions p .. p + n − 1 (p = the tokens the state has seen),

    .. math::

        o_{p+r} = \text{the causal forward's output at } p + r
                  \text{ on } (x_0, \dots, x_{p+n-1}), \qquad r = 0 .. n-1,

    computed from the state alone (see each state class for its recurrence). Stepping
    token by token, in blocks of any sizes, or from a prefill state gives the same
    outputs to rounding.

    Parameters
    ----------
    state : LinearState, PerformerState, CosformerState, HybridState or SoftmaxState
        Not modified: step returns a new state and never writes into this one's arrays,
        so a state may be stepped again with other tokens (branching).
    q : array, shape (B, n, Hq, Dk)
        The new queries (``(B, Hq, n, Dk)`` with ``layout="bhtd"``); n >= 0.
    k : array, shape (B, n, Hkv, Dk)
        The new keys; Hkv, Dk and B must be the state's.
    v : array, shape (B, n, Hkv, Dv)
        The new values.
    layout : {"bthd", "bhtd"}, default "bthd"
        Axis order of q, k, v and o (the state's own layout is fixed).
    **inputs
        The method's other per-token arrays, for states that take them (the gated
        recurrences' gates and beta); the states of this module take none.

    Returns
    -------
    o : array, shape (B, n, Hq, Dv)
        In q's layout and dtype.
    new_state : the same class as ``state``

    Raises
    ------
    TypeError
        A state that is not a decoding state, non-floating tokens, tokens whose compute
        dtype is not the state's, arrays of another library.
    ValueError
        Tokens whose batch, head count or dims do not match the state or each other, a
        step past ``max_len`` (cosFormer, preallocated softmax cache).

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.decoding import init_state, step
    >>> state = init_state("softmax", batch=1, kv_heads=1, key_dim=2, value_dim=2)
    >>> x = np.ones((1, 1, 1, 2))
    >>> o, after = step(state, x, x, x)
    >>> o.tolist(), state.position, after.position  # the old state is untouched
    ([[[[1.0, 1.0]]]], 0, 1)
    """
    if type(state) not in _STATES.values():
        raise TypeError(f"state must be a linattn.decoding state (from init_state), got {type(state).__name__}")
    if inputs:
        return state._step(q, k, v, layout, **inputs)
    return state._step(q, k, v, layout)
