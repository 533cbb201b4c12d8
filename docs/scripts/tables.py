"""Markdown tables made from the stored results, at build time: nothing in them is typed by hand.

Each function returns Markdown. A page asks for one with a marker line `<!-- gen:NAME -->`, which
`docs/scripts/hooks.py` replaces (NAME is a key of `GENERATORS`). Sources:

- `benchmarks/results/step_<mode>.json`, `memory.json`: `python benchmarks/run_all.py` (benchmarks/README.md);
- `applications/qm9/results_<preset>/run_*_seed<s>.json` with `applications/qm9/stl_baselines_<preset>.json`:
  the QM9 runs (Δp recomputed against those baselines exactly as `python -m applications.qm9.report FOLDER
  --baselines FILE` does; the GPU 80-epoch runs keep their stored Δp, as their report did);
- `benchmarks/results/quickstart/<backend>.json`: `python examples/quickstart.py`.

`python docs/scripts/tables.py quickstart` prints the quickstart table; `--write-readme` puts it into README.md
between its `<!-- quickstart-table -->` markers (tests/test_docs.py checks the README's copy is current).
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import api  # noqa: E402

ROOT = api.ROOT
RESULTS = ROOT / "benchmarks" / "results"
QM9 = ROOT / "applications" / "qm9"
QUICKSTART = RESULTS / "quickstart"
BACKENDS = ("jax", "torch", "tensorflow")
STEP_MODES = ("jax", "torch", "tf-xla", "tf-graph")
QM9_PRESETS = {  # folder -> (what it is, baselines file or None to keep the stored Δp)
    "results_quick": ("quick preset (4,000 molecules, 12 epochs, CPU, JAX)", "stl_baselines_quick.json"),
    "results_medium": ("medium preset (8,000 molecules, 20 epochs, CPU, JAX)", "stl_baselines_medium.json"),
    "results_gpu_quick_80": ("quick model, 80 epochs (H200 GPU, JAX)", None),
}
RUN_NAME = re.compile(r"run_(?P<tag>.+)_seed(?P<seed>\d+)\.json$")


def _json(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def mean_std(values):
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _pm(values, digits=2):
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _minus(text):
    return text.replace("-", "−")


# ------------------------------------------------------------------------------------------------- benchmarks

def step_results():
    """mode -> model -> {"ew_ms": ..., "rows": {balancer: row}} from benchmarks/results/step_<mode>.json."""
    out = {}
    for mode in STEP_MODES:
        path = RESULTS / f"step_{mode}.json"
        if not path.exists():
            continue
        for result in _json(path)["results"]:
            if result["mode"] != mode:
                continue
            out.setdefault(mode, {})[result["model"]] = {
                "ew_ms": result["ew_ms"], "floor": result.get("floor"), "threads": result.get("threads"),
                "rows": {row["balancer"]: row for row in result["rows"]}}
    return out


def memory_results():
    """(impl, backend, model) -> {method: peak_mb} from benchmarks/results/memory.json."""
    path = RESULTS / "memory.json"
    out = {}
    if path.exists():
        for r in _json(path)["results"]:
            out.setdefault((r["impl"], r["backend"], r["model"]), {})[r["method"]] = r["peak_mb"]
    return out


def step_table():
    steps = step_results()
    models = sorted({m for mode in steps.values() for m in mode})
    lines = []
    for model in models:
        balancers = []
        for mode in steps.values():
            for name in mode.get(model, {}).get("rows", {}):
                if name not in balancers:
                    balancers.append(name)
        modes = [m for m in STEP_MODES if model in steps.get(m, {})]
        lines += [f"**{model}** — step time × EW's (EW's step in ms in the header; floor = 1 forward + T backward "
                  "passes, × EW)", "",
                  "| balancer | " + " | ".join(f"{m} (EW {steps[m][model]['ew_ms']:.2f} ms)" for m in modes) + " |",
                  "|---|" + "---|" * len(modes)]
        for name in balancers:
            cells = []
            for m in modes:
                row = steps[m][model]["rows"].get(name)
                cells.append("—" if row is None else f"{row['ratio_to_ew']:.2f}")
            lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
        lines.append("| *floor* | " + " | ".join(
            "—" if steps[m][model]["floor"] is None else f"{steps[m][model]['floor']:.2f}" for m in modes) + " |")
        lines.append("")
    return "\n".join(lines) if lines else "*No stored step-time results (benchmarks/results/step_*.json).*"


def memory_table():
    memory = memory_results()
    if not memory:
        return "*No stored memory results (benchmarks/results/memory.json).*"
    lines = ["| implementation | backend | model | EW peak (MB) | DB-MTL peak (MB) | DB-MTL / EW |", "|---|---|---|---|---|---|"]
    for (impl, backend, model), methods in sorted(memory.items()):
        ew, db = methods.get("ew"), methods.get("dbmtl")
        ratio = f"{db / ew:.2f}" if ew and db else "—"
        lines.append(f"| {impl} | {backend} | {model} | {ew:.0f} | {db:.0f} | {ratio} |" if ew and db
                     else f"| {impl} | {backend} | {model} | {ew or '—'} | {db or '—'} | {ratio} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- QM9

def _delta_p(maes, baselines):
    """The paper's Eq. 3 for MAEs (lower is better): −100 · mean_t (m_t − b_t) / b_t."""
    return -100.0 * sum((maes[t] - b) / b for t, b in baselines.items()) / len(baselines)


