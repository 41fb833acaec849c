"""Time two copies of linattn against each other (and FLA) on a CUDA GPU, interleaved in one run.

Run on the GPU machine, with a second copy of the package (say main's, from
``git archive HEAD linattn | tar -x -C base``) beside the working tree's::

    PYTHONPATH=. python docs/scripts/gpu_ab.py --base base --ops simple_gla gated_delta \\
        --shapes 1x8192x96x128 2x16384x16x128 --rounds 2 --fla --json ab.json

Each round runs one process per copy ("base", then "tree"), so each copy has its own
Python launchers and CUDA sources, and both time the same inputs (``gpu_peers.inputs``,
seed 0) the same way as ``gpu_peers.py``: the median of CUDA-event timings
(``do_bench``) and the GPU time with the host hidden (``gpu_ms``). The rounds interleave
the copies so that a drift of the GPU's clocks shows as a spread within a copy, not as a
difference between them. With ``--fla`` the first round also times FLA's chunk kernel of
each op, so that the ratios to FLA come from the same run. The outputs of both copies
are compared too: the largest difference relative to the largest output.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def measure(ops: list[str], shapes: list[str], dtype: str, with_fla: bool, outputs: str) -> dict[str, Any]:
    """This process's copy of linattn (and FLA's, with ``with_fla``) on every (op, shape): times and outputs."""
    import torch
    from gpu_peers import DTYPES, fla, gpu_ms, inputs, median_ms, ours

    import linattn

    rows, saved = [], {}
    for shape_name in shapes:
        shape = tuple(int(n) for n in shape_name.split("x"))
        x = inputs(shape, DTYPES[dtype])
        for op in ops:
            run = ours(op, x)
            o = run()
            saved[f"{op}-{shape_name}"] = (o[0] if isinstance(o, tuple) else o).float().cpu()
            ms = median_ms(run)
            rows.append({"impl": "linattn", "op": op, "shape": shape_name, "ms": ms, "gpu_ms": gpu_ms(run)})
            if with_fla:
                peer = fla(op, x)
                ms = median_ms(peer)
                rows.append({"impl": "fla chunk", "op": op, "shape": shape_name, "ms": ms, "gpu_ms": gpu_ms(peer)})
        del x
        torch.cuda.empty_cache()
    torch.save(saved, outputs)
    return {"linattn": str(Path(linattn.__file__).parent), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="folder holding the other copy's linattn package")
    parser.add_argument("--ops", nargs="+", default=["simple_gla"])
    parser.add_argument("--shapes", nargs="+", default=["1x8192x96x128", "2x16384x16x128", "16x2048x16x128"])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--fla", action="store_true", help="also time FLA's chunk kernels (first round)")
    parser.add_argument("--json", default="gpu_ab.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: measure in this process, write here
    args = parser.parse_args(argv)
    if args.child:
        result = measure(args.ops, args.shapes, args.dtype, args.fla, args.child + ".pt")
        Path(args.child).write_text(json.dumps(result))
        return 0

    copies = {"base": str(Path(args.base).resolve()), "tree": str(HERE.parents[1])}
    runs: list[dict[str, Any]] = []
    for r in range(args.rounds):
        for name, root in copies.items():
            out = f"/tmp/gpu_ab_{name}_{r}.json"
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, str(HERE), os.environ.get("PYTHONPATH", "")])}
            command = [sys.executable, __file__, "--base", args.base, "--child", out, "--dtype", args.dtype,
                       "--ops", *args.ops, "--shapes", *args.shapes, *(["--fla"] if args.fla and r == 0 and
                                                                        name == "base" else [])]
            subprocess.run(command, env=env, check=True, cwd=root)
            result = json.loads(Path(out).read_text())
            assert Path(result["linattn"]).resolve() == Path(root, "linattn").resolve(), result["linattn"]
            runs.append({"copy": name, "round": r, "rows": result["rows"], "outputs": out + ".pt"})

    import torch

    first = {run["copy"]: torch.load(run["outputs"]) for run in runs if run["round"] == 0}
    differences = {key: float((first["tree"][key] - o).abs().max() / o.abs().max().clamp_min(1e-30))
                   for key, o in first["base"].items()}
    summary = {"command": "PYTHONPATH=. python docs/scripts/gpu_ab.py " + " ".join(argv or sys.argv[1:]),
               "gpu": torch.cuda.get_device_name(), "dtype": args.dtype, "runs": [
                   {k: v for k, v in run.items() if k != "outputs"} for run in runs],
               "output_difference": differences}
    Path(args.json).write_text(json.dumps(summary, indent=1))
    print_table(summary)
    return 0


def print_table(summary: dict[str, Any]) -> None:
    """Per (op, shape): each copy's times by round (ms, GPU ms in brackets), FLA's, FLA over the tree's median."""
    table: dict[tuple[str, str], dict[str, list[tuple[float, float]]]] = {}
    for run in summary["runs"]:
        for row in run["rows"]:
            impl = run["copy"] if row["impl"] == "linattn" else row["impl"]
            table.setdefault((row["op"], row["shape"]), {}).setdefault(impl, []).append((row["ms"], row["gpu_ms"]))
    print(f"{summary['gpu']}, {summary['dtype']}: ms by do_bench (GPU ms); x = FLA / tree")
    for (op, shape), impls in table.items():
        cells = [f"{name} " + " ".join(f"{ms:.3f} ({g:.3f})" for ms, g in times) for name, times in impls.items()]
        tree, peer = impls.get("tree"), impls.get("fla chunk")
        ratio = ""
        if tree and peer:
            mid = statistics.median(ms for ms, _ in tree), statistics.median(g for _, g in tree)
            ratio = f"  x {peer[0][0] / mid[0]:.2f} ({peer[0][1] / mid[1]:.2f})"
        diff = summary["output_difference"].get(f"{op}-{shape}")
        print(f"{op:>11} {shape:>15}: " + " | ".join(cells) + ratio + f"  max diff {diff:.1e}")


if __name__ == "__main__":
    sys.exit(main())
