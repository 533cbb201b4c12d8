"""Merges the per-run JSON files of `benchmarks/qm9_curves.sh` into one table and one learning-curve figure.

    python benchmarks/qm9_curves_report.py applications/qm9/results_gpu_quick_80 [--title "..."]

Reads every `run_<balancer>_seed<seed>.json` (a finished run: test MAE per target, test Δp at the epoch chosen on
validation Δp, full History) and every `curve_<balancer>_seed<seed>.json` without a matching run file (a run cut off
before its end: validation curve only). Writes `RESULTS.md` (per method: seeds, test Δp mean ± sample std and per
seed, mean test MAE per target in the paper's units, the epoch chosen; each pair of methods' difference against the
spread) and `curves.png` (validation Δp per epoch, mean ± std over seeds; task weights and gradient norms of DB-MTL)
in the same folder.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re

import numpy as np

NAME = re.compile(r"(run|curve)_(?P<balancer>.+)_seed(?P<seed>\d+)\.json$")


def load(folder):
    """balancer -> {"runs": [run dicts], "cut": [curve dicts of runs that did not finish]}."""
    runs, curves = {}, {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        match = NAME.search(os.path.basename(path))
        if not match:
            continue
        key = (match["balancer"], int(match["seed"]))
        with open(path) as fh:
            (runs if match.group(1) == "run" else curves)[key] = json.load(fh)
    methods = {}
    for (balancer, _), run in sorted(runs.items()):
        methods.setdefault(balancer, {"runs": [], "cut": []})["runs"].append(run)
    for key, curve in sorted(curves.items()):
        if key not in runs:
            methods.setdefault(key[0], {"runs": [], "cut": []})["cut"].append(curve)
    return methods


def mean_std(values):
    values = np.asarray(values, dtype=float)
    return float(values.mean()), (float(values.std(ddof=1)) if len(values) > 1 else float("nan"))


def difference_line(a, b, da, db):
    """Welch's t statistic of two methods' test Δp, and whether the gap exceeds the larger seed std."""
    ma, sa = mean_std(da)
    mb, sb = mean_std(db)
    se = math.sqrt(sa**2 / len(da) + sb**2 / len(db))
    t = (ma - mb) / se if se > 0 else float("inf")
    verdict = "larger than" if abs(ma - mb) > max(sa, sb) else "within"
    return (f"- {a} − {b}: {ma - mb:+.2f} points of Δp; Welch t = {t:.2f} ({len(da)} and {len(db)} seeds); the gap "
            f"is {verdict} the seed spread (largest std {max(sa, sb):.2f}).")


def table(methods):
    order = sorted(methods, key=lambda m: (m not in ("ew", "dbmtl"), m))
    first = next(run for m in order for run in methods[m]["runs"])
    targets = list(first["test_mae"])
    lines = ["| method | seeds | test Δp (%) mean ± std | per seed | epoch chosen | "
             + " | ".join(targets) + " |", "|" + "---|" * (5 + len(targets))]
    for m in order:
        runs = methods[m]["runs"]
        if not runs:
            continue
        dp = [r["delta_p"] for r in runs]
        mean, std = mean_std(dp)
        maes = [np.mean([r["test_mae"][t] for r in runs]) for t in targets]
        lines.append(f"| {m} | {len(runs)} | {mean:.2f} ± {std:.2f} | " + ", ".join(f"{v:.2f}" for v in dp)
                     + " | " + ", ".join(str(r["best_epoch"]) for r in runs) + " | "
                     + " | ".join(f"{v:.4g}" for v in maes) + " |")
    return lines


def plot(methods, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    for m in sorted(methods):
        histories = [r["history"]["val_delta_p"] for r in methods[m]["runs"]]
        histories += [c["history"]["val_delta_p"] for c in methods[m]["cut"]]
        n = min(len(h) for h in histories)
        curves = np.array([h[:n] for h in histories])
        epochs = np.arange(1, n + 1)
        mean = curves.mean(0)
        ax.plot(epochs, mean, label=f"{m} ({len(curves)} seed{'s' if len(curves) > 1 else ''})")
        if len(curves) > 1:
            std = curves.std(0, ddof=1)
            ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
    ax.set_ylim(-60, 5)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation Δp (%)")
    ax.set_title("validation Δp, mean ± std over seeds")
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize=8)
    for ax, suffix, title in ((axes[1], "_weight", "DB-MTL task weights (seed 0)"),
                              (axes[2], "_gradient_norm", "DB-MTL per-task gradient norms (seed 0)")):
        run = next((r for r in methods.get("dbmtl", {}).get("runs", []) if r["seed"] == 0), None)
        if run is None:
            ax.set_visible(False)
            continue
        for key in sorted(k for k in run["history"] if k.endswith(suffix) and not k.startswith("val_")):
            ax.plot(np.arange(1, len(run["history"][key]) + 1), run["history"][key], label=key[: -len(suffix)])
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(folder, title):
    methods = load(folder)
    lines = [f"# {title}", "", "Made by `python benchmarks/qm9_curves_report.py " + folder.rstrip("/") + "` from the "
             "per-run JSON files in this folder (test MAE in the paper's units; Δp against the preset's STL "
             "baselines; the epoch is chosen on validation Δp; std is the sample std over seeds).", ""]
    lines += table(methods)
    lines.append("")
    finished = {m: [r["delta_p"] for r in v["runs"]] for m, v in methods.items() if len(v["runs"]) > 1}
    names = sorted(finished)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            lines.append(difference_line(a, b, finished[a], finished[b]))
    cut = {m: [c["epochs_done"] for c in v["cut"]] for m, v in methods.items() if v["cut"]}
    if cut:
        lines.append("")
        lines.append("Runs cut off before their last epoch (validation curve only, no test figure): "
                     + ", ".join(f"{m} after {'/'.join(map(str, e))} epochs" for m, e in sorted(cut.items())) + ".")
    plot(methods, os.path.join(folder, "curves.png"))
    lines += ["", "![learning curves](curves.png)", ""]
    with open(os.path.join(folder, "RESULTS.md"), "w") as fh:
        fh.write("\n".join(lines))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--title", default="QM9 learning curves")
    args = parser.parse_args(argv)
    print(write(args.folder, args.title))


if __name__ == "__main__":
    main()
