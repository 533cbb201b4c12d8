"""Turns the JSON written by run_all.py into benchmarks/RESULTS.md and the PNG figures (matplotlib, Agg)."""

from __future__ import annotations

import math
import os

from benchmarks import common

MODE_ORDER = ("tf-graph", "tf-xla", "tf-eager", "torch", "jax")
COMPILED = ("tf-graph", "tf-xla", "torch", "jax")
MODEL_ORDER = ("qm9", "conv", "dense-T2", "dense-T3", "dense-T11", "dense-T40")
TARGET = 1.15
MODE_LABEL = {
    "tf-graph": "TF graph", "tf-xla": "TF XLA", "tf-eager": "TF eager", "torch": "torch", "jax": "JAX jit",
}


def _load(out_dir, prefix):
    results = {}
    if not os.path.isdir(out_dir):
        return results
    for fname in sorted(os.listdir(out_dir)):
        if fname.startswith(prefix) and fname.endswith(".json"):
            results[fname[len(prefix):-5]] = common.read_json(os.path.join(out_dir, fname))
    return results


def _fmt(value, digits=2):
    if value is None or (isinstance(value, float) and (math.isnan(value) or math.isinf(value))):
        return "–"
    if isinstance(value, str):
        return value
    if abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.{digits}f}"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _model_key(name):
    return MODEL_ORDER.index(name) if name in MODEL_ORDER else len(MODEL_ORDER)


def _step_results(step):
    """dict (model, mode) -> result dict."""
    table = {}
    for payload in step.values():
        for result in payload["results"]:
            table[(result["model"], result["mode"])] = result
    return table


def _row(result, balancer):
    for row in result.get("rows", []):
        if row["balancer"] == balancer:
            return row
    return None


def _dbmtl_variant(result):
    for row in result.get("rows", []):
        if row["balancer"].startswith("dbmtl[vectorize="):
            return row
    return None


# --------------------------------------------------------------------------- figures


