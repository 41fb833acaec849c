"""The problems validate runs: each case probes one thing that breaks kernels.

A :class:`Case` is method-independent (sizes, options, which check it runs); the method's
spec turns it into a :class:`Problem` (arrays, options) with a generator seeded by the
validate seed and the case's name, so a case draws the same values in every run.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from linattn.testing.validation._frameworks import round_to, state_dtype
from linattn.testing.validation._inputs import Shape
from linattn.testing.validation._methods import MethodSpec

__all__ = ["CASES", "Case", "Problem", "build_problem", "select_cases"]


@dataclass(frozen=True)
class Case:
    """One probe.

    Attributes
    ----------
    name : str
        What ``cases=`` and ``--cases`` accept.
    check : str
        "values" (outputs, and final states where asked, against the reference),
        "causality", "state passing" or "default scale".
    property : str
        What a failure of its values means: "values", "initial state", "varlen", ...
    description : str
    shape : Shape
    initial_state, final_state : bool
        Pass a nonzero initial state; ask for (and compare) the final state.
    scale : float, optional
        An explicit scale (None: the argument is left out, so the default is exercised).
    extreme, mask, zero_keys : bool
        Extreme gates (large logits for softmax); a random boolean mask (softmax); the
        first keys of every sequence zero (normalised linear attention).
    split : int
        The position P of the causality and state-passing probes.
    grads : bool
        Also compare gradients on this case.
    options : mapping
        Method options of the case (``causal``, ``window``, ``normalize``).
    methods : frozenset of str, optional
        The only methods it applies to.
    needs_state : bool, default True
        False: the states are part of the case only for methods that have one.
    """

    name: str
    check: str
    property: str
    description: str
    shape: Shape
    initial_state: bool = False
    final_state: bool = False
    scale: float | None = None
    extreme: bool = False
    mask: bool = False
    zero_keys: bool = False
    split: int = 0
    grads: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    methods: frozenset[str] | None = None
    needs_state: bool = True


def _shape(batch: int = 2, length: int = 40, heads: int = 2, kv_heads: int = 2, key_dim: int = 16,
           value_dim: int = 16, segments: tuple[int, ...] | None = None) -> Shape:
    return Shape(batch, length, heads, kv_heads, key_dim, value_dim, segments)


_VARLEN = (0, 9, 1, 0, 70, 3)  # an empty first and middle sequence, a length-1 one, one with a tail chunk

CASES: tuple[Case, ...] = (
    Case("basic", "values", "values", "a small problem: B = 2, T = 40", _shape(), grads=True),
    Case("t1", "values", "values", "T = 1", _shape(length=1), grads=True),
    Case("t23", "values", "values", "T = 23, not a multiple of 16", _shape(length=23), grads=True),
    Case("tail", "values", "values", "T = 100: a tail chunk of T % 64 = 36 steps", _shape(length=100), grads=True),
    Case("odd_dims", "values", "values", "Dk = 12, Dv = 20: head dims that are not powers of two",
         _shape(length=33, key_dim=12, value_dim=20), grads=True),
    Case("gqa", "values", "values", "4 query heads on 2 key/value heads (GQA; GVA for the delta rule)",
         _shape(heads=4, kv_heads=2), grads=True),
    Case("scale", "values", "values", "an explicit scale = 0.37", _shape(), scale=0.37),
    Case("default_scale", "default scale", "default scale",
         "scale left out vs scale = Dk^-0.5 given: the same output", _shape()),
    Case("initial_state", "values", "initial state",
         "a nonzero initial state, and the final state (Dk = Dv: a transposed state still fits)",
         _shape(length=80), initial_state=True, final_state=True, grads=True),
    Case("state_passing", "state passing", "state passing",
         "run(x[:37]), then run(x[37:], initial_state=its final state), against run(x)",
         _shape(length=100), final_state=True, split=37),
    Case("causality", "causality", "causality",
         "inputs after t = 40 redrawn (gates too): outputs up to t = 40 must not change",
         _shape(length=100), split=40),
    Case("varlen", "values", "varlen",
         f"cu_seqlens of lengths {_VARLEN} (empty and length-1 sequences), initial and final states (if any)",
         _shape(batch=1, length=sum(_VARLEN), segments=_VARLEN), initial_state=True, final_state=True, grads=True,
         needs_state=False),
    Case("extreme", "values", "values", "gates at 0, -1e-3, -30 and -1e3 (logits up to ~60 for softmax)",
         _shape(length=80), extreme=True),
    Case("long", "values", "values", "T = 1000 (a tail chunk of 40)",
         _shape(batch=1, length=1000, heads=1, kv_heads=1)),
    Case("noncausal", "values", "values", "bidirectional", _shape(), options={"causal": False},
         methods=frozenset({"softmax"}), grads=True),
    Case("window", "values", "values", "causal, sliding window (16, 0)", _shape(length=60),
         options={"window": (16, 0)}, methods=frozenset({"softmax"}), grads=True),
    Case("mask", "values", "values", "bidirectional with a random boolean mask (each query sees its own key)",
         _shape(), options={"causal": False}, mask=True, methods=frozenset({"softmax"}), grads=True),
    Case("zero_keys", "values", "values", "normalize=True, the first 6 keys zero: the normaliser is 0 + eps",
         _shape(), options={"normalize": True}, zero_keys=True, methods=frozenset({"linear"})),
)


def applies(case: Case, spec: MethodSpec) -> bool:
    """Whether ``case`` means something for ``spec``'s method."""
    s = case.shape
    if case.methods is not None and spec.name not in case.methods:
        return False
    if (case.initial_state or case.final_state) and spec.state is None and case.needs_state:
        return False
    if s.heads != s.kv_heads and not spec.gqa:
        return False
    if (case.scale is not None or case.check == "default scale") and spec.default_scale is None:
        return False
    return not (case.extreme and not spec.extreme)