def qm9_runs(folder):
    """tag -> list of runs (seed order), each with `delta_p` against the folder's baselines and its seed."""
    _, baselines_file = QM9_PRESETS[folder]
    stored = _json(QM9 / baselines_file) if baselines_file else None
    baselines = stored["test"] if stored else None
    val_baselines = (stored.get("val") or stored["test"]) if stored else None
    runs = {}
    for path in sorted((QM9 / folder).glob("run_*_seed*.json")):
        match = RUN_NAME.search(path.name)
        run = _json(path)
        if baselines is not None:
            run["delta_p"] = _delta_p(run["test_mae"], baselines)
            epoch = run["best_epoch"] - 1
            run["val_delta_p"] = _delta_p({t: run["history"][f"val_{t}_mae"][epoch] for t in val_baselines},
                                          val_baselines)
        run["seed"] = int(match["seed"])
        run["tag"] = match["tag"]
        runs.setdefault(match["tag"], []).append(run)
    for tag in runs:
        runs[tag].sort(key=lambda r: r["seed"])
    return runs


def _balancer_of(tag, runs):
    setting = runs[0].get("setting") or {}
    return setting.get("balancer") or runs[0].get("balancer") or tag.split("_")[0].split("-")[0]


def _every(runs):
    return int((runs[0].get("config") or {}).get("task_gradients_every", 1) or 1)


def _label(tag, runs):
    setting = runs[0].get("setting") or {}
    return setting.get("label") or tag


def _val(runs):
    values = [r.get("val_delta_p") for r in runs]
    return None if any(v is None for v in values) else mean_std(values)[0]


def qm9_table(folder):
    runs = qm9_runs(folder)
    what, baselines = QM9_PRESETS[folder]
    lines = [f"*{what}; {len(runs)} settings; test Δp (%) against "
             + (f"`applications/qm9/{baselines}`" if baselines else "the runs' stored baselines")
             + ", mean ± sample std over seeds; higher is better.*", "",
             "| setting | seeds | test Δp (%) | per seed | validation Δp (%) | paper, Table 3 (full data, 300 epochs) |",
             "|---|---|---|---|---|---|"]
    paper = paper_table3()
    order = sorted(runs, key=lambda t: -mean_std([r["delta_p"] for r in runs[t]])[0])
    for tag in order:
        rs = runs[tag]
        val = _val(rs)
        lines.append(f"| `{_label(tag, rs)}` | {len(rs)} | {_minus(_pm([r['delta_p'] for r in rs]))} | "
                     + _minus(", ".join(f"{r['delta_p']:.2f}" for r in rs)) + " | "
                     + ("—" if val is None else _minus(f"{val:.2f}")) + " | "
                     + (paper.get(_balancer_of(tag, rs), "—") if _every(rs) == 1 else "—") + " |")
    return "\n".join(lines)


