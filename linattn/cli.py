"""The ``linattn`` command line: ``compare``, ``validate`` and ``explore``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from linattn import _cli_commands
from linattn.compare import compared_methods, format_table, rows_to_json, run_compare


class Progress:
    """A one-line progress bar that appears only once a run has taken ``delay`` seconds.

    Short runs print nothing; long ones redraw ``[#####.....] 5/10 label`` in place on a
    terminal (and print nothing on a non-terminal stream unless ``force``).
    """

    def __init__(self, total: int, *, stream: TextIO | None = None, delay: float = 1.0, force: bool = False):
        self.total = total
        self.stream = sys.stderr if stream is None else stream
        self.delay = delay
        self.enabled = force or bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self.done = 0
        self.shown = False

    def __call__(self, label: str) -> None:
        """Record that step ``done + 1`` (named ``label``) begins."""
        self.done += 1
        if self.enabled and time.perf_counter() - self.start >= self.delay:
            width = 24
            filled = width * (self.done - 1) // max(self.total, 1)
            bar = "#" * filled + "." * (width - filled)
            self.stream.write(f"\r[{bar}] {self.done}/{self.total} {label:<24}")
            self.stream.flush()
            self.shown = True

    def close(self) -> None:
        """Clear the bar's line if it was drawn."""
        if self.shown:
            self.stream.write("\r" + " " * 60 + "\r")
            self.stream.flush()


def _lengths(values: Sequence[str]) -> list[int]:
    lengths = []
    for value in values:
        for part in value.split(","):
            if not part.strip():
                continue
            try:
                n = int(part)
            except ValueError:
                raise argparse.ArgumentTypeError(f"--lengths must be positive integers, got {part.strip()!r}") from None
            if n < 1:
                raise argparse.ArgumentTypeError(f"--lengths must be positive integers, got {n}")
            lengths.append(n)
    if not lengths:
        raise argparse.ArgumentTypeError(f"--lengths must name at least one length, got {' '.join(values)!r}")
    return lengths


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="linattn", description="linattn: the reference for efficient attention.")
    sub = parser.add_subparsers(dest="command", required=True)
    compare = sub.add_parser(
        "compare",
        help="error vs exact softmax, time and peak memory of each method over sequence lengths",
        description="Run each registered method on random causal problems and print its relative error "
        "against float64 exact softmax, its time (best of --repeats) and its peak traced memory.",
    )
    compare.add_argument("--lengths", nargs="+", default=["256,512,1024,2048"],
                         help="sequence lengths, space- or comma-separated (default 256,512,1024,2048)")
    compare.add_argument("--dim", type=int, default=64, help="head dim D = Dk = Dv (default 64)")
    compare.add_argument("--heads", type=int, default=4, help="number of heads H (default 4)")
    compare.add_argument("--batch", type=int, default=1, help="batch size B (default 1)")
    compare.add_argument("--dtype", choices=["float16", "float32", "float64"], default="float32")
    compare.add_argument("--methods", nargs="+", default=None, help="methods to run (default all)")
    compare.add_argument("--non-causal", action="store_true", help="bidirectional attention")
    compare.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (default 3)")
    compare.add_argument("--backend", choices=["numpy", "cupy"], default="numpy",
                         help="run the methods on NumPy (default) or on a CUDA GPU through CuPy")
    compare.add_argument("--json", metavar="PATH", help="also write the rows and settings as JSON")
    compare.add_argument("--list", action="store_true", help="list the methods and exit")
    compare.add_argument("--no-progress", action="store_true", help="never draw the progress bar")
    compare.add_argument("--plot", metavar="PATH", help="also draw error, time and memory against T (PNG; matplotlib)")
    _cli_commands.add_validate(sub)
    _cli_commands.add_explore(sub, _cli_commands.add_measurement_options)
    return parser


def _compare(args: argparse.Namespace) -> int:
    if args.list:
        for method in compared_methods().values():
            print(f"{method.name:<12} {method.description}")
        return 0
    lengths = _lengths(args.lengths)
    for name in ("dim", "heads", "batch", "repeats"):
        if getattr(args, name) < 1:
            print(f"linattn compare: --{name} must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder is not None and not os.path.isdir(folder):
            print(f"linattn compare: {option} folder {folder!r} does not exist", file=sys.stderr)
            return 2
    if args.plot and _cli_commands.check_matplotlib():
        print(f"linattn compare: {_cli_commands.check_matplotlib()}", file=sys.stderr)
        return 2
    registry = compared_methods()
    methods = args.methods or [  # by default every method that has the form asked for
        name for name, m in registry.items() if (m.supports_noncausal if args.non_causal else m.supports_causal)
    ]
    progress = Progress(len(lengths) * len(methods), delay=1.0, force=False)
    progress.enabled = progress.enabled and not args.no_progress
    settings = {
        "batch": args.batch, "heads": args.heads, "dim": args.dim, "dtype": args.dtype,
        "causal": not args.non_causal, "repeats": args.repeats, "lengths": lengths, "methods": methods,
    }
    try:
        rows = run_compare(lengths, dim=args.dim, heads=args.heads, batch=args.batch, dtype=args.dtype,
                           causal=not args.non_causal, methods=methods, repeats=args.repeats, progress=progress,
                           backend=args.backend)
    except ValueError as err:
        progress.close()
        print(f"linattn compare: {err}", file=sys.stderr)
        return 2
    progress.close()
    print(
        f"B={args.batch} H={args.heads} D={args.dim} {args.dtype} {'causal' if not args.non_causal else 'non-causal'}"
        "; error relative to float64 exact softmax (or, for methods that do not approximate it, to their "
        "own float64 definition); time = best of "
        f"{args.repeats}; peak = "
        + ("tracemalloc peak of one call" if args.backend == "numpy" else "CuPy memory-pool peak of one call")
    )
    print(format_table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(rows_to_json(rows, settings))
    if args.plot:
        _cli_commands.plot_compare(rows, args.plot, settings)
        print(f"wrote {args.plot}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``linattn`` console command."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "compare":
            return _compare(args)
        if args.command == "validate":
            return _cli_commands.run_validate(args)
        if args.command == "explore":
            return _cli_commands.run_explore(args, _lengths, Progress)
    except argparse.ArgumentTypeError as err:
        parser.error(str(err))
    return 2  # pragma: no cover - argparse rejects unknown commands first


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
