"""Merges finished QM9 runs into one table, the learning curves and the balance diagnostics (Figures 8-10).

    python -m applications.qm9.report FOLDER [--title "..."]

Reads every ``run_<balancer>_seed<seed>.json`` under FOLDER, sub-folders included (a finished run: test MAE per
target, test Δp at the epoch chosen on validation Δp, the full History, and for a balancer that forms task gradients
the per-epoch cosine matrices of ``TaskBalanceMonitor``), and every ``curve_<balancer>_seed<seed>.json`` without a
matching run file (a run cut off before its end: its validation curve only). Writes into FOLDER:

- ``RESULTS.md``: per method the seeds, test Δp mean ± sample std and per seed, the epoch chosen, the mean test MAE
  per target in the paper's units; for every pair of methods with several seeds, the difference against the spread
  (Welch's t, and whether the gap is larger than the larger of the two seed stds);
- ``curves.png``: validation Δp per epoch, mean ± std over seeds, one line per method;
- ``diagnostics.png`` (when a gradient-level method ran; DB-MTL's if it ran, ``diagnostics_<method>.png`` for each
  other one): its task weights, per-task gradient norms on the shared variables, mean pairwise cosine and number of
  conflicting pairs per epoch, and the cosine heat map of the last epoch (means over seeds).

``python -m applications.qm9.report OUT.json --merge-stl A.json B.json ...`` merges STL-baseline files trained in
separate processes (one per seed) into one.

The command line writes the same files at the end of every run (``applications.qm9.train.main``); this module is
for runs made in separate processes (``benchmarks/qm9_curves.sh``) and merged afterwards.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re

import numpy as np

from applications.experiment import file_part

NAME = re.compile(r"(run|curve)_(?P<balancer>.+)_seed(?P<seed>\d+)\.json$")


def load(folder):
    """balancer -> {"runs": [finished run dicts], "cut": [curve dicts of runs that did not finish]}."""
    runs, curves = {}, {}
    for path in sorted(glob.glob(os.path.join(folder, "**", "*.json"), recursive=True)):
        match = NAME.search(os.path.basename(path))
        if not match:
            continue
        key = (match["balancer"], int(match["seed"]))
        with open(path) as fh:
            (runs if match.group(1) == "run" else curves)[key] = json.load(fh)
    return group(runs, curves)


def group(runs, curves=None):
    """``{(balancer, seed): run}`` (and curves) -> balancer -> {"runs": [...], "cut": [...]}, seeds in order."""
    methods = {}
    for (balancer, _), run in sorted(runs.items()):
        methods.setdefault(balancer, {"runs": [], "cut": []})["runs"].append(run)
    for key, curve in sorted((curves or {}).items()):
        if key not in runs:
            methods.setdefault(key[0], {"runs": [], "cut": []})["cut"].append(curve)
    return methods


def delta_p_of_maes(maes, baselines):
    """Δp (%) of MAEs (lower is better) against baseline MAEs, the paper's Eq. 3: −100 · mean_t (m_t − b_t) / b_t."""
    return -100.0 * float(np.mean([(maes[t] - baselines[t]) / baselines[t] for t in baselines]))


def rebase(methods, baselines):
    """Every finished run's test Δp against other STL ``baselines`` (``{"test": {...}, "val": {...}}``), in place.

    With a learning rate that does not depend on the validation Δp (``schedule="cosine"``) the baselines only
    choose which epoch's weights are kept; each run's epoch is chosen again on its validation MAE per epoch
    against ``baselines["val"]`` and the runs whose choice changes are returned (their test MAE is that of the
    other epoch, which the run file does not hold: train them again with ``--baselines``). The validation Δp
    curve in each run's history (the one the figures draw) becomes the one against ``baselines["val"]``; the
    stored one is kept as ``val_delta_p_stored``."""
    changed = []
    val = baselines.get("val") or baselines["test"]
    for name, entry in methods.items():
        for run in entry["runs"]:
            if run.get("config", {}).get("schedule", "cosine") != "cosine":
                raise ValueError(f"{name} seed {run['seed']}: its learning rate followed the validation Δp "
                                 "(schedule 'plateau'), so other baselines would have trained another model.")
            curve = [delta_p_of_maes({t: run["history"][f"val_{t}_mae"][e] for t in val}, val)
                     for e in range(len(run["history"]["val_delta_p"]))]
            best = int(np.argmax(curve)) + 1          # the first of equal maxima, as KeepBest keeps it
            if best != run["best_epoch"]:
                changed.append((name, run["seed"], run["best_epoch"], best))
            run["delta_p_stored"] = run["delta_p"]
            run["delta_p"] = delta_p_of_maes(run["test_mae"], baselines["test"])
            # the learning curves drawn from these runs are against the same baselines
            run["history"] = dict(run["history"], val_delta_p=curve,
                                  val_delta_p_stored=run["history"]["val_delta_p"])
    return changed