def paper_table3():
    """Registered name -> the paper's Table 3 test Δp ("mean ± std", 3 runs), from tests/data/paper_tables."""
    import csv

    path = ROOT / "tests" / "data" / "paper_tables" / "qm9_table3.csv"
    if not path.exists():
        return {}
    rows = csv.DictReader(line for line in path.read_text(encoding="utf-8").splitlines() if not line.startswith("#"))
    key = lambda name: re.sub(r"[^a-z0-9]", "", name.lower())  # noqa: E731 - "Nash-MTL" ~ "nash_mtl"
    names = {key(b["name"]): b["name"] for b in api.balancers()}
    return {names[key(r["method"])]: _minus(r["delta_p"]) for r in rows if key(r["method"]) in names}


def qm9_by_balancer():
    """balancer -> list of (preset folder, label, runs, is_default) for exact (k = 1) runs."""
    out = {}
    for folder in QM9_PRESETS:
        if not (QM9 / folder).exists():
            continue
        for tag, runs in qm9_runs(folder).items():
            if _every(runs) != 1:
                continue
            name = _balancer_of(tag, runs)
            kwargs = (runs[0].get("setting") or {}).get("kwargs") or {}
            out.setdefault(name, []).append((folder, _label(tag, runs), runs, not kwargs))
    return out


def _qm9_cell(entries):
    """The default setting of each preset and, if another setting was better on validation Δp, that one."""
    if not entries:
        return "—"
    parts = []
    for folder in QM9_PRESETS:
        here = [e for e in entries if e[0] == folder]
        if not here:
            continue
        short = folder.replace("results_", "").replace("gpu_quick_80", "GPU 80 ep.")
        chosen = [e for e in here if e[3]]
        best = max(here, key=lambda e: _val(e[2]) if _val(e[2]) is not None else -1e9)
        if best not in chosen:
            chosen.append(best)
        for _, label, runs, default in chosen:
            dp = [r["delta_p"] for r in runs]
            note = "" if default else f" `{label.split('[', 1)[-1].rstrip(']')}`" + (" best on val." if len(here) > 1 else "")
            parts.append(f"{short}: {_minus(_pm(dp))} ({len(runs)}){note}")
    return "<br>".join(parts)


# ----------------------------------------------------------------------------------------------------- chooser

SHORT_COST = {"loss": "1 bwd", "Gramian": "T bwd + Gramian", "Jacobian": "T bwd + Jacobian"}
KIND_ORDER = {"loss": 0, "Gramian": 1, "Jacobian": 2}


