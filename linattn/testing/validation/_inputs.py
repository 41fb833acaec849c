"""Random inputs for validate's problems, float64, in linattn's (and FLA's) layouts.

Every generator takes a NumPy generator, a :class:`Shape` and whether to draw extreme
values, and returns every array argument of one method by name. Sizes are read from the
shape so that one case (say "GQA") means the same thing for every method.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Shape", "l2_normalised", "log_decays", "log_sigmoid"]


@dataclass(frozen=True)
class Shape:
    """Sizes of a problem.

    Attributes
    ----------
    batch, length : int
        B and T (B = 1 when ``segments`` are packed).
    heads, kv_heads : int
        Query heads and key/value heads (a multiple of each other). For the delta rule the
        larger count is the value heads (FLA's GVA); for Mamba-2, ``kv_heads`` is the
        number of B/C groups; for HGRN and the selective scan, the channels are
        heads × value_dim.
    key_dim, value_dim : int
        Dk (the state size N of the SSMs) and Dv (P, the head dim of Mamba-2).
    segments : tuple of int, optional
        Lengths of sequences packed with ``cu_seqlens`` (empty ones allowed).
    """

    batch: int
    length: int
    heads: int
    kv_heads: int
    key_dim: int
    value_dim: int
    segments: tuple[int, ...] | None = None

    @property
    def n_sequences(self) -> int:
        """N: rows of an initial or final state."""
        return self.batch if self.segments is None else len(self.segments)

    @property
    def cu_seqlens(self) -> np.ndarray | None:
        """The N + 1 offsets of the packed sequences, int64."""
        if self.segments is None:
            return None
        return np.array([0, *itertools.accumulate(self.segments)], dtype=np.int64)

    @property
    def channels(self) -> int:
        """Channels of HGRN and of the selective scan: heads × value_dim."""
        return self.heads * self.value_dim


def log_sigmoid(x: np.ndarray) -> np.ndarray:
    """Return log σ(x) = −log(1 + e^{−x}), without overflow."""
    return -np.logaddexp(0.0, -x)


def log_decays(rng: np.random.Generator, shape: tuple[int, ...], extreme: bool) -> np.ndarray:
    """Log-decays g <= 0: log σ(z + 2), z ~ N(0, 1) (about −0.13, the decay e^g ≈ 0.88).

    ``extreme``: 15% exactly 0 (no decay), 10% −1e-3, 5% −30 and 1% −1e3 (a decay that
    underflows at once in every dtype): sums of them overflow e^{−G} in any dtype, which a
    kernel must never compute.
    """
    g = log_sigmoid(rng.standard_normal(shape) + 2.0)
    if extreme:
        pick = rng.random(shape)
        g = np.select([pick < 0.15, pick < 0.25, pick < 0.30, pick < 0.31], [0.0, -1e-3, -30.0, -1e3], g)
    return g


def l2_normalised(x: np.ndarray) -> np.ndarray:
    """Return x / ||x|| over the last axis (the delta rule's keys and queries)."""
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def normal(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape)


# ---- per method: every array argument, by name ----


def softmax(rng: np.random.Generator, s: Shape, extreme: bool) -> dict[str, np.ndarray]:
    # extreme: q and k × 4 make logits of magnitude ~16·sqrt(Dk)·|N(0,1)|/sqrt(Dk), up to ~60
    factor = 4.0 if extreme else 1.0
    return {"q": normal(rng, s.batch, s.length, s.heads, s.key_dim) * factor,
            "k": normal(rng, s.batch, s.length, s.kv_heads, s.key_dim) * factor,
            "v": normal(rng, s.batch, s.length, s.kv_heads, s.value_dim)}


def qkv(rng: np.random.Generator, s: Shape, extreme: bool) -> dict[str, np.ndarray]:
    return softmax(rng, s, False)


def simple_gla(rng: np.random.Generator, s: Shape, extreme: bool) -> dict[str, np.ndarray]:
    return {**qkv(rng, s, extreme), "g": log_decays(rng, (s.batch, s.length, s.kv_heads), extreme)}


def gla(rng: np.random.Generator, s: Shape, extreme: bool) -> dict[str, np.ndarray]:
    return {**qkv(rng, s, extreme), "gk": log_decays(rng, (s.batch, s.length, s.kv_heads, s.key_dim), extreme)}


def rwkv6(rng: np.random.Generator, s: Shape, extreme: bool) -> dict[str, np.ndarray]:
    a = qkv(rng, s, extreme)
    return {"r": a["q"], "k": a["k"], "v": a["v"],
            "w": log_decays(rng, (s.batch, s.length, s.kv_heads, s.key_dim), extreme),
            "u": normal(rng, s.kv_heads, s.key_dim)}


def hgrn(rng: np.random.Generator, s: Shape, extreme: bool) -> dict[str, np.ndarray]:
    return {"x": normal(rng, s.batch, s.length, s.channels),
            "g": log_decays(rng, (s.batch, s.length, s.channels), extreme)}


def delta_rule(rng: np.random.Generator, s: Shape, extreme: bool) -> dict[str, np.ndarray]:
    # GVA: q and k have the smaller head count, v and β the larger (FLA's convention);
    # unit q and k make every transition a contraction, as FLA's tests (and models) do.
    return {"q": l2_normalised(normal(rng, s.batch, s.length, s.kv_heads, s.key_dim)),
            "k": l2_normalised(normal(rng, s.batch, s.length, s.kv_heads, s.key_dim)),
            "v": normal(rng, s.batch, s.length, s.heads, s.value_dim),
            "beta": 1.0 / (1.0 + np.exp(-normal(rng, s.batch, s.length, s.heads)))}


def gated_delta_rule(rng: np.random.Generator, s: Shape, extreme: bool) -> dict[str, np.ndarray]:
    a = delta_rule(rng, s, extreme)
    g = log_decays(rng, (s.batch, s.length, s.heads), extreme)
    return {"q": a["q"], "k": a["k"], "v": a["v"], "g": g, "beta": a["beta"]}


def _time_steps(rng: np.random.Generator, shape: tuple[int, ...], extreme: bool) -> np.ndarray:
    """Raw dt before the bias and softplus: softplus(N(−1, 1) − 1) ≈ 0.13 (mamba-ssm's range).

    ``extreme``: 10% of steps at +8 (Δ ≈ 7), which with A down to −16 gives log-decays near −100.
    """
    dt = rng.standard_normal(shape) - 1.0
    if extreme:
        dt = np.where(rng.random(shape) < 0.1, 8.0, dt)
    return dt


def mamba2(rng: np.random.Generator, s: Shape, extreme: bool) -> dict[str, np.ndarray]:
    return {"x": normal(rng, s.batch, s.length, s.heads, s.value_dim),
            "dt": _time_steps(rng, (s.batch, s.length, s.heads), extreme),
            "A": -np.exp(rng.uniform(math.log(0.5), math.log(16.0 if extreme else 2.0), s.heads)),
            "B": normal(rng, s.batch, s.length, s.kv_heads, s.key_dim),
            "C": normal(rng, s.batch, s.length, s.kv_heads, s.key_dim),
            "D": normal(rng, s.heads),
            "dt_bias": rng.uniform(-1.0, 0.0, s.heads)}


def selective_scan(rng: np.random.Generator, s: Shape, extreme: bool) -> dict[str, np.ndarray]:
    d, n = s.channels, s.key_dim
    # A = −(1, 2, ..., N) per channel, mamba-ssm's S4D-real initialisation (× 8 for extreme)
    a = -np.broadcast_to(np.arange(1, n + 1, dtype=np.float64), (d, n)) * (8.0 if extreme else 1.0)
    return {"u": normal(rng, s.batch, d, s.length),
            "delta": _time_steps(rng, (s.batch, d, s.length), extreme),
            "A": np.ascontiguousarray(a) * rng.uniform(0.5, 1.0, (d, 1)),
            "B": normal(rng, s.batch, s.kv_heads, n, s.length),
            "C": normal(rng, s.batch, s.kv_heads, n, s.length),
            "D": normal(rng, d),
            "z": normal(rng, s.batch, d, s.length),
            "delta_bias": rng.uniform(-1.0, 0.0, d)}