def mean_std(values):
    """Mean and sample standard deviation (nan for one value)."""
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


def difference_lines(methods):
    finished = {m: [r["delta_p"] for r in v["runs"]] for m, v in methods.items() if len(v["runs"]) > 1}
    names = _order(finished)
    return [difference_line(a, b, finished[a], finished[b]) for i, a in enumerate(names) for b in names[i + 1:]]


def _order(methods):
    first = ("ew", "dbmtl")
    return sorted(methods, key=lambda m: (m not in first, first.index(m) if m in first else 0, m))


def table(methods):
    """Markdown lines: one row per method with finished runs."""
    order = _order(methods)
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


def _histories(entry, key):
    """The ``key`` curves of a method's runs (finished and cut), cut to the shortest."""
    curves = [r["history"][key] for r in entry["runs"] + entry["cut"] if key in r.get("history", {})]
    if not curves:
        return None
    n = min(len(c) for c in curves)
    return np.array([c[:n] for c in curves], dtype=float)


def _band(ax, curves, label):
    epochs = np.arange(1, curves.shape[1] + 1)
    mean = curves.mean(0)
    ax.plot(epochs, mean, label=f"{label} ({len(curves)} seed{'s' if len(curves) > 1 else ''})")
    if len(curves) > 1:
        std = curves.std(0, ddof=1)
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(methods, path, ylim=(-60, 5)):
    """Validation Δp per epoch, mean ± std over seeds, one line per method."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    curves = {m: c for m in _order(methods) if (c := _histories(methods[m], "val_delta_p")) is not None}
    for m, c in curves.items():
        _band(ax, c, m)
    if ylim is not None and curves:
        ax.set_ylim(max(ylim[0], min(c.min() for c in curves.values()) - 2), ylim[1])
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation Δp (%)")
    ax.set_title("validation Δp, mean ± std over seeds (higher is better)")
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def with_cosines(methods):
    """The methods (in table order) whose finished runs logged the cosines of their task gradients."""
    return [m for m in _order(methods) if any(r.get("cosines") for r in methods[m]["runs"])]


def diagnostic_method(methods):
    """The method whose diagnostics are plotted: DB-MTL if it ran, else the first that logged cosines."""
    logged = with_cosines(methods)
    return "dbmtl" if "dbmtl" in logged else (logged[0] if logged else None)


def plot_diagnostics(methods, path, method=None):
    """The paper's Figures 8-10 for one method: task weights, gradient norms, cosines (means over seeds)."""
    method = method or diagnostic_method(methods)
    if method is None:
        return None
    entry = methods[method]
    runs = [r for r in entry["runs"] if r.get("cosines")]
    tasks = list(runs[0]["test_mae"])
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.6), gridspec_kw=dict(width_ratios=[1, 1, 1, 1.1]))
    for ax, suffix, title in ((axes[0], "_weight", "task weights"),
                              (axes[1], "_gradient_norm", "per-task gradient norms (shared variables)")):
        for i, t in enumerate(tasks):
            curves = _histories(entry, t + suffix)
            if curves is not None:
                ax.plot(np.arange(1, curves.shape[1] + 1), curves.mean(0), label=t, color=plt.get_cmap("tab20")(i % 20))
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_title(f"{method}: {title}")
        ax.legend(fontsize=7, ncol=2)
    ax = axes[2]
    cos = _histories(entry, "mean_cosine")
    if cos is not None:
        _band(ax, cos, "mean pairwise cosine")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cosine")
    twin = ax.twinx()
    conflicts = _histories(entry, "conflicting_pairs")
    if conflicts is not None:
        twin.plot(np.arange(1, conflicts.shape[1] + 1), conflicts.mean(0), color="C3",
                  label=f"conflicting pairs (of {len(tasks) * (len(tasks) - 1) // 2})")
        twin.set_ylabel("pairs with negative cosine", color="C3")
    ax.set_title(f"{method}: cosine of task gradients")
    ax.legend(loc="upper left", fontsize=7)
    twin.legend(loc="upper right", fontsize=7)
    matrix = np.mean([np.asarray(r["cosines"][-1]) for r in runs], axis=0)
    image = axes[3].imshow(matrix, vmin=-1.0, vmax=1.0, cmap="RdBu")
    axes[3].set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    axes[3].set_yticks(range(len(tasks)), tasks)
    for i in range(len(tasks)):
        for j in range(len(tasks)):
            axes[3].text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=6)
    axes[3].set_title(f"{method}: cosines, last epoch ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
    fig.colorbar(image, ax=axes[3])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(methods, title, command, folder="."):
    """The RESULTS.md text (and the figures, written into ``folder``)."""
    lines = [f"# {title}", "", command, ""] + table(methods) + [""] + difference_lines(methods)
    cut = {m: [c["epochs_done"] for c in v["cut"]] for m, v in methods.items() if v["cut"]}
    if cut:
        lines += ["", "Runs cut off before their last epoch (validation curve only, no test figure): "
                  + ", ".join(f"{m} after {'/'.join(map(str, e))} epochs" for m, e in sorted(cut.items())) + "."]
    try:
        plot_curves(methods, os.path.join(folder, "curves.png"))
        lines += ["", "![learning curves](curves.png)"]
        first = diagnostic_method(methods)
        for method in with_cosines(methods):
            name = "diagnostics.png" if method == first else f"diagnostics_{file_part(method)}.png"
            plot_diagnostics(methods, os.path.join(folder, name), method)
            lines += ["", f"![{method}: task weights, gradient norms and cosines]({name})"]
    except ImportError as err:  # matplotlib is optional: the table holds every number
        lines += ["", f"(no plots: {err})"]
    return "\n".join(lines) + "\n"


def write(folder, title, baselines=None):
    methods = load(folder)
    command = ("Made by `python -m applications.qm9.report " + folder.rstrip("/")
               + (f" --baselines {baselines}" if baselines else "") + "` from the per-run JSON files in this folder "
               "(test MAE in the paper's units; Δp against the " + (f"STL baselines `{baselines}`" if baselines else
                                                                    "preset's STL baselines")
               + "; the epoch is chosen on validation Δp; std is the sample std over seeds).")
    if baselines:
        with open(baselines) as fh:
            changed = rebase(methods, json.load(fh))
        command += (" Against these baselines every run keeps the epoch it chose in training." if not changed else
                    " Against these baselines these runs would choose another epoch (their figures are those of "
                    "the epoch chosen in training): " + ", ".join(f"{m} seed {s} ({a} → {b})" for m, s, a, b in changed)
                    + ".")
    text = markdown(methods, title, command, folder)
    with open(os.path.join(folder, "RESULTS.md"), "w") as fh:
        fh.write(text)
    return text


def merge_stl(paths, out):
    """One STL-baselines file from several (e.g. one per seed, trained in parallel processes): every run kept, the
    baseline of a target the mean of its test (and best validation) MAE over all runs. The inputs must share the
    preset's configuration apart from the seeds, and no (seed, target) may appear twice."""
    docs = []
    for path in paths:
        with open(path) as fh:
            docs.append(json.load(fh))

    def config(doc):
        return {k: v for k, v in doc["config"].items() if k != "seeds"}

    for path, doc in zip(paths[1:], docs[1:]):
        if config(doc) != config(docs[0]) or doc["split_seed"] != docs[0]["split_seed"]:
            raise ValueError(f"{path}: another configuration than {paths[0]} (compare their 'config'); only files of "
                             "one preset and split can be merged.")
    runs = [run for doc in docs for run in doc["runs"]]
    keys = [(run["seed"], run["task"]) for run in runs]
    if len(set(keys)) != len(keys):
        raise ValueError("the same (seed, target) appears in two files: " + ", ".join(map(str, sorted(
            {k for k in keys if keys.count(k) > 1}))))
    tasks = list(docs[0]["test"])
    merged = dict(docs[0], command=[doc["command"] for doc in docs],
                  seeds=sorted({run["seed"] for run in runs}), runs=runs,
                  test={t: float(np.mean([r["test_mae"] for r in runs if r["task"] == t])) for t in tasks},
                  val={t: float(np.mean([r["val_mae"] for r in runs if r["task"] == t])) for t in tasks},
                  merged_from=[os.path.basename(os.path.dirname(os.path.abspath(p))) + "/" + os.path.basename(p)
                               for p in paths])
    with open(out, "w") as fh:
        json.dump(merged, fh, indent=1)
    return merged


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m applications.qm9.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="folder of run files (or, with --merge-stl, the merged file to write)")
    parser.add_argument("--title", default="QM9 learning curves")
    parser.add_argument("--baselines", default=None, metavar="FILE",
                        help="test Δp against these STL baselines instead of those the runs were trained with "
                             "(cosine-schedule runs only; the epoch choice is checked against them)")
    parser.add_argument("--merge-stl", dest="merge_stl", nargs="+", metavar="FILE", default=None,
                        help="merge these stl_baselines_<preset>.json files (e.g. one per seed) into FOLDER")
    args = parser.parse_args(argv)
    if args.merge_stl:
        merged = merge_stl(args.merge_stl, args.folder)
        print(f"{args.folder}: {len(merged['runs'])} runs, seeds {merged['seeds']}")
        return
    print(write(args.folder, args.title, args.baselines))


if __name__ == "__main__":
    main()