def chooser_table():
    steps = step_results()
    memory = memory_results()
    qm9 = qm9_by_balancer()
    paper = paper_table3()
    dense = {mode: steps.get(mode, {}).get("dense-T11", {}).get("rows", {}) for mode in ("jax", "torch")}
    big = {mode: steps.get(mode, {}).get("qm9", {}).get("rows", {}) for mode in ("jax", "torch")}
    mem = memory.get(("keras", "jax", "qm9"), {})
    lines = ["| balancer | kind | cost per step | step × EW dense-T11 JAX / torch | step × EW QM9 model JAX / torch "
             "| memory × EW QM9 (JAX) | state | QM9 test Δp (%) (seeds) | paper Table 3 Δp (%) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for b in sorted(api.balancers(), key=lambda b: (KIND_ORDER[b["kind"]], b["name"])):
        name = b["name"]

        def ratio(table):
            row = table.get(name)
            return "—" if row is None else f"{row['ratio_to_ew']:.2f}"

        def pair(tables):
            cells = [ratio(tables["jax"]), ratio(tables["torch"])]
            return "—" if cells == ["—", "—"] else " / ".join(cells)

        state = ", ".join(f"`{n}` {shape}{' (learned)' if kind == 'learned' else ''}" for n, shape, kind in b["state"])
        peak = f"{mem[name] / mem['ew']:.2f}" if name in mem and "ew" in mem else "—"
        lines.append(
            f"| [`{name}`](reference/balancers/{b['module']}.md) | {b['kind']} | {SHORT_COST[b['kind']]} | "
            f"{pair(dense)} | {pair(big)} | {peak} | {state or '—'} | {_qm9_cell(qm9.get(name, []))} | "
            f"{paper.get(name, '—')} |")
    return "\n".join(lines)


def balancer_list():
    lines = ["| name | class | kind | method and paper | hyperparameters (defaults) |", "|---|---|---|---|---|"]
    for b in api.balancers():
        params = ", ".join(f"`{p}={d}`" for p, d, _ in b["parameters"] if p not in ("loss_transform", "eps"))
        lines.append(f"| [`{b['name']}`](reference/balancers/{b['module']}.md) | `{b['class']}` | {b['kind']} | "
                     f"{b['title']} | {params or '—'} |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- quickstart

def quickstart_results():
    return {backend: _json(QUICKSTART / f"{backend}.json") for backend in BACKENDS
            if (QUICKSTART / f"{backend}.json").exists()}


def quickstart_table(figure_path=None):
    results = quickstart_results()
    if not results:
        return ("*The quickstart's stored results (`benchmarks/results/quickstart/<backend>.json`, written by "
                "`python examples/quickstart.py`) are not in this checkout yet; the table appears here once they "
                "are.*")
    first = next(iter(results.values()))
    tasks = first["tasks"]
    lines = [f"`python examples/quickstart.py`: {first['metric']}, mean ± std over seeds (lower is better).", "",
             "| backend | seeds | epochs | run time | method | " + " | ".join(tasks) + " |",
             "|---|---|---|---|---|" + "---|" * len(tasks)]
    for backend, r in results.items():
        for i, (method, per_task) in enumerate(r["final"].items()):
            label = {"ew": "EW", "dbmtl": "DB-MTL"}.get(method, method)
            head = ([backend, str(len(r["seeds"])), str(r["epochs"]), f"{r['seconds']:.1f} s"] if i == 0
                    else ["", "", "", ""])
            values = [_pm(per_task[t], 3) if t in per_task else "—" for t in tasks]
            lines.append("| " + " | ".join(head + [label] + values) + " |")
    lines.append("")
    if figure_path and (QUICKSTART / "quickstart.png").exists():
        lines.append(f"![Quickstart: validation error per epoch, EW and DB-MTL]({figure_path})")
    return "\n".join(lines).rstrip() + "\n"


def dependencies():
    """The README's dependency table, the one source of it."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Dependencies and why"):].split("\n", 1)[1]
    table = []
    for line in section.splitlines():
        if line.startswith("|"):
            table.append(line)
        elif table:
            break
    return "\n".join(table)


GENERATORS = {
    "dependencies": dependencies,
    "chooser": chooser_table,
    "balancers": balancer_list,
    "step-times": step_table,
    "memory": memory_table,
    "quickstart": lambda: quickstart_table("assets/quickstart/quickstart.png"),
    **{f"qm9-{folder.replace('results_', '')}": (lambda f=folder: qm9_table(f)) for folder in QM9_PRESETS},
}

README_MARKERS = ("<!-- quickstart-table: generated by `python docs/scripts/tables.py quickstart --write-readme`; "
                  "do not edit -->", "<!-- /quickstart-table -->")


def readme_block():
    return README_MARKERS[0] + "\n" + quickstart_table("benchmarks/results/quickstart/quickstart.png") \
        + README_MARKERS[1]


def write_readme():
    path = ROOT / "README.md"
    text = path.read_text(encoding="utf-8")
    start, end = text.index(README_MARKERS[0]), text.index(README_MARKERS[1]) + len(README_MARKERS[1])
    path.write_text(text[:start] + readme_block() + text[end:], encoding="utf-8")


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] not in GENERATORS:
        sys.exit(f"usage: python docs/scripts/tables.py {{{','.join(GENERATORS)}}} [--write-readme]")
    if args[0] == "quickstart" and "--write-readme" in args:
        write_readme()
    else:
        print(GENERATORS[args[0]]())