def _figures(step, jac, libmtl, memory, fig_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(fig_dir, exist_ok=True)
    written = []
    results = _step_results(step)
    models = sorted({m for m, _ in results}, key=_model_key)
    modes = [m for m in MODE_ORDER if any(k[1] == m for k in results)]

    # 1. DB-MTL / EW against the floor, per model and mode.
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / max(1, len(modes))
    for i, mode in enumerate(modes):
        xs, ys, floors = [], [], []
        for j, model in enumerate(models):
            r = results.get((model, mode))
            row = _row(r, "dbmtl") if r and not r.get("pending") else None
            if row:
                xs.append(j + (i - (len(modes) - 1) / 2) * width)
                ys.append(row["ratio_to_ew"])
                floors.append(r["floor"])
        if xs:
            ax.bar(xs, ys, width, label=f"DB-MTL / EW, {MODE_LABEL[mode]}")
            ax.scatter(xs, floors, marker="_", s=200, color="k", zorder=3)
            ax.scatter(xs, [f * TARGET for f in floors], marker="_", s=200, color="r", zorder=3)
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels([f"{m}\nT={common.num_tasks_of(m)}" for m in models])
    ax.set_yscale("log")
    ax.set_ylabel("step time / EW step time")
    ax.set_title("DB-MTL step / EW step (bars), floor (F + T B)/(F + B) (black), 1.15 x floor (red)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(fig_dir, "dbmtl_vs_floor.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    # 2. Every balancer / EW on the sweep models.
    for model in models:
        sweep = [results[(model, m)] for m in modes if (model, m) in results and results[(model, m)].get("sweep") == "all"]
        if not sweep:
            continue
        names = [row["balancer"] for row in sweep[0]["rows"] if "[" not in row["balancer"]]
        fig, ax = plt.subplots(figsize=(10, 0.28 * len(names) * max(1, len(sweep)) / 2 + 2))
        height = 0.8 / len(sweep)
        for i, r in enumerate(sweep):
            values = [(_row(r, n) or {}).get("ratio_to_ew", float("nan")) for n in names]
            ax.barh([k + (i - (len(sweep) - 1) / 2) * height for k in range(len(names))], values, height,
                    label=MODE_LABEL[r["mode"]])
            ax.axvline(r["floor"], linestyle="--", linewidth=1, color=f"C{i}")
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("step time / EW step time (dashed: floor of each mode)")
        ax.set_title(f"{model} (T={common.num_tasks_of(model)}): every registered balancer")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(fig_dir, f"balancers_{model}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    # 3. Scaling with T (dense encoder): DB-MTL / EW and floor.
    dense = sorted([m for m in models if m.startswith("dense-T")], key=common.num_tasks_of)
    if len(dense) > 1:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, mode in enumerate(m for m in modes if m != "tf-eager"):
            ts, ys, fl = [], [], []
            for model in dense:
                r = results.get((model, mode))
                row = _row(r, "dbmtl") if r else None
                if row:
                    ts.append(common.num_tasks_of(model))
                    ys.append(row["ratio_to_ew"])
                    fl.append(r["floor"])
            if ts:
                ax.plot(ts, ys, "o-", color=f"C{i}", label=f"DB-MTL / EW, {MODE_LABEL[mode]}")
                ax.plot(ts, fl, ":", color=f"C{i}", label=f"floor, {MODE_LABEL[mode]}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("number of tasks T (dense encoder)")
        ax.set_ylabel("step time / EW step time")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(fig_dir, "scaling_tasks.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    # 4. Jacobian: vectorised / looped.
    jrows = [r for payload in jac.values() for r in payload["results"] if "vectorized_over_looped" in r]
    if jrows:
        jmodels = sorted({r["model"] for r in jrows}, key=_model_key)
        jmodes = [m for m in MODE_ORDER if any(r["mode"] == m for r in jrows)]
        fig, ax = plt.subplots(figsize=(9, 4))
        width = 0.8 / len(jmodes)
        for i, mode in enumerate(jmodes):
            xs, ys = [], []
            for j, model in enumerate(jmodels):
                for r in jrows:
                    if r["mode"] == mode and r["model"] == model:
                        xs.append(j + (i - (len(jmodes) - 1) / 2) * width)
                        ys.append(r["vectorized_over_looped"])
            ax.bar(xs, ys, width, label=MODE_LABEL[mode])
        ax.axhline(1.0, color="k", linewidth=1)
        ax.set_xticks(range(len(jmodels)))
        ax.set_xticklabels(jmodels)
        ax.set_yscale("log")
        ax.set_ylabel("vectorised / looped Jacobian time (<1: vectorised faster)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(fig_dir, "jacobian_vectorized_over_looped.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    # 5. keras_dbmtl (torch backend) / plain PyTorch.
    lrows = [r for payload in libmtl.values() for r in payload["results"] if not r.get("pending")]
    if lrows:
        lrows = sorted(lrows, key=lambda r: _model_key(r["model"]))
        fig, ax = plt.subplots(figsize=(8, 4))
        xs = range(len(lrows))
        ax.bar([x - 0.2 for x in xs], [r["dbmtl_keras_over_plain"] for r in lrows], 0.4, label="DB-MTL")
        ax.bar([x + 0.2 for x in xs], [r["ew_keras_over_plain"] for r in lrows], 0.4, label="EW")
        ax.axhline(1.0, color="k", linewidth=1)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([r["model"] for r in lrows])
        ax.set_ylabel("keras_dbmtl (torch) / plain PyTorch step time")
        ax.legend()
        fig.tight_layout()
        path = os.path.join(fig_dir, "keras_over_plain_torch.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    # 6. Memory: run peak of DB-MTL and EW.
    mrows = [r for payload in memory.values() for r in payload["results"] if "error" not in r]
    if mrows:
        keys = sorted({(r["model"], r["impl"], r["mode"]) for r in mrows}, key=lambda k: (_model_key(k[0]), k[1], k[2]))
        fig, ax = plt.subplots(figsize=(10, 4.5))
        for method, offset in (("ew", -0.2), ("dbmtl", 0.2)):
            values = []
            for key in keys:
                match = [r for r in mrows if (r["model"], r["impl"], r["mode"]) == key and r["method"] == method]
                values.append(_run_peak(match[0]) if match else float("nan"))
            ax.bar([k + offset for k in range(len(keys))], values, 0.4, label=method)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([f"{m}\n{i} {mo}" for m, i, mo in keys], fontsize=7)
        ax.set_ylabel("peak RSS over the run - RSS before the model (MiB)")
        ax.legend()
        fig.tight_layout()
        path = os.path.join(fig_dir, "memory.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _run_peak(r):
    """Peak RSS over the whole run (building, compiling, steps) above the RSS before the model existed."""
    return max(r["setup_peak_mb"], r.get("rss_after_setup_mb", r["rss_before_mb"]) - r["rss_before_mb"]
               + r["step_peak_mb"])


# --------------------------------------------------------------------------- markdown


PEAK_COMMAND = ("C=$(for m in torch:torch tensorflow:tf-graph tensorflow:tf-xla jax:jax; do for b in ew dbmtl; "
                "do printf keras:$m:qm9-paper:$b,; done; done); python benchmarks/memory.py --configs ${C%,} "
                "--json benchmarks/results/qm9_paper_memory/memory_after.json")


def _peak_by_mode(payload):
    peaks = {}
    for r in payload.get("results", []):
        if "error" not in r:
            peaks.setdefault(r["mode"], {})[r["method"]] = r["peak_mb"]
    return peaks


def _qm9_paper_memory(folder, add):
    """Issue 18's peak-memory table (the paper's QM9 model, EW / DB-MTL, before and after the sequential rows) and
    the step times behind it, from benchmarks/results/qm9_paper_memory/ when present."""
    before_path, after_path = os.path.join(folder, "memory_before.json"), os.path.join(folder, "memory_after.json")
    if not (os.path.exists(before_path) and os.path.exists(after_path)):
        return
    before, after = _peak_by_mode(common.read_json(before_path)), _peak_by_mode(common.read_json(after_path))
    add("### DB-MTL / EW peak memory on the paper's QM9 model (qm9-paper)")
    add("")
    add("The paper's MPNN (dim 64, edge network 128, complete graphs, Set2Set 3) at batch 32 (`qm9-paper`); `peak` = "
        "the process's peak RSS (MB) from the framework's import to the last of 3 timed steps (`peak_mb` of "
        "`benchmarks/memory.py`, one fresh process per cell). *Before*: the T = 11 Jacobian rows pulled by an "
        "unrolled Python loop (JAX and TF XLA keep the 11 backward passes alive together, TF graph as well); "
        "*after*: one sequential map over the one-hot cotangents (`jax.lax.map`, `tf.map_fn` with "
        "parallel_iterations=1; torch unchanged). Commands: `" + PEAK_COMMAND + "` on the code after; "
        "`memory_before.json`: the same on commit 8660c64's package (the rows unrolled) with this change's "
        "`benchmarks/`.")
    add("")
    rows = []
    for mode in ("torch", "tf-graph", "tf-xla", "jax"):
        b, a = before.get(mode, {}), after.get(mode, {})
        cells = [MODE_LABEL.get(mode, mode)]
        for peaks in (b, a):
            ew, db = peaks.get("ew"), peaks.get("dbmtl")
            cells += [_fmt(ew, 0), _fmt(db, 0), _fmt(db / ew) if ew and db else "–"]
        rows.append(cells)
    add(_table(["mode", "EW before", "DB-MTL before", "ratio before", "EW after", "DB-MTL after", "ratio after"],
               rows))
    add("")
    add("What held it: XLA's account of the compiled JAX step (`KERAS_BACKEND=jax python "
        "benchmarks/jax_memory_analysis.py --model qm9-paper --balancer dbmtl [--unrolled]`, `--balancer ew`): "
        "temporaries 4,479 MB with the rows unrolled, 420 MB with the map, 609 MB for EW. The largest tensors are "
        "the edge network's per-edge 64 × 64 matrices and their gradients ((12,288, 4,096) float32, 192 MiB each); "
        "the unrolled program held one set per task. The same program has 11 gradient products of the edge "
        "network's output kernel (one per task; 1, inside the loop, with the map): the pull of sum_t l_t that "
        "gives the heads their gradients does not reach the encoder in the compiled step (XLA removes the unused "
        "part), so JAX runs 11 backward passes through the encoder, not 12. TensorFlow's 11 `tape.gradient` calls "
        "in one graph behaved alike (graph and XLA). torch frees each backward pass's temporaries as it goes and "
        "needed no change. Run-to-run noise of a peak here: about ±50 MB (JAX EW 1,867 and 1,915 on the same code).")
    add("")
    steps = _load(folder, "step_")
    trows = []
    for payload in steps.values():
        for res in payload.get("results", []):
            if res.get("pending"):
                continue
            by = {r["balancer"]: r for r in res["rows"]}
            seq, unrolled = by.get("dbmtl"), by.get("dbmtl[unrolled]")
            if seq is None:
                continue
            # torch has no sequential map (its rows are a Python loop that frees each pass): no "unrolled" variant
            trows.append([res["model"], MODE_LABEL.get(res["mode"], res["mode"]), _fmt(res["ew_ms"], 0),
                          _fmt(unrolled and unrolled["ms"], 0), _fmt(seq["ms"], 0),
                          _fmt(unrolled and unrolled["ratio_to_ew"]), _fmt(seq["ratio_to_ew"]),
                          _fmt(res["floor"]), str(seq["samples"])])
    if trows:
        add("CPU step time (ms, median CPU time, 1 thread, calls interleaved in one process): DB-MTL with the rows "
            "unrolled (`dbmtl[unrolled]`, before) and with the sequential map (after), `python "
            "benchmarks/step_time.py --backend B --models M --balancers ew,dbmtl --jacobian-variants unrolled "
            "--repeats 6 --rounds 3 --json benchmarks/results/qm9_paper_memory/step_M_B.json` (`qm9`: the quick "
            "preset, dim 32, edge network 64, bonded edges, batch 64; qm9-paper with --repeats 3). Measured on a "
            "machine loaded by other jobs: CPU time per step, the columns of a row interleaved.")
        add("")
        add(_table(["model", "mode", "EW ms", "DB-MTL unrolled ms", "DB-MTL map ms", "unrolled / EW", "map / EW",
                    "floor", "samples"], trows))
        add("")


def write(out_dir, results_md, fig_dir, command):
    step = _load(out_dir, "step_")
    jac = _load(out_dir, "jacobian_")
    libmtl = _load(out_dir, "libmtl_torch")
    memory = _load(out_dir, "memory")
    run = common.read_json(os.path.join(out_dir, "run.json")) if os.path.exists(os.path.join(out_dir, "run.json")) else {}
    figures = _figures(step, jac, libmtl, memory, fig_dir)
    md_dir = os.path.dirname(os.path.abspath(results_md))
    results = _step_results(step)
    versions = {}
    for payload in list(step.values()) + list(libmtl.values()):
        versions.update(payload.get("versions", {}))
    machine = run.get("machine") or next(iter(step.values()), {}).get("machine", {})
    lines = []
    add = lines.append
    add("# What balancing costs per step")
    add("")
    add("Generated by `benchmarks/run_all.py` from the JSON files in "
        f"`{os.path.relpath(out_dir, md_dir)}/`. Reproduce every number and figure with:")
    add("")
    add("```")
    add(command)
    add("```")
    add("")
    if machine.get("gpu"):
        add(f"- Machine: one **{machine['gpu']}** GPU (JAX and torch backends only: TensorFlow is not installed there), "
            f"{machine.get('nproc', '?')} CPU cores ({machine.get('cpu', '?')}); {machine.get('platform', '')}. "
            "Clock: **wall time** per step, each step synchronised with the device (`common.synchronize`); "
            "medians over repeated steps after warm-up, each framework with its default threads; configurations "
            "compared with each other are timed in one process, round-robin (`common.interleaved_medians`), one job "
            "at a time on the GPU.")
    else:
        add(f"- Machine: {machine.get('nproc', '?')} CPU cores ({machine.get('cpu', '?')}), CPU only, shared with "
            f"other jobs (load average at the end {', '.join(machine.get('loadavg', []))}); "
            f"{machine.get('platform', '')}.")
    add(f"- Versions: Python {machine.get('python', '?')}, keras {versions.get('keras', '?')}, TensorFlow "
        f"{versions.get('tensorflow', '?')}, torch {versions.get('torch', '?')}, JAX {versions.get('jax', '?')}.")
    if run and machine.get("gpu"):
        add(f"- Wall time of this run: {run.get('wall_s', 0) / 60:.1f} min (started {run.get('started')}).")
    elif run:
        cpu = run.get("cpu_s")
        only = run.get("only")   # a partial run: the other jobs' JSON are from earlier invocations
        add(f"- Wall time of {f'the last invocation (`--only {only}`)' if only else 'this run'}: "
            f"{run.get('wall_s', 0) / 60:.1f} min ({run.get('jobs')} jobs side by side, started {run.get('started')})"
            + (f"; CPU time of all its processes {cpu / 60:.1f} min, i.e. about {cpu / 120:.0f} min of wall time "
               "on 2 otherwise idle cores." if cpu else "."))
    if run.get("malloc_tunables") is not None:
        add("- Allocator: the timing jobs ran with glibc's malloc "
            + ("set as the application commands set it (`applications.common.MALLOC_TUNABLES`), so that compiled "
               "steps do not map, unmap and page-fault their temporaries at every call; the memory job with "
               "glibc's defaults." if run["malloc_tunables"] else "defaults (no `MALLOC_TUNABLES`)."))
    any_result = next((r for r in results.values() if not r.get("pending")), {})
    if not machine.get("gpu"):
        add(f"- Clock: **CPU time** of the benchmark process per step (`time.process_time`, all threads), median over "
            f"repeated steps after warm-up; each process runs its framework with {any_result.get('threads', 1)} compute "
            "thread(s). On a machine whose 2 cores are shared with other jobs, a step's CPU time does not depend on how "
            "often the process is descheduled, its wall time does; the wall-clock medians are in the JSON files "
            "(`wall_ms`, `ratio_to_ew_wall`) and agree where the machine was quiet. Configurations compared with each "
            "other are timed in one process, round-robin (`common.interleaved_medians`).")
    add("- What is timed: the model's compiled train function called directly on one fixed batch "
        "(`model.train_function(...)`; for JAX with the state threaded by hand, as `fit` does) — see the overhead "
        "table for why not `train_on_batch`. Modes: **TF graph** = `tf.function` without XLA (Keras' default on a "
        "CPU-only TensorFlow), **TF XLA** = `compile(jit_compile=True)`, **TF eager** = `compile(run_eagerly=True)` "
        "(EW and DB-MTL only), **torch** = Keras' torch backend (eager autograd; Keras' default), **JAX jit** = "
        "the whole step under `jax.jit` (Keras' default).")
    add("- Floor: F = forward (task losses summed) alone, B = (forward + backward of that sum) − F, both compiled "
        "like the step and timed in the same round-robin; floor = (F + T·B) / (F + B): what one forward and T "
        "backward passes cost against one forward and one backward. The EW step also holds the optimizer update "
        "and the metric updates, which the floor leaves out, so a gradient-level method can sit below its floor.")
    add("")

    # ---------------------------------------------------------------- summary
    add("## Summary")
    add("")
    for line in _summary(results, jac, libmtl):
        add(line)
    add("")
    notes_path = os.path.join(out_dir, "notes.md")  # hand-written findings kept next to the JSON they explain
    if os.path.exists(notes_path):
        with open(notes_path) as fh:
            add(fh.read().rstrip())
        add("")

    # ---------------------------------------------------------------- models
    add("## Models")
    add("")
    rows = []
    for model in sorted({m for m, _ in results}, key=_model_key):
        r = next((results[(model, m)] for m in MODE_ORDER if (model, m) in results and not results[(model, m)].get("pending")), None)
        if r is None:
            rows.append([model, common.num_tasks_of(model), "pending", "", ""])
            continue
        rows.append([model, r["num_tasks"], f"{r['num_shared_parameters']:,}", f"{r['num_parameters']:,}",
                     _model_description(model)])
    add(_table(["model", "T", "shared P", "all parameters", "what"], rows))
    add("")

    # ---------------------------------------------------------------- headline
    add("## 1-2. DB-MTL / EW against the floor")
    add("")
    add(f"Target: DB-MTL / EW ≤ {TARGET} × floor with a compiled step. `vec`: DB-MTL / EW with the *other* Jacobian "
        "computation (`vectorize_jacobian` flipped from the backend's default, marked *). `extra ms`: DB-MTL step − "
        "EW step − (T−1)·B, the cost of the balancing beyond the T−1 extra backward passes.")
    add("")
    rows = []
    misses = []
    for model in sorted({m for m, _ in results}, key=_model_key):
        for mode in MODE_ORDER:
            r = results.get((model, mode))
            if r is None:
                continue
            if r.get("pending"):
                rows.append([model, MODE_LABEL[mode], "**pending**"] + [""] * 9)
                continue
            row = _row(r, "dbmtl")
            variant = _dbmtl_variant(r)
            if row is None:
                continue
            over = row["ratio_to_ew"] / r["floor"]
            met = over <= TARGET
            if mode in COMPILED and not met:
                misses.append((model, mode, over))
            default = "vec" if r["default_vectorize"] else "loop"
            other = ("loop" if r["default_vectorize"] else "vec")
            rows.append([
                model, MODE_LABEL[mode], r["num_tasks"], _fmt(r["forward_ms"]), _fmt(r["backward_over_forward"]),
                _fmt(r["ew_ms"]), _fmt(r["floor"]), f"{_fmt(row['ratio_to_ew'])} ({default})",
                (f"{_fmt(variant['ratio_to_ew'])} ({other}*)" if variant else "–"),
                f"**{_fmt(over)}**" if not met else _fmt(over),
                ("yes" if met else "**no**") if mode in COMPILED else "(eager)",
                _fmt(row.get("extra_ms")),
            ])
    add(_table(["model", "mode", "T", "F ms", "B/F", "EW ms", "floor", "DB-MTL/EW", "other Jacobian",
                "÷ floor", "≤1.15·floor", "extra ms"], rows))
    add("")
    if "dbmtl_vs_floor.png" in " ".join(figures):
        add("![DB-MTL against the floor](" + os.path.relpath(os.path.join(fig_dir, "dbmtl_vs_floor.png"), md_dir) + ")")
        add("")
    if any(p.endswith("scaling_tasks.png") for p in figures):
        add("![Scaling with T](" + os.path.relpath(os.path.join(fig_dir, "scaling_tasks.png"), md_dir) + ")")
        add("")

    # ---------------------------------------------------------------- all balancers
    add("## 1. Every registered balancer / EW")
    add("")
    add("Ratio of each balancer's step time to EW's, same model, batch and mode. Loss-level methods (one backward) "
        "should sit near 1, gradient-level methods near the floor (last row). `host` = host round trips counted in "
        "one step where checked (JAX: callbacks in the jaxpr; TF graph: PyFunc ops in the graph; TF XLA: the step "
        "compiled with XLA, which has no host ops; torch: `aten::_local_scalar_dense` calls, each a device sync on "
        "a GPU, with the non-finite-step guard as a GPU runs it: a select, where the CPU branches on the flag).")
    add("")
    for model in sorted({m for m, _ in results}, key=_model_key):
        per_mode = {mode: results[(model, mode)] for mode in MODE_ORDER
                    if (model, mode) in results and not results[(model, mode)].get("pending")}
        if not per_mode:
            if any(results.get((model, m), {}).get("pending") for m in MODE_ORDER):
                add(f"### {model}: **pending** (applications/qm9/model.py not available)")
                add("")
            continue
        first = next(iter(per_mode.values()))
        sweep = any(r.get("sweep") == "all" for r in per_mode.values())
        add(f"### {model} (T = {first['num_tasks']}, P = {first['num_shared_parameters']:,}) — "
            + ("every registered balancer" if sweep else "core balancers"))
        add("")
        names = []
        for r in per_mode.values():
            for row in r["rows"]:
                if row["balancer"] not in names and "train_on_batch" not in row["balancer"]:
                    names.append(row["balancer"])
        modes = list(per_mode)
        checked = any(row.get("host_round_trips") is not None for r in per_mode.values() for row in r["rows"])
        header = ["balancer", "needs"] + [MODE_LABEL[m] for m in modes] + (["host (per mode)"] if checked else [])
        rows = []
        for name in names:
            needs = next((row["needs"] for r in per_mode.values() for row in r["rows"] if row["balancer"] == name), "")
            cells = []
            hosts = []
            for m in modes:
                row = _row(per_mode[m], name)
                cells.append(_fmt(row["ratio_to_ew"]) if row else ("err" if name in per_mode[m].get("errors", {}) else ""))
                if row and row.get("host_round_trips") is not None:
                    hosts.append(f"{MODE_LABEL[m]}: {row['host_round_trips']}")
            rows.append([name, needs] + cells + ([", ".join(hosts)] if checked else []))
        rows.append(["**floor**", ""] + [_fmt(per_mode[m]["floor"]) for m in modes] + ([""] if checked else []))
        rows.append(["EW ms", ""] + [_fmt(per_mode[m]["ew_ms"]) for m in modes] + ([""] if checked else []))
        add(_table(header, rows))
        errors = {m: r.get("errors") for m, r in per_mode.items() if r.get("errors")}
        if errors:
            add("")
            for m, errs in errors.items():
                for name, text in errs.items():
                    add(f"- error, {MODE_LABEL[m]} / {name}: `{text}`")
        add("")
        path = os.path.join(fig_dir, f"balancers_{model}.png")
        if path in figures:
            add(f"![{model}](" + os.path.relpath(path, md_dir) + ")")
            add("")

    # ---------------------------------------------------------------- libmtl
    add("## 3. keras_dbmtl on PyTorch against plain PyTorch, LibMTL-style")
    add("")
    add("Plain side: torch.nn modules with the same architecture and sizes, Adam, T `backward(retain_graph=True)` "
        "calls, each task's shared gradients copied into a (T, P) buffer, EMA, normalisation, max-norm scaling, "
        "heads from their own log-loss (`benchmarks/libmtl_torch.py`). Both sides interleaved in one process, one "
        "thread.")
    add("")
    rows = []
    for payload in libmtl.values():
        for r in sorted(payload["results"], key=lambda r: _model_key(r["model"])):
            if r.get("pending"):
                rows.append([r["model"], "**pending**"] + [""] * 7)
                continue
            ms = r["ms"]
            rows.append([r["model"], r["num_tasks"], _fmt(ms["keras_dbmtl"]), _fmt(ms["plain_dbmtl"]),
                         f"**{_fmt(r['dbmtl_keras_over_plain'])}**" if r["dbmtl_keras_over_plain"] > 1 else _fmt(r["dbmtl_keras_over_plain"]),
                         _fmt(ms["keras_ew"]), _fmt(ms["plain_ew"]), _fmt(r["ew_keras_over_plain"]),
                         _fmt((ms["keras_dbmtl"] - ms["keras_ew"]) / max(ms["plain_dbmtl"] - ms["plain_ew"], 1e-9))])
    add(_table(["model", "T", "keras DB-MTL ms", "plain DB-MTL ms", "keras/plain DB-MTL", "keras EW ms",
                "plain EW ms", "keras/plain EW", "keras/plain (DB-MTL − EW)"], rows))
    add("")
    path = os.path.join(fig_dir, "keras_over_plain_torch.png")
    if path in figures:
        add("![keras over plain torch](" + os.path.relpath(path, md_dir) + ")")
        add("")

    # ---------------------------------------------------------------- memory
    mrows = [r for payload in memory.values() for r in payload["results"]]
    add("## 3-4. Peak memory")
    add("")
    add("CPU resident memory, each configuration in a fresh process (`benchmarks/memory.py`): the kernel's peak-RSS "
        "counter (VmHWM) is reset through `/proc/self/clear_refs` after the framework is imported and the batch "
        "made. `run peak` = peak RSS over building, compiling, 2 warm-up and 3 timed steps minus the RSS before the model existed "
        "(includes the compiler's memory); `step peak` = growth of RSS above its level after 2 warm-up steps during "
        "3 more steps (transient memory a step needs beyond what the allocators already hold; 0 when they reuse "
        "freed blocks); `state` = exact bytes of the variables (model, optimizer, balancer: DB-MTL's EMA is "
        "T × P float32).")
    add("")
    rows = []
    for r in sorted(mrows, key=lambda r: (_model_key(r["model"]), r["impl"], r["backend"], r["method"])):
        if "error" in r:
            rows.append([r["model"], r["impl"], r.get("mode", ""), r["method"], "error", "", "", ""])
            continue
        tp = ""
        if r["method"] == "dbmtl":
            p = _shared_p(results, r["model"])
            if p:
                tp = _fmt(r["num_tasks"] * p * 4 / 2**20)
        rows.append([r["model"], "keras_dbmtl" if r["impl"] == "keras" else "plain torch", MODE_LABEL.get(r["mode"], r["mode"]),
                     r["method"], _fmt(_run_peak(r), 1), _fmt(r["step_peak_mb"], 1), _fmt(r["state_mb"], 2), tp])
    add(_table(["model", "implementation", "mode", "method", "run peak MiB", "step peak MiB", "state MiB",
                "T×P×4 B (MiB)"], rows))
    add("")
    path = os.path.join(fig_dir, "memory.png")
    if path in figures:
        add("![memory](" + os.path.relpath(path, md_dir) + ")")
        add("")

    _qm9_paper_memory(os.path.join(out_dir, "qm9_paper_memory"), add)

    # ---------------------------------------------------------------- jacobian
    add("## 4. The per-task Jacobian: looped against vectorised")
    add("")
    add("`keras_dbmtl.gradients.task_gradients` alone, compiled like the step, `vectorize=False` (T backward passes) "
        "and `vectorize=True` (tf pfor / torch `is_grads_batched` / `jax.vmap`), in ms, and the full DB-MTL step "
        "with each (from section 1, ratio to EW). `default` is the backend module's `DEFAULT_VECTORIZE`.")
    add("")
    rows = []
    verdict = {}
    jrows = [r for payload in jac.values() for r in payload["results"] if not r.get("pending")]
    for r in sorted(jrows, key=lambda r: (MODE_ORDER.index(r["mode"]), _model_key(r["model"]))):
        s = results.get((r["model"], r["mode"]))
        step_loop = step_vec = None
        if s and not s.get("pending"):
            row, variant = _row(s, "dbmtl"), _dbmtl_variant(s)
            if row and variant:
                if s["default_vectorize"]:
                    step_vec, step_loop = row["ratio_to_ew"], variant["ratio_to_ew"]
                else:
                    step_loop, step_vec = row["ratio_to_ew"], variant["ratio_to_ew"]
        faster = r.get("faster", "–")
        verdict.setdefault(r["mode"], []).append((r["model"], r.get("vectorized_over_looped"),
                                                  (step_vec / step_loop) if step_vec and step_loop else None))
        rows.append([MODE_LABEL[r["mode"]], r["model"], r["num_tasks"], _fmt(r.get("looped_ms")),
                     _fmt(r.get("vectorized_ms")), _fmt(r.get("vectorized_over_looped")), faster,
                     _fmt(step_loop), _fmt(step_vec), "vec" if r["default_vectorize"] else "loop"])
    # also models with only step-level comparisons
    for (model, mode), s in sorted(results.items(), key=lambda kv: (MODE_ORDER.index(kv[0][1]), _model_key(kv[0][0]))):
        if s.get("pending") or mode == "tf-eager" or any(r["model"] == model and r["mode"] == mode for r in jrows):
            continue
        row, variant = _row(s, "dbmtl"), _dbmtl_variant(s)
        if not (row and variant):
            continue
        if s["default_vectorize"]:
            step_vec, step_loop = row["ratio_to_ew"], variant["ratio_to_ew"]
        else:
            step_loop, step_vec = row["ratio_to_ew"], variant["ratio_to_ew"]
        verdict.setdefault(mode, []).append((model, None, step_vec / step_loop))
        rows.append([MODE_LABEL[mode], model, s["num_tasks"], "", "", "", "", _fmt(step_loop), _fmt(step_vec),
                     "vec" if s["default_vectorize"] else "loop"])
    add(_table(["mode", "model", "T", "looped ms", "vectorised ms", "vec/loop", "faster", "DB-MTL/EW looped",
                "DB-MTL/EW vectorised", "default"], rows))
    add("")
    add("Geometric mean of vectorised / looped over the models (Jacobian alone; full DB-MTL step):")
    add("")
    vrows = []
    for mode in MODE_ORDER:
        if mode not in verdict:
            continue
        jac_ratios = [v for _, v, _ in verdict[mode] if v]
        step_ratios = [v for _, _, v in verdict[mode] if v]
        vrows.append([MODE_LABEL[mode], _fmt(_geomean(jac_ratios)), _fmt(_geomean(step_ratios)),
                      _fmt(max(step_ratios) if step_ratios else None), _fmt(min(step_ratios) if step_ratios else None)])
    add(_table(["mode", "Jacobian vec/loop", "DB-MTL step vec/loop", "worst model", "best model"], vrows))
    add("")
    path = os.path.join(fig_dir, "jacobian_vectorized_over_looped.png")
    if path in figures:
        add("![jacobian](" + os.path.relpath(path, md_dir) + ")")
        add("")

    # ---------------------------------------------------------------- overhead
    add("## How the step is timed: `train_function` against `train_on_batch`")
    add("")
    rows = []
    for (model, mode), s in sorted(results.items(), key=lambda kv: MODE_ORDER.index(kv[0][1])):
        for name in ("ew", "dbmtl"):
            tob = _row(s, f"{name}[train_on_batch]")
            direct = _row(s, name)
            if tob and direct:
                rows.append([model, MODE_LABEL[mode], name, _fmt(direct["ms"]), _fmt(tob["ms"]),
                             _fmt(tob["ms"] - direct["ms"])])
    if rows:
        add("`train_on_batch` resets every metric, (JAX) copies the whole state back into the variables and converts "
            "the logs to numpy on every call; the compiled train function alone has none of that. Timings use the "
            "train function.")
        add("")
        add(_table(["model", "mode", "balancer", "train_function ms", "train_on_batch ms", "overhead ms"], rows))
        add("")
    lines.extend(fault_soak_section(os.path.join(os.path.dirname(os.path.abspath(out_dir)), "results",
                                                 "fault_soak")))
    with open(results_md, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return results_md


FAULT_SOAK_HEADING = "## Fault soak: random faults in random fits"


def fault_soak_section(folder):
    """The table of `benchmarks/fault_soak.py`'s counts (one JSON per backend in `folder`), as Markdown lines."""
    payloads = [common.read_json(os.path.join(folder, name)) for name in sorted(os.listdir(folder))
                if name.endswith(".json")] if os.path.isdir(folder) else []
    if not payloads:
        return []
    faults = ("none", "nan_batch", "sigkill", "corrupt_backup", "disk_full")
    rows = []
    for p in payloads:
        outcomes = p["outcomes"]
        per_fault = ", ".join(f"{f} {sum(p['by_fault'].get(f, {}).values())}" for f in faults)
        rows.append([p["backend"], str(p["runs"]), str(p["faults_injected"]), per_fault,
                     str(outcomes.get("ok", 0)), str(outcomes.get("resumed_exact", 0)),
                     str(outcomes.get("clear_error", 0)), str(outcomes.get("unavailable", 0)),
                     str(outcomes.get("other", 0)), f"{p['seconds'] / 60:.0f} min"])
    lines = [FAULT_SOAK_HEADING, "",
             "`KERAS_BACKEND=<backend> python benchmarks/fault_soak.py --runs 200` (the faults and what each must "
             "give: the script's docstring). `ok`: trained as the fault calls for (a NaN batch skipped, counted and "
             "warned; a plain fit with nothing skipped; a disk with room enough); `resumed exact`: a SIGKILLed run "
             "resumed by `BackupAndRestore` onto the uninterrupted run's state, bit for bit; `clear error`: an "
             "error naming the backup file or folder (corrupt backup, full disk); `other`: anything else.", "",
             _table(["backend", "runs", "faults injected", "by fault", "ok", "resumed exact", "clear error",
                     "unavailable", "other", "time"], rows), ""]
    for p in payloads:
        for other in p.get("others", []):
            lines.append(f"- {p['backend']}, other: `{other['spec']}`: {other['detail']}")
    return lines


def _step_vec_over_loop(result):
    row, variant = _row(result, "dbmtl"), _dbmtl_variant(result)
    if not (row and variant):
        return None
    if result["default_vectorize"]:
        return row["ratio_to_ew"] / variant["ratio_to_ew"]
    return variant["ratio_to_ew"] / row["ratio_to_ew"]


def _summary(results, jac, libmtl):
    """Bullet lines: targets met/missed, loss-level methods off 1, DEFAULT_VECTORIZE verdicts."""
    lines = []
    met, missed = [], []
    for (model, mode), r in sorted(results.items(), key=lambda kv: (_model_key(kv[0][0]), MODE_ORDER.index(kv[0][1]))):
        if r.get("pending") or mode not in COMPILED:
            continue
        row = _row(r, "dbmtl")
        if row is None:
            continue
        over = row["ratio_to_ew"] / r["floor"]
        (met if over <= TARGET else missed).append(f"{model}/{MODE_LABEL[mode]} {over:.2f}")
    pending = sorted({m for (m, _), r in results.items() if r.get("pending")})
    lines.append(f"- DB-MTL / EW ≤ {TARGET} × floor (compiled steps): met on {len(met)} of {len(met) + len(missed)} "
                 "model/mode pairs" + (f"; **missed**: {', '.join(missed)} (÷ floor)." if missed else ".")
                 + (f" Pending: {', '.join(pending)}." if pending else ""))
    off, loss_level = [], set()
    for (model, mode), r in results.items():
        if r.get("pending") or mode not in COMPILED:
            continue
        for row in r["rows"]:
            name = row["balancer"]
            if row.get("needs") != "losses" or "[" in name:      # the kind the run recorded (step_time._kind)
                continue
            loss_level.add(name)
            if not 0.85 <= row["ratio_to_ew"] <= 1.15:
                off.append(f"{name} {model}/{MODE_LABEL[mode]} {row['ratio_to_ew']:.2f}")
    lines.append(f"- Loss-level methods ({', '.join(sorted(loss_level))}) within 0.85-1.15 × EW: "
                 + ("all." if not off else "except " + ", ".join(sorted(off)) + "."))
    worst = []
    for (model, mode), r in results.items():
        if r.get("pending") or mode not in COMPILED:
            continue
        for row in r["rows"]:
            if row["needs"] != "losses" and "[" not in row["balancer"] and row["ratio_to_floor"] > 2.0:
                worst.append(f"{row['balancer']} {model}/{MODE_LABEL[mode]} {row['ratio_to_floor']:.1f}× floor")
    if worst:
        lines.append("- Gradient-level methods above 2 × floor: " + ", ".join(sorted(worst)) + ".")
    hosts = []
    for (model, mode), r in results.items():
        for row in r.get("rows", []):
            h = row.get("host_round_trips")
            if isinstance(h, int) and h > 0:
                hosts.append(f"{row['balancer']} {MODE_LABEL[mode]}: {h}")
            elif isinstance(h, str):
                hosts.append(f"{row['balancer']} {MODE_LABEL[mode]}: {h}")
    checked = any(row.get("host_round_trips") is not None for r in results.values() for row in r.get("rows", []))
    if checked:
        lines.append("- Host round trips inside one step: " + ("none found." if not hosts else ", ".join(sorted(hosts))
                     + " (the rest: none)."))
    for payload in libmtl.values():
        rows = [r for r in payload["results"] if not r.get("pending")]
        if rows:
            slower = [f"{r['model']} {r['dbmtl_keras_over_plain']:.2f}" for r in rows if r["dbmtl_keras_over_plain"] > 1.0]
            lines.append("- keras_dbmtl DB-MTL on torch no slower than plain PyTorch (LibMTL-style): "
                         + ("met on every model." if not slower else "**missed** on " + ", ".join(slower)
                            + " (keras / plain); EW's keras / plain ratio on the same models: "
                            + ", ".join(f"{r['model']} {r['ew_keras_over_plain']:.2f}" for r in rows) + "."))
    by_backend = {}
    for (model, mode), r in results.items():
        if r.get("pending") or mode not in COMPILED:
            continue
        ratio = _step_vec_over_loop(r)
        if ratio:
            by_backend.setdefault(r["backend"], []).append((model, mode, ratio, r["default_vectorize"]))
    for payload in jac.values():
        for r in payload["results"]:
            if r.get("vectorized_over_looped") and r["mode"] in COMPILED:
                by_backend.setdefault(r["backend"], []).append((r["model"] + " (Jacobian alone)", r["mode"],
                                                                 r["vectorized_over_looped"], r["default_vectorize"]))
    for backend in ("tensorflow", "torch", "jax"):
        entries = by_backend.get(backend)
        if not entries:
            continue
        g = _geomean([e[2] for e in entries])
        default = entries[0][3]
        better = g < 1.0
        if 0.95 <= g <= 1.05:
            verdict, better = "finds no difference beyond 5% and so does not contradict", default
        else:
            verdict = "supports" if better == default else "**does not support**"
        worst_vec = max(entries, key=lambda e: e[2])
        best_vec = min(entries, key=lambda e: e[2])
        lines.append(f"- `DEFAULT_VECTORIZE` {backend} = {default}: vectorised / looped, geometric mean over "
                     f"{len(entries)} step and Jacobian measurements = {g:.2f} (best {best_vec[2]:.2f} "
                     f"{best_vec[0]}/{MODE_LABEL[best_vec[1]]}, worst {worst_vec[2]:.2f} {worst_vec[0]}/"
                     f"{MODE_LABEL[worst_vec[1]]}): the measurement {verdict} the default"
                     + ("." if better == default else f"; use {better}."))
    return lines


def _geomean(values):
    values = [v for v in values if v and v > 0]
    if not values:
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _shared_p(results, model):
    for (m, _), r in results.items():
        if m == model and not r.get("pending"):
            return r["num_shared_parameters"]
    return None


def _model_description(model):
    if model.startswith("dense-T"):
        return (f"Dense {common.DENSE['inputs']}→{common.DENSE['hidden']}→{common.DENSE['hidden']} ReLU, "
                f"{common.num_tasks_of(model)} Dense(1) heads, MSE, batch {common.DENSE['batch']}")
    if model == "conv":
        c = common.CONV
        return (f"{c['size']}×{c['size']}×3 → Conv {c['channels'][0]}, {c['channels'][1]} s2, {c['channels'][2]} s2, "
                f"GAP, Dense {c['dense']}; heads: 10-class CE + 2 MSE; batch {c['batch']}")
    if common.is_qm9(model):
        s = common.qm9_size(model)
        return (f"applications/qm9 MPNN, dim {s['dim']}, edge network {s['edge_hidden']}, out {s['out_dim']}, "
                f"{s['edges']} edges, batch {s['batch']} synthetic molecules of 9-27 atoms ({s['source']})")
    return ""
