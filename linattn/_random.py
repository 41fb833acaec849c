"""Explicit randomness: every random draw in linattn comes from a caller's generator or seed."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np


def as_generator(rng: Any, *, name: str = "rng") -> np.random.Generator:
    """Return ``rng`` as a :class:`numpy.random.Generator`.

    Parameters
    ----------
    rng : numpy.random.Generator or int
        A generator (used as is, so successive calls continue its stream) or a seed.
    name : str
        The argument's name, for the error message.

    Raises
    ------
    TypeError
        If ``rng`` is None or anything else: linattn never draws from global state, so a
        caller must say where the randomness comes from.
    """
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, numbers.Integral) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"{name} must be a numpy.random.Generator or an integer seed, got {rng!r}")
