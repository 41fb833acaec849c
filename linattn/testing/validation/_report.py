"""validate's report: one row per check of a case, printed as a table."""

from __future__ import annotations

import json
import math
import textwrap
from dataclasses import asdict, dataclass, field

__all__ = ["TOLERANCE_RULE", "CaseResult", "ValidationReport"]

TOLERANCE_RULE = (
    "tolerance: |actual - reference| <= tol*(max|reference| + |reference|) per element (err/allow: the worst "
    "element's error over that allowance), "
    "tol = 8*eps*sqrt(n)*kappa (linattn.testing.tolerance) with eps of the dtype, n the products summed "
    "into each output (T*Dk for a scan; doubled for gradients) and kappa the condition (1 + the largest "
    "sum of |log-decay| over 64 steps + chunks; 1 + max|logit| for softmax); float16/bfloat16 add "
    "8*eps(dtype) to the float32 value of the formula (their sums run in float32, the values pass through "
    "the half dtype a few times); the reference is linattn in float64 on the same rounded inputs"
)

PASS, FAIL, SKIP, ERROR = "pass", "FAIL", "skip", "error"


@dataclass(frozen=True)
class CaseResult:
    """One row of the report: a check of one case in one dtype.

    Attributes
    ----------
    case : str
        The case's name (see ``linattn.testing.validation.CASES``).
    check : str
        What was compared: "output", "final state", "gradients", "causality",
        "state passing", "default scale".
    shape : str
        The case's sizes.
    dtype : str
    status : str
        "pass", "FAIL", "skip" (with the reason in ``note``, e.g. "not differentiable")
        or "error" (the implementation raised; the exception in ``note``).
    max_abs_error, rel_rms_error : float or None
        max |a − r| and ||a − r||₂ / ||r||₂ (None when nothing was compared).
    worst : str
        Where the error is largest relative to its allowance: the array (``o``, ``ht``
        the final state, ``dq`` ...) and the index, in linattn's layout.
    tolerance : float or None
        tol above (the relative tolerance; the absolute one is tol·max|reference|).
    failed_property : str or None
        What a failure means: "values", "tail chunk", "causality", "state passing",
        "initial state", "final state", "varlen", "default scale", "gradients".
    note : str
    ratio : float or None
        The worst element's error over its allowance tol·(max|r| + |r|): at most 1 passes.
    """

    case: str
    check: str
    shape: str
    dtype: str
    status: str
    max_abs_error: float | None = None
    rel_rms_error: float | None = None
    worst: str = ""
    tolerance: float | None = None
    failed_property: str | None = None
    note: str = ""
    ratio: float | None = None

    @property
    def failed(self) -> bool:
        """A failure or an error."""
        return self.status in (FAIL, ERROR)


def _number(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isnan(x):
        return "nan"
    return f"{x:.1e}"


_COLUMNS = (("case", 13), ("check", 13), ("shape", 30), ("dtype", 8), ("max abs", 8), ("rel RMS", 8),
            ("tol", 8), ("err/allow", 9), ("worst at", 20), ("result", 6))


@dataclass(frozen=True)
class ValidationReport:
    """What :func:`linattn.testing.validate` found.

    Attributes
    ----------
    method : str
    implementation : str
        The implementation's qualified name.
    adapter, framework : str
    dtypes : tuple of str
    seed : int
    rows : tuple of CaseResult
    tolerance_rule : str
        How every tolerance was derived.
    """

    method: str
    implementation: str
    adapter: str
    framework: str
    dtypes: tuple[str, ...]
    seed: int
    rows: tuple[CaseResult, ...] = field(default_factory=tuple)
    tolerance_rule: str = TOLERANCE_RULE

    @property
    def passed(self) -> bool:
        """No check failed or raised (skipped checks, "not differentiable" included, do not fail)."""
        return not any(r.failed for r in self.rows)

    @property
    def failed_properties(self) -> set[str]:
        """The properties of the failed rows."""
        return {r.failed_property for r in self.rows if r.failed and r.failed_property}

    def failures(self) -> list[CaseResult]:
        """The failed rows."""
        return [r for r in self.rows if r.failed]

    def rows_of(self, case: str) -> list[CaseResult]:
        """The rows of one case."""
        return [r for r in self.rows if r.case == case]

    def summary(self) -> str:
        """One line: counts, and the properties that failed."""
        counts = {s: sum(r.status == s for r in self.rows) for s in (PASS, FAIL, ERROR, SKIP)}
        text = (f"{'PASSED' if self.passed else 'FAILED'}: {counts[PASS]} passed, {counts[FAIL]} failed, "
                f"{counts[ERROR]} errors, {counts[SKIP]} skipped")
        not_differentiable = sum("not differentiable" in r.note for r in self.rows)
        if not_differentiable:
            text += f" ({not_differentiable} gradient checks not run: not differentiable)"
        if self.failed_properties:
            text += "; failed: " + ", ".join(sorted(self.failed_properties))
            if self.failed_properties & {"values", "tail chunk"} and len(self.failed_properties) > 1:
                text += " (plain cases fail too: fix those first, the other properties may fail through them)"
        return text

    def table(self) -> str:
        """The rows as a fixed-width table, a note under each row that has one."""
        header = " ".join(f"{name:<{width}}" for name, width in _COLUMNS) + " property / note"
        lines = [header, "-" * len(header)]
        for r in self.rows:
            ratio = "-" if r.ratio is None else ("inf" if not math.isfinite(r.ratio) else f"{r.ratio:.2g}")
            cells = (r.case, r.check, r.shape, r.dtype, _number(r.max_abs_error), _number(r.rel_rms_error),
                     _number(r.tolerance), ratio, r.worst, r.status)
            line = " ".join(f"{c!s:<{w}}" for c, (_, w) in zip(cells, _COLUMNS, strict=True))
            detail = ": ".join(x for x in (r.failed_property if r.failed else None, r.note) if x)
            lines.append((line + " " + detail).rstrip())
        return "\n".join(lines)

    def __str__(self) -> str:
        head = (f"linattn validate: {self.implementation} as {self.method!r} (adapter {self.adapter!r}, "
                f"{self.framework}, dtypes {', '.join(self.dtypes)}, seed {self.seed})")
        rule = textwrap.fill(self.tolerance_rule, width=110, subsequent_indent="  ")
        return "\n".join([head, self.table(), self.summary(), rule])

    def to_dict(self) -> dict:
        """Everything, JSON-ready (``passed`` and ``failed_properties`` included)."""
        data = asdict(self)
        data["passed"] = self.passed
        data["failed_properties"] = sorted(self.failed_properties)
        return data

    def to_json(self) -> str:
        """:meth:`to_dict` as JSON text."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=True)

