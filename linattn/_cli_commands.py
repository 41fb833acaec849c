"""The ``linattn validate`` and ``linattn explore`` commands, and ``linattn compare --plot``.

Kept apart from :mod:`linattn.cli` so that each command's options and behaviour read in
one place; cli.py only adds their parsers and dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from linattn.compare import CompareRow

__all__ = ["add_explore", "add_validate", "plot_compare", "run_explore", "run_validate"]


# ---- linattn validate ----


def add_validate(sub: Any) -> None:
    """The ``validate`` subcommand's parser."""
    from linattn.testing.validation import ADAPTERS, CASES, FRAMEWORKS, METHODS

    p = sub.add_parser(
        "validate",
        help="check another implementation against linattn's float64 reference",
        description="Run MODULE:FUNCTION on the cases that break kernels (T = 1, tail chunks, odd head dims, GQA, "
        "initial states, state passing, causality, cu_seqlens, extreme gates, long sequences), compare its outputs, "
        "final states and gradients with linattn in float64, print the report and exit 0 if every check passed, "
        "1 if one failed, 2 on a usage error.",
    )
    p.add_argument("target", metavar="MODULE:FUNCTION", help="the implementation, e.g. fla.ops.gla:chunk_gla")
    p.add_argument("--method", required=True, choices=sorted(METHODS), help="which method it implements")
    p.add_argument("--adapter", default=None, choices=sorted(ADAPTERS),
                   help="its calling convention (default: linattn's, the function's own arguments)")
    p.add_argument("--dtype", nargs="+", default=["float32"], metavar="DTYPE",
                   help="float32 (default), float64, float16/fp16, bfloat16/bf16; several allowed")
    p.add_argument("--cases", nargs="+", default=None, metavar="CASE",
                   help=f"cases to run (default: all that apply): {', '.join(c.name for c in CASES)}")
    p.add_argument("--framework", choices=FRAMEWORKS, default=None,
                   help="the array library it takes (default: the adapter's; numpy for linattn's)")
    p.add_argument("--device", default=None, help="device for PyTorch/JAX arrays (e.g. cpu, cuda)")
    p.add_argument("--backward", default=None, metavar="MODULE:FUNCTION",
                   help="its backward, with the arguments of linattn's VJP of the method")
    p.add_argument("--no-grads", action="store_true", help="compare outputs and states only")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated problems (default 0)")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="write the report as JSON to PATH (or, without PATH, print JSON instead of the table)")


def resolve(target: str, what: str = "MODULE:FUNCTION") -> Any:
    """The object ``module.sub:attr.attr`` names (ValueError with the reason when it cannot be found)."""
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"{what} must look like package.module:function, got {target!r}")
    sys.path.insert(0, os.getcwd())  # like python -m: modules next to the caller import
    try:
        obj = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import {module_name!r} (from {what} {target!r}): {err}") from err
    finally:
        sys.path.remove(os.getcwd())
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{module_name!r} has no attribute {attribute!r} (from {what} {target!r})")
        obj = getattr(obj, part)
    return obj


def run_validate(args: argparse.Namespace) -> int:
    """Run ``linattn validate``; 0 passed, 1 failed, 2 usage error."""
    from linattn.testing import validate

    def usage(message: str) -> int:
        print(f"linattn validate: {message}", file=sys.stderr)
        return 2

    try:
        impl = resolve(args.target)
        backward = resolve(args.backward, "--backward") if args.backward else None
    except ValueError as err:
        return usage(str(err))
    if args.json not in (None, "-") and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        return usage(f"--json folder {os.path.dirname(os.path.abspath(args.json))!r} does not exist")
    try:
        report = validate(impl, args.method, cases=args.cases, dtypes=args.dtype, grads=not args.no_grads,
                          seed=args.seed, adapter=args.adapter, framework=args.framework, device=args.device,
                          backward=backward)
    except (ValueError, TypeError, ImportError) as err:
        return usage(str(err))
    if args.json == "-":
        print(report.to_json())
    else:
        print(report)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(report.to_json())
    return 0 if report.passed else 1


# ---- linattn compare --plot ----


