"""Plot the GPU peer benchmark's T sweep: forward time against T, with the copy floor.

Reads the committed results (``docs/_static/gpu/gpu_peers_h100.json``, written by
``docs/scripts/gpu_peers.py`` on the GPU machine) and writes
``docs/_static/gpu/gpu_sweep_h100.png``. Runs anywhere (no GPU needed)::

    python docs/scripts/gpu_plot.py
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

GPU = Path(__file__).resolve().parents[2] / "docs" / "_static" / "gpu"
STYLE = {"linattn": ("C0", "o"), "fla chunk": ("C1", "s"), "torch sdpa": ("C2", "^"), "floor": ("0.3", "")}


def main() -> None:
    results = json.loads((GPU / "gpu_peers_h100.json").read_text())
    run = next(r for r in results["runs"]
               if any(row.get("sweep") and row["impl"] == "linattn" and row["ms"] for row in r["rows"]))
    series: dict[str, list[tuple[int, float]]] = {}
    for row in run["rows"]:
        if row.get("sweep") and row["ms"] is not None:
            series.setdefault(row["impl"], []).append((row["shape"][1], row["ms"]))
    B, _, H, D = next(row["shape"] for row in run["rows"] if row.get("sweep"))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for impl, points in series.items():
        T, ms = zip(*sorted(points), strict=True)
        color, marker = STYLE.get(impl, ("k", "x"))
        label = {"floor": "copy floor (read q, k, v, write o)", "fla chunk": "FLA chunk_linear_attn",
                 "torch sdpa": "PyTorch SDPA (softmax)", "linattn": "linattn (tensor-core kernel)"}.get(impl, impl)
        ax.plot(T, ms, marker=marker, color=color, linestyle="--" if impl == "floor" else "-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("forward time (ms, median)")
    ax.set_title(f"causal linear attention, bf16, B={B} H={H} D={D}\n{run['gpu']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(GPU / "gpu_sweep_h100.png", dpi=110)
    print("wrote", GPU / "gpu_sweep_h100.png")


if __name__ == "__main__":
    main()