def select_cases(spec: MethodSpec, names: Iterable[str] | None) -> list[Case]:
    """The cases named (all that apply to the method when None), in the order of :data:`CASES`."""
    known = {c.name: c for c in CASES}
    if names is None:
        return [_for(c, spec) for c in CASES if applies(c, spec)]
    if isinstance(names, str):
        names = [names]
    names = list(names)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"cases must be among {list(known)}, got unknown {unknown}")
    chosen = [c for c in CASES if c.name in names]
    not_applicable = [c.name for c in chosen if not applies(c, spec)]
    if not_applicable:
        raise ValueError(f"cases {not_applicable} do not apply to method {spec.name!r}")
    return [_for(c, spec) for c in chosen]


def _for(case: Case, spec: MethodSpec) -> Case:
    """The case without its states for a method that has none."""
    return case if spec.state is not None else replace(case, initial_state=False, final_state=False)


@dataclass
class Problem:
    """A drawn case: ``arrays`` by argument name (float64, already rounded to the dtype) and ``options``.

    ``initial_state`` is kept apart (it is rounded to the state dtype, and state passing
    replaces it); ``options`` hold everything else the call takes (scale, cu_seqlens as
    int64, a mask, window, causal, ...).
    """

    spec: MethodSpec
    case: Case
    shape: Shape
    arrays: dict[str, np.ndarray]
    options: dict[str, Any]
    initial_state: np.ndarray | None = None
    seed: int = 0

    @property
    def length(self) -> int:
        return self.shape.length

    def call_options(self, *, final_state: bool | None = None) -> dict[str, Any]:
        """The keyword options of one call (``output_final_state`` only when a state is involved)."""
        options = dict(self.options)
        if self.initial_state is not None:
            options["initial_state"] = self.initial_state
        wanted = self.case.final_state if final_state is None else final_state
        if wanted:
            options["output_final_state"] = True
        return options

    def sliced(self, lo: int, hi: int) -> Problem:
        """The problem cut to time steps [lo, hi) (batch problems only)."""
        arrays = {name: _take(a, self.spec.time_axes.get(name), lo, hi) for name, a in self.arrays.items()}
        return replace(self, arrays=arrays, shape=replace(self.shape, length=hi - lo))

    def redrawn_after(self, position: int, fresh: Mapping[str, np.ndarray]) -> Problem:
        """The problem with every per-time array replaced by ``fresh`` after ``position``."""
        arrays = {}
        for name, a in self.arrays.items():
            axis = self.spec.time_axes.get(name)
            if axis is None:
                arrays[name] = a
                continue
            index = [slice(None)] * a.ndim
            index[axis] = slice(position + 1, None)
            changed = a.copy()
            changed[tuple(index)] = fresh[name][tuple(index)]
            arrays[name] = changed
        return replace(self, arrays=arrays)


def _take(a: np.ndarray, axis: int | None, lo: int, hi: int) -> np.ndarray:
    if axis is None:
        return a
    index = [slice(None)] * a.ndim
    index[axis] = slice(lo, hi)
    return a[tuple(index)]


def case_seed(seed: int, case: Case, dtype: str) -> np.random.Generator:
    """A generator for one case: the same values for a seed, whatever the cases chosen."""
    return np.random.default_rng([seed, zlib.crc32(case.name.encode()), zlib.crc32(dtype.encode())])


def draw_arrays(spec: MethodSpec, case: Case, rng: np.random.Generator, dtype: str) -> dict[str, np.ndarray]:
    """The method's arrays for the case, rounded to ``dtype`` (the reference sees the rounded values)."""
    arrays = spec.make(rng, case.shape, case.extreme)
    if case.zero_keys:
        arrays["q"], arrays["k"] = (np.abs(arrays[n]) for n in ("q", "k"))  # positive features
        arrays["k"][:, :6] = 0.0
    return {name: round_to(a, dtype) for name, a in arrays.items()}


def build_problem(spec: MethodSpec, case: Case, seed: int, dtype: str) -> Problem:
    """Draw the case's problem for ``spec``."""
    rng = case_seed(seed, case, dtype)
    arrays = draw_arrays(spec, case, rng, dtype)
    options: dict[str, Any] = {**spec.defaults, **case.options}
    if case.scale is not None:
        options["scale"] = case.scale
    if case.shape.segments is not None:
        options["cu_seqlens"] = case.shape.cu_seqlens
    if case.mask:
        s = case.shape
        visible = rng.random((s.batch, s.heads, s.length, s.length)) < 0.7
        visible |= np.eye(s.length, dtype=bool)  # no query without a key (SDPA would give NaN)
        options["mask"] = visible
    initial = None
    if case.initial_state:
        initial = round_to(rng.standard_normal(spec.state(case.shape)), state_dtype(dtype))
    return Problem(spec, case, case.shape, arrays, options, initial, seed)
