"""Time the causal scans with the shortest time segment swept: where do the three passes pay?

The tensor-core launchers split T into segments (each segment's own state, a join, the
outputs) only when the blocks alone would leave multiprocessors idle and every segment
has at least ``_cuda_chunk._MIN_SEGMENT`` steps. This sets that length to each of
``--lengths`` in turn and prints, per (shape, op, dtype), FLA's chunk form once and ours
at each length as ``do_bench`` / GPU time (ms, host hidden). Run on the GPU machine with
the carried wheels on the path (see ``gpu_session.sh``)::

    python3 docs/scripts/gpu_segment_sweep.py --shapes 8x1024x8x64 4x2048x16x128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from gpu_peers import fla, gpu_ms, inputs, median_ms, ours

from linattn.backends import _cuda_chunk


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["8x1024x8x64", "4x2048x16x128"], help="BxTxHxD")
    parser.add_argument("--cases", nargs="+", default=["linear:float32", "linear:bfloat16", "simple_gla:bfloat16",
                                                       "gla:bfloat16"], help="op:dtype")
    parser.add_argument("--lengths", nargs="+", type=int, default=[2048, 1024, 512, 256, 128])
    args = parser.parse_args(argv)
    for text in args.shapes:
        shape = tuple(int(n) for n in text.split("x"))
        for case in args.cases:
            op, dtype = case.split(":")
            x = inputs(shape, getattr(torch, dtype))
            peer = fla(op, x)
            line = f"{text:>14} {op:>10} {dtype:>8} fla {median_ms(peer):6.3f}/{gpu_ms(peer):6.3f} |"
            for length in args.lengths:
                _cuda_chunk._MIN_SEGMENT = length
                call = ours(op, x)
                call()
                line += f" {length}: {median_ms(call):6.3f}/{gpu_ms(call):6.3f}"
            print(line, flush=True)
            del x
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