def check_matplotlib() -> str | None:
    """Why ``--plot`` cannot draw (None when matplotlib imports)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "--plot needs matplotlib: pip install 'linattn[docs]' (or matplotlib)"
    return None


def plot_compare(rows: Sequence[CompareRow], path: str, settings: dict[str, Any]) -> None:
    """Draw error, time and peak memory against T, one line per method (log-log), to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r.method for r in rows))
    panels = (("rel_error", "relative error", 1.0), ("seconds", "time per call (ms)", 1e3),
              ("peak_bytes", "peak traced memory (MiB)", 1 / 2**20))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6), layout="constrained")
    styles = ("-", "--", ":")  # ten colours per line style, so that every method has its own line
    for ax, (key, label, factor) in zip(axes, panels, strict=True):
        for i, method in enumerate(methods):
            points = sorted((r.length, getattr(r, key) * factor) for r in rows if r.method == method)
            points = [(t, y) for t, y in points if y > 0]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=method, color=f"C{i % 10}",
                        linestyle=styles[i // 10 % 3])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_title(label)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 9), fontsize=8)
    fig.suptitle(f"linattn compare: B={settings['batch']} H={settings['heads']} D={settings['dim']} "
                 f"{settings['dtype']} {'causal' if settings['causal'] else 'non-causal'}", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- linattn explore ----


def add_explore(sub: Any, add_measurement_options: Any) -> None:
    """The ``explore`` subcommand's parser (measurement options shared with ``compare``)."""
    p = sub.add_parser(
        "explore",
        help="write one self-contained HTML page: a sequence-length slider over measured time, memory, error",
        description="Measure every method as linattn compare does (or read linattn compare --json output) and "
        "write one HTML file that needs no network: move the slider to a sequence length and compare the "
        "methods' time, peak memory and error side by side.",
    )
    add_measurement_options(p, default_lengths="256,512,1024,2048,4096")
    p.add_argument("--out", default="linattn-explore.html", metavar="PATH",
                   help="the page to write (default linattn-explore.html)")
    p.add_argument("--from-json", default=None, metavar="PATH",
                   help="build the page from a linattn compare --json file instead of measuring")


def rows_from_json(path: str) -> tuple[list[CompareRow], dict[str, Any]]:
    """The rows and settings of a ``linattn compare --json`` file."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return [CompareRow(**row) for row in data["rows"]], data["settings"]


def add_measurement_options(p: argparse.ArgumentParser, default_lengths: str) -> None:
    """The options of a measurement, as ``linattn compare`` has them."""
    p.add_argument("--lengths", nargs="+", default=[default_lengths],
                   help=f"sequence lengths, space- or comma-separated (default {default_lengths})")
    p.add_argument("--dim", type=int, default=64, help="head dim D = Dk = Dv (default 64)")
    p.add_argument("--heads", type=int, default=4, help="number of heads H (default 4)")
    p.add_argument("--batch", type=int, default=1, help="batch size B (default 1)")
    p.add_argument("--dtype", choices=["float16", "float32", "float64"], default="float32")
    p.add_argument("--methods", nargs="+", default=None, help="methods to run (default all)")
    p.add_argument("--non-causal", action="store_true", help="bidirectional attention")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (default 3)")
    p.add_argument("--no-progress", action="store_true", help="never draw the progress bar")


def run_explore(args: argparse.Namespace, parse_lengths: Any, progress_bar: Any) -> int:
    """Run ``linattn explore``: measure (or read --from-json) and write the page; 0 or 2."""
    from linattn.compare import compared_methods, run_compare
    from linattn.explore import write_explorer

    def usage(message: str) -> int:
        print(f"linattn explore: {message}", file=sys.stderr)
        return 2

    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        return usage(f"--out folder {folder!r} does not exist")
    if args.from_json:
        try:
            rows, settings = rows_from_json(args.from_json)
        except (OSError, ValueError, KeyError, TypeError) as err:
            return usage(f"--from-json {args.from_json!r} is not a linattn compare --json file: {err}")
    else:
        lengths = parse_lengths(args.lengths)
        for name in ("dim", "heads", "batch", "repeats"):
            if getattr(args, name) < 1:
                return usage(f"--{name} must be >= 1, got {getattr(args, name)}")
        registry = compared_methods()
        methods = args.methods or [
            name for name, m in registry.items() if (m.supports_noncausal if args.non_causal else m.supports_causal)]
        progress = progress_bar(len(lengths) * len(methods), delay=1.0, force=False)
        progress.enabled = progress.enabled and not args.no_progress
        settings = {"batch": args.batch, "heads": args.heads, "dim": args.dim, "dtype": args.dtype,
                    "causal": not args.non_causal, "repeats": args.repeats, "lengths": lengths, "methods": methods}
        try:
            rows = run_compare(lengths, dim=args.dim, heads=args.heads, batch=args.batch, dtype=args.dtype,
                               causal=not args.non_causal, methods=methods, repeats=args.repeats, progress=progress)
        except ValueError as err:
            progress.close()
            return usage(str(err))
        progress.close()
    if not rows:
        return usage("no measurement to show")
    write_explorer(args.out, rows, settings)
    lengths = sorted({r.length for r in rows})
    print(f"wrote {args.out}: {len({r.method for r in rows})} methods at T = {', '.join(map(str, lengths))}; "
          f"open it in a browser (no network needed); {args.out}#T={lengths[-1]} opens at the longest")
    return 0
