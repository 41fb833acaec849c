"""Run one of linattn's benchmark ops twice on the peer benchmark's inputs, for a profiler.

The first call compiles the kernels; a profiler skips its launches (``ncu -s``) and
measures the second call's. Run on the GPU machine, for example::

    PYTHONPATH=. ncu --clock-control none -k regex:gla_chunk -s 4 -c 4 --section SpeedOfLight \\
        python docs/scripts/gpu_profile_once.py bf16 gla 8x2048x32x256

Arguments: dtype (bf16, fp16, fp32), op (as ``gpu_peers.py --ops``), shape B x T x H x D.
"""

from __future__ import annotations

import argparse

import torch
from gpu_peers import DTYPES, inputs, ours


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dtype", choices=sorted(DTYPES))
    parser.add_argument("op")
    parser.add_argument("shape", help="B x T x H x D, as 8x2048x32x256")
    args = parser.parse_args(argv)
    run = ours(args.op, inputs(tuple(int(n) for n in args.shape.split("x")), DTYPES[args.dtype]))
    for _ in range(2):
        run()
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
