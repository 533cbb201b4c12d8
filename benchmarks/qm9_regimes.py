"""How far each QM9 regime is from the paper's, target by target: MTL test MAE / STL test MAE per target (the
paper's Table 3 gap, Δp = −100 · mean of (ratio − 1)) and the STL models' own MAE against the paper's STL.

    python benchmarks/qm9_regimes.py NAME=RESULTS_FOLDER:STL_BASELINES.json ... [--methods ew,dbmtl_beta0.1]

e.g. (the stored quick and medium runs):

    python benchmarks/qm9_regimes.py \\
        quick=applications/qm9/results_quick:applications/qm9/stl_baselines_quick.json \\
        medium=applications/qm9/results_medium:applications/qm9/stl_baselines_medium.json

Prints a markdown table: one row per (regime, method) with the mean over seeds of each target's ratio, and the
paper's rows (`tests/data/paper_tables/qm9_table3.csv`, full data, 300 epochs) for comparison. A ratio above 1 is a
target on which the multi-task model is worse than its single-task model; Table 3's EW is above 1 on every target
and 8.8 on R2.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from applications.qm9 import report  # noqa: E402

# applications.qm9.data.TARGETS, written out: importing that module loads Keras, which this script does not need
TARGETS = ("mu", "alpha", "homo", "lumo", "r2", "zpve", "u0", "u", "h", "g", "cv")
PAPER_COLUMNS = ("mu", "alpha", "eps_HOMO", "eps_LUMO", "R2", "ZPVE", "U0", "U", "H", "G", "c_v")
PAPER_TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "paper_tables",
                           "qm9_table3.csv")


def paper_rows(path=PAPER_TABLE, methods=("STL", "EW", "DB-MTL", "Nash-MTL", "MGDA", "PCGrad")):
    """{method: {target: MAE}} from the paper's Table 3 (the CSV's first line is a comment)."""
    if not os.path.isfile(path):
        return {}
    with open(path) as fh:
        lines = [line for line in fh if not line.startswith("#")]
    rows = {r["method"]: r for r in csv.DictReader(lines)}
    return {m: {t: float(rows[m][c]) for t, c in zip(TARGETS, PAPER_COLUMNS)} for m in methods if m in rows}


def ratios(maes, stl):
    return {t: maes[t] / stl[t] for t in TARGETS}


def regime_rows(name, folder, stl_path, methods):
    """(label, seeds, {target: mean ratio}, (Δp mean, std)) per method found in the folder, rebased on stl_path."""
    with open(stl_path) as fh:
        stl = json.load(fh)
    found = report.load(folder)
    rows = []
    for method in methods:
        runs = found.get(method, {}).get("runs", [])
        if not runs:
            continue
        per_seed = [ratios(r["test_mae"], stl["test"]) for r in runs]
        mean = {t: float(np.mean([p[t] for p in per_seed])) for t in TARGETS}
        rows.append((f"{name} {method}", len(runs), mean,
                     report.mean_std([report.delta_p_of_maes(r["test_mae"], stl["test"]) for r in runs])))
    return rows, stl["test"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("regimes", nargs="+", help="NAME=RESULTS_FOLDER:STL_BASELINES.json")
    parser.add_argument("--methods", default="ew,dbmtl_beta0.1,dbmtl,mgda,pcgrad,nash_mtl,famo,upgrad")
    parser.add_argument("--paper", default=PAPER_TABLE, help="the paper's Table 3 CSV")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    paper = paper_rows(args.paper)
    head = "| regime, method | seeds | " + " | ".join(TARGETS) + " | Δp (%) |"
    lines = ["MTL test MAE / STL test MAE per target (mean over seeds); Δp mean ± sample std over seeds.", "",
             head, "|" + "---|" * (len(TARGETS) + 3)]
    stl_lines = ["", "STL test MAE / the paper's STL test MAE per target (how far each regime's single-task models "
                 "are from the paper's).", "", "| regime | " + " | ".join(TARGETS) + " |",
                 "|" + "---|" * (len(TARGETS) + 1)]
    for spec in args.regimes:
        name, _, paths = spec.partition("=")
        folder, _, stl_path = paths.partition(":")
        rows, stl = regime_rows(name, folder, stl_path, methods)
        for label, seeds, mean, (dp, sd) in rows:
            lines.append(f"| {label} | {seeds} | " + " | ".join(f"{mean[t]:.2f}" for t in TARGETS)
                         + f" | {dp:.1f} ± {sd:.1f} |")
        if "STL" in paper:
            stl_lines.append(f"| {name} | " + " | ".join(f"{stl[t] / paper['STL'][t]:.0f}" for t in TARGETS) + " |")
    for method, maes in paper.items():
        if method == "STL":
            continue
        r = ratios(maes, paper["STL"])
        lines.append(f"| paper {method} | 3 | " + " | ".join(f"{r[t]:.2f}" for t in TARGETS)
                     + f" | {report.delta_p_of_maes(maes, paper['STL']):.1f} |")
    print("\n".join(lines + (stl_lines if paper else [])))


if __name__ == "__main__":
    main()
