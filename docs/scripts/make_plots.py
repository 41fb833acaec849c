"""Measure and draw the plots of the linattn documentation.

Run from the repository root:  python docs/scripts/make_plots.py

It writes, into docs/_static/plots/ (``--out``), one PNG and one JSON file per figure,
and prints the numbers it plots:

- ``performer_error``: relative error of Performer against exact softmax (float64) vs
  the number of random features m, for positive and trigonometric features with
  orthogonal and iid projections, non-causal and causal, at two logit scales;
- ``performer_logit_scale``: the same at m = 256 vs the logit scale, with the kernel
  estimate's error next to the variance formulas of :mod:`linattn.bounds.performer`;
- ``linformer_error``: relative error of Linformer vs the projection size k, next to
  the sketch P RᵀR V of its Theorem 1 and that sketch's exact variance
  (:func:`linattn.bounds.linformer_sketch_variance`); skipped if linattn.linformer is absent;
- ``time_memory``: time and peak traced memory (tracemalloc) vs T for softmax, flash,
  linear, performer, cosformer and hybrid, causal, float32, each as ``linattn compare``
  runs it.

Definitions. The relative error of an output o is ‖o − o_ref‖_F / ‖o_ref‖_F over every
row, with o_ref exact softmax attention in float64 on the same inputs. q and k are drawn
N(0, σ² I), so that the softmax logits q·k/√Dk have standard deviation σ² (the "logit
scale"); v is N(0, I). A feature count m is the width of φ(q) (the state's rows): m
projection rows for positive features, m/2 frequencies (a sine and a cosine each) for
trigonometric ones, so that both cost the same. Error curves show the median over the
seeds (a line) and the smallest and largest seed (a band); the JSON files keep every
seed's value and the mean.

BLAS threads. Unless OPENBLAS_NUM_THREADS, OMP_NUM_THREADS or MKL_NUM_THREADS is set,
the script sets all three to 1 before importing NumPy: on a machine shared with other
work, a multi-threaded BLAS whose threads wait for busy cores made single calls up to
40 times slower than their usual time, so the timings are single-threaded, and
repeatable. machine.json records the setting.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
if not any(name in os.environ for name in _THREAD_VARIABLES):
    for _name in _THREAD_VARIABLES:
        os.environ[_name] = "1"

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

import linattn  # noqa: E402
from linattn.bounds import favor_positive_moments, favor_trig_moments, linformer_sketch_variance  # noqa: E402
from linattn.compare import compared_methods  # noqa: E402
from linattn.feature_maps import favor_positive, favor_trig, random_projection  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DPI = 90

# (kind, orthogonal) -> label and colour; the same in every figure.
VARIANTS = {
    ("positive", True): ("positive, orthogonal", "tab:blue"),
    ("positive", False): ("positive, iid", "tab:cyan"),
    ("trig", True): ("trig, orthogonal", "tab:red"),
    ("trig", False): ("trig, iid", "tab:orange"),
}

# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def relative_error(o, exact):
    return float(np.linalg.norm(np.asarray(o, dtype=np.float64) - exact) / np.linalg.norm(exact))


def summary(values):
    values = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(values)), "mean": float(np.mean(values)), "min": float(np.min(values)),
            "max": float(np.max(values)), "seeds": [float(x) for x in values]}


def inputs(T, D, logit_std, seed, heads=1):
    """q, k ~ N(0, logit_std·I) (so q·k/√D has std logit_std), v ~ N(0, I); shape (1, T, H, D)."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, T, heads, D)) for _ in range(3))
    return q * math.sqrt(logit_std), k * math.sqrt(logit_std), v


def draw_projection(kind, orthogonal, m, D, seed):
    rows = m if kind == "positive" else m // 2
    return random_projection(rows, D, orthogonal=orthogonal, rng=seed)


def log2_axis(ax):
    """Log-2 x axis with the plain numbers (16, 32, ...) as tick labels."""
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))


def band(ax, x, stats, label, color, marker="o"):
    med = [s["median"] for s in stats]
    ax.fill_between(x, [s["min"] for s in stats], [s["max"] for s in stats], color=color, alpha=0.15, lw=0)
    ax.plot(x, med, marker=marker, ms=4, color=color, label=label)


def save(fig, out, name, data):
    path = out / f"{name}.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    with open(out / f"{name}.json", "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} "
          f"({path.stat().st_size // 1024} KiB) and {name}.json")


def machine():
    """What the timings were taken on."""
    blas = {}
    try:
        deps = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        blas = {"name": deps.get("name"), "version": deps.get("version")}
    except Exception as err:  # numpy < 2 has no dict mode
        blas = {"error": repr(err)}
    cpu = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=False).stdout.strip() or None
    except OSError:
        commit = None
    return {
        "uname_m": platform.machine(), "nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
        "numpy": np.__version__, "blas": blas, "linattn": linattn.__version__, "git_head": commit,
        "blas_threads": {name: os.environ.get(name) for name in _THREAD_VARIABLES},
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# ---------------------------------------------------------------------------------------
# (a) Performer: error vs number of features
# ---------------------------------------------------------------------------------------


def performer_error(out, seeds, T=256, D=32, logit_stds=(0.25, 1.0), features=(16, 32, 64, 128, 256, 512, 1024)):
    rows = {}
    fig, axes = plt.subplots(len(logit_stds), 2, figsize=(10, 3.6 * len(logit_stds)), sharex=True,
                             layout="constrained")
    axes = np.atleast_2d(axes)
    for i, logit_std in enumerate(logit_stds):
        for j, causal in enumerate((False, True)):
            ax = axes[i, j]
            print(f"\nPerformer, T={T}, D={D}, logit std {logit_std}, {'causal' if causal else 'non-causal'}: "
                  "relative error, median [min, max] over seeds")
            print(f"{'variant':<22}" + "".join(f"{m:>21d}" for m in features))
            exact = {s: linattn.softmax_attention(*inputs(T, D, logit_std, s), causal=causal) for s in seeds}
            anchor = None
            for (kind, orthogonal), (label, color) in VARIANTS.items():
                stats = []
                for m in features:
                    errs = [relative_error(linattn.performer_attention(
                        *inputs(T, D, logit_std, s), kind=kind, causal=causal,
                        projection=draw_projection(kind, orthogonal, m, D, 1000 + s)), exact[s]) for s in seeds]
                    stats.append(summary(errs))
                rows[f"logit_std={logit_std},causal={causal},{label}"] = {
                    "logit_std": logit_std, "causal": causal, "kind": kind, "orthogonal": orthogonal,
                    "features": list(features), "error": stats}
                print(f"{label:<22}" + "".join("  " + f"{s['median']:.3g} [{s['min']:.2g}, {s['max']:.2g}]".rjust(19)
                                               for s in stats))
                band(ax, features, stats, label, color)
                if (kind, orthogonal) == ("positive", True):
                    anchor = stats[-1]["median"]
            ref = [anchor * math.sqrt(features[-1] / m) for m in features]
            ax.plot(features, ref, "k--", lw=1, label=r"$\propto 1/\sqrt{m}$")
            ax.axhline(1.0, color="0.4", ls=":", lw=1, label="o = 0 (error 1)")
            log2_axis(ax)
            ax.set_yscale("log")
            ax.grid(True, which="major", alpha=0.3)
            ax.set_title(f"{'causal' if causal else 'non-causal'}, logit std {logit_std}")
            ax.set_ylabel("relative error vs exact softmax")
            if i == len(logit_stds) - 1:
                ax.set_xlabel("random features m (width of φ)")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside lower center", ncol=6, fontsize=8)
    fig.suptitle(f"Performer (FAVOR+) against exact softmax, T = {T}, Dk = Dv = {D}, float64; "
                 f"median and range over {len(seeds)} draws of W")
    settings = {"T": T, "D": D, "B": 1, "H": 1, "seeds": list(seeds), "logit_stds": list(logit_stds),
                "features": list(features), "inputs": "q, k ~ N(0, logit_std I), v ~ N(0, I), float64",
                "options": "performer_attention defaults (stabilize=True, eps=0, normalize=True, scaling='chi'); "
                           "trig uses m/2 frequencies"}
    save(fig, out, "performer_error", {"settings": settings, "rows": rows})


# ---------------------------------------------------------------------------------------
# (a') Performer: error vs logit scale, with the variance formulas
# ---------------------------------------------------------------------------------------


def performer_logit_scale(out, seeds, T=256, D=32, m=256, logit_stds=(0.0625, 0.125, 0.25, 0.5, 1.0)):
    kernel, attention, predicted = {}, {}, {}
    for (kind, orthogonal), (label, _) in VARIANTS.items():
        kernel[label], attention[label] = [], []
        for logit_std in logit_stds:
            k_errs, a_errs = [], []
            for s in seeds:
                q, k, v = inputs(T, D, logit_std, s)
                W = draw_projection(kind, orthogonal, m, D, 1000 + s)
                x, y = q[0, :, 0], k[0, :, 0]
                exact_kernel = np.exp(x @ y.T / math.sqrt(D))
                if kind == "positive":  # the unstabilised estimator is the one the formulas describe
                    est = favor_positive(x, W, role="query", stabilize=False) @ favor_positive(
                        y, W, role="key", stabilize=False).T
                else:
                    est = favor_trig(x, W) @ favor_trig(y, W).T
                k_errs.append(float(np.sqrt(np.mean(((est - exact_kernel) / exact_kernel) ** 2))))
                exact = linattn.softmax_attention(q, k, v)
                a_errs.append(relative_error(linattn.performer_attention(q, k, v, kind=kind, projection=W), exact))
            kernel[label].append(summary(k_errs))
            attention[label].append(summary(a_errs))
    for kind in ("positive", "trig"):
        pred = []
        for logit_std in logit_stds:
            values = []
            for s in seeds:
                q, k, _ = inputs(T, D, logit_std, s)
                x, y = q[0, :, 0][:, None, :], k[0, :, 0][None, :, :]
                mean, var = (favor_positive_moments(x, y, m) if kind == "positive"
                             else favor_trig_moments(x, y, m // 2))
                values.append(float(np.sqrt(np.mean(var / mean**2))))
            pred.append(float(np.median(values)))
        predicted[kind] = pred

    print(f"\nPerformer at m = {m}, T={T}, D={D}, non-causal, vs logit std {list(logit_stds)}: median over seeds")
    for label in kernel:
        print(f"  kernel RMS rel. error  {label:<22}" + "".join(f"{s['median']:>10.3g}" for s in kernel[label]))
    for kind, pred in predicted.items():
        print(f"  predicted (iid, bounds) {kind:<21}" + "".join(f"{p:>10.3g}" for p in pred))
    for label in attention:
        print(f"  attention rel. error   {label:<22}" + "".join(f"{s['median']:>10.3g}" for s in attention[label]))

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    for label, color in VARIANTS.values():
        band(axes[0], logit_stds, kernel[label], f"{label} (measured)", color)
        band(axes[1], logit_stds, attention[label], label, color)
    for kind, color in (("positive", "navy"), ("trig", "darkred")):
        axes[0].plot(logit_stds, predicted[kind], ls="--", marker="x", ms=7, color=color, lw=1.5, zorder=5,
                     label=f"{kind}, iid: variance formula")
    for ax in axes:
        log2_axis(ax)
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.set_xlabel("logit scale: std of q·k/√Dk")
    axes[0].set_ylabel("RMS relative error of φ(q)·φ(k)")
    axes[0].set_title("kernel estimate of exp(q·k/√Dk), all T² pairs")
    axes[1].set_ylabel("relative error vs exact softmax")
    axes[1].set_title("normalised attention output")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Performer at m = {m} features, T = {T}, D = {D}, non-causal; "
                 f"median and range over {len(seeds)} draws")
    settings = {"T": T, "D": D, "m": m, "seeds": list(seeds), "logit_stds": list(logit_stds),
                "kernel_error": "sqrt(mean over the T² pairs of ((est - exp(q·k/√D)) / exp(q·k/√D))²), "
                                "unstabilised positive features / trig features",
                "predicted": "sqrt(mean over pairs of Var/SM²) from linattn.bounds (iid rows), median over seeds "
                             "of the inputs"}
    save(fig, out, "performer_logit_scale", {"settings": settings, "kernel": kernel, "attention": attention,
                                            "predicted_iid": predicted})


# ---------------------------------------------------------------------------------------
# (b) Linformer: error vs projection size
# ---------------------------------------------------------------------------------------


def linformer_error(out, seeds, lengths=(256, 1024), D=32, logit_std=1.0, sizes=(8, 16, 32, 64, 128, 256)):
    if importlib.util.find_spec("linattn.linformer") is None:
        print("\nlinattn.linformer not found: skipping the Linformer plot")
        return
    from linattn.linformer import linformer_attention, linformer_projections

    rows = {}
    fig, ax = plt.subplots(figsize=(9.5, 4.2), layout="constrained")
    colors = {lengths[0]: "tab:green", lengths[-1]: "tab:purple"}
    print(f"\nLinformer, D={D}, logit std {logit_std}, non-causal: relative error, median over seeds")
    for n in lengths:
        ks = [k for k in sizes if k <= n]
        lin, sketch, predicted = [], [], []
        for k_dim in ks:
            e_lin, e_sketch, e_pred = [], [], []
            for s in seeds:
                q, k, v = inputs(n, D, logit_std, s)
                exact = linattn.softmax_attention(q, k, v)
                E, F = linformer_projections(k_dim, n, rng=1000 + s)
                e_lin.append(relative_error(linformer_attention(q, k, v, E=E, F=F), exact))
                # Theorem 1's sketch: P Rᵀ R V with the exact probabilities P and R = E.
                logits = q[0, :, 0] @ k[0, :, 0].T / math.sqrt(D)
                P = np.exp(logits - logits.max(axis=1, keepdims=True))
                P /= P.sum(axis=1, keepdims=True)
                V = v[0, :, 0]
                e_sketch.append(float(np.linalg.norm(P @ E.T @ (E @ V) - P @ V) / np.linalg.norm(P @ V)))
                var = sum(float(np.sum(linformer_sketch_variance(P, V[:, c], k_dim))) for c in range(D))
                e_pred.append(math.sqrt(var) / float(np.linalg.norm(P @ V)))
            lin.append(summary(e_lin))
            sketch.append(summary(e_sketch))
            predicted.append(float(np.median(e_pred)))
        rows[f"n={n}"] = {"n": n, "proj_dim": ks, "linformer": lin, "sketch_P_RtR_V": sketch,
                          "sketch_predicted_rms": predicted}
        print(f"  n={n:<5} k:{'':<14}" + "".join(f"{k:>9d}" for k in ks))
        print("  linformer_attention   " + "".join(f"{s['median']:>9.3g}" for s in lin))
        print("  sketch P RᵀR V        " + "".join(f"{s['median']:>9.3g}" for s in sketch))
        print("  sketch, predicted RMS " + "".join(f"{p:>9.3g}" for p in predicted))
        band(ax, ks, lin, f"linformer_attention, n = {n}", colors[n])
        band(ax, ks, sketch, f"sketch P RᵀR V, n = {n}", colors[n], marker="s")
        ax.plot(ks, predicted, ls=":", color=colors[n], lw=1.5, label=f"sketch, exact RMS (bounds), n = {n}")
    ax.axhline(1.0, color="0.4", ls=":", lw=1, label="o = 0 (error 1)")
    log2_axis(ax)
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.set_xlabel("projection size k")
    ax.set_ylabel("relative error vs exact softmax")
    ax.set_title(f"Linformer, E, F ~ N(0, 1/k), D = {D}, logit std {logit_std}, float64; "
                 f"median and range over {len(seeds)} draws", fontsize=9)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=8)
    settings = {"lengths": list(lengths), "D": D, "logit_std": logit_std, "seeds": list(seeds),
                "proj_dims": list(sizes), "sharing": "headwise (one E, one F)",
                "sketch": "P Rᵀ R V with P the exact softmax probabilities and R = E (Theorem 1's quantity)"}
    save(fig, out, "linformer_error", {"settings": settings, "rows": rows})


# ---------------------------------------------------------------------------------------
# (c) time and memory vs T
# ---------------------------------------------------------------------------------------

SPEED_METHODS = ("softmax", "flash", "linear", "performer", "cosformer", "hybrid")
SPEED_COLORS = {"softmax": "black", "flash": "tab:gray", "linear": "tab:green", "performer": "tab:blue",
                "cosformer": "tab:red", "hybrid": "tab:purple"}


def best_time(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def peak_traced(fn):
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def time_memory(out, lengths=(256, 512, 1024, 2048, 4096, 8192), softmax_max=2048, H=4, D=64):
    registry = compared_methods()
    rows = {name: [] for name in SPEED_METHODS}
    rng = np.random.default_rng(0)
    print(f"\nTime (best of 5, or 3 for T > 2048) and peak traced memory, causal, B=1, H={H}, D={D}, float32")
    print(f"{'method':<10} {'T':>6} {'time (ms)':>10} {'peak (MiB)':>11}")
    for T in lengths:
        q, k, v = (rng.standard_normal((1, T, H, D)).astype(np.float32) for _ in range(3))
        for name in SPEED_METHODS:
            if name == "softmax" and T > softmax_max:
                continue
            call = functools.partial(registry[name].run, q, k, v, causal=True)
            call()  # warm-up
            seconds = best_time(call, 5 if T <= 2048 else 3)
            peak = peak_traced(call)
            rows[name].append({"T": T, "seconds": seconds, "peak_bytes": peak})
            print(f"{name:<10} {T:>6d} {seconds * 1e3:>10.2f} {peak / 2**20:>11.2f}", flush=True)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for name, points in rows.items():
        Ts = [p["T"] for p in points]
        axes[0].plot(Ts, [p["seconds"] * 1e3 for p in points], marker="o", ms=4, color=SPEED_COLORS[name],
                     label=name)
        axes[1].plot(Ts, [p["peak_bytes"] / 2**20 for p in points], marker="o", ms=4, color=SPEED_COLORS[name],
                     label=name)
    for ax, key, unit in ((axes[0], "seconds", 1e3), (axes[1], "peak_bytes", 2.0**-20)):
        # slope guides through the linear method's first point: T and T²
        first = rows["linear"][0]
        x = np.array([lengths[0], lengths[-1]], dtype=float)
        y0 = first[key] * unit
        ax.plot(x, y0 * (x / x[0]), ls=":", color="0.6", lw=1, label=r"$\propto T$")
        ax.plot([x[0], softmax_max], [y0, y0 * (softmax_max / x[0]) ** 2], ls="--", color="0.6", lw=1,
                label=r"$\propto T^2$")
        log2_axis(ax)
        ax.set_yscale("log")
        ax.grid(True, which="major", alpha=0.3)
        ax.set_xlabel("sequence length T")
    axes[0].set_ylabel("time per call (ms, best of repeats)")
    axes[0].set_title("time")
    axes[1].set_ylabel("peak traced memory (MiB, tracemalloc)")
    axes[1].set_title("peak memory beyond the inputs")
    axes[0].legend(fontsize=8)
    threads = os.environ.get("OPENBLAS_NUM_THREADS", "default")
    fig.suptitle(f"Causal forward on CPU (NumPy, OpenBLAS threads: {threads}), B = 1, H = {H}, D = {D}, "
                 "float32; settings of `linattn compare`")
    settings = {"B": 1, "H": H, "D": D, "dtype": "float32", "causal": True, "lengths": list(lengths),
                "softmax_max_T": softmax_max,
                "repeats": "best of 5 for T <= 2048, else best of 3; a warm-up call before, a traced call after",
                "descriptions": {name: registry[name].description for name in SPEED_METHODS}}
    save(fig, out, "time_memory", {"settings": settings, "rows": rows})


# ---------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "_static" / "plots")
    parser.add_argument("--seeds", type=int, default=5, help="draws per point of the error plots")
    parser.add_argument("--only", nargs="*", choices=("performer", "logit", "linformer", "speed"),
                        help="make only these figures")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = tuple(range(args.seeds))
    chosen = set(args.only or ("performer", "logit", "linformer", "speed"))
    info = machine()
    print("machine:", json.dumps(info))
    start = time.perf_counter()
    if "performer" in chosen:
        performer_error(args.out, seeds)
    if "logit" in chosen:
        performer_logit_scale(args.out, seeds)
    if "linformer" in chosen:
        linformer_error(args.out, seeds)
    if "speed" in chosen:
        time_memory(args.out)
    info["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    info["elapsed_seconds"] = time.perf_counter() - start
    info["command"] = " ".join(["python", "docs/scripts/make_plots.py", *sys.argv[1:]])
    with open(args.out / "machine.json", "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
        f.write("\n")
    print(f"\ndone in {info['elapsed_seconds']:.0f} s; machine and load average in machine.json")


if __name__ == "__main__":
    main()
