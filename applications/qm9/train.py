"""Training, evaluation, STL baselines and result tables for the QM9 application.

Import this module only after ``KERAS_BACKEND`` is set (``__main__`` does it).

Recipe (the paper's): MSE on z-scored targets, Adam 1e-3, batch 128, 300
epochs, ``ReduceLROnPlateau(factor=0.7, patience=5, min_lr=1e-5)`` on the
validation Delta_p (``keras_dbmtl.callbacks.DeltaP`` writes ``val_delta_p``),
test MAE per target in the paper's units at the epoch with the best
validation Delta_p (STL: best validation MAE of its target).
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np

import keras

from keras_dbmtl.callbacks import DeltaP
from keras_dbmtl.metrics import DenormalizedMAE, delta_p

from applications.qm9 import data as qdata
from applications.qm9 import model as qmodel

HERE = os.path.dirname(os.path.abspath(__file__))

PRESETS = {
    # The paper's setup (a GPU job: ~27 s per DB-MTL step at batch 128 on 2 CPU cores).
    "paper": dict(dim=64, edge_hidden=128, out_dim=64, set2set_steps=3, steps=3, edges="complete",
                  subset=None, epochs=300, batch_size=128, lr=1e-3, lr_factor=0.7, lr_patience=5,
                  min_lr=1e-5, schedule="plateau", seeds=(0, 1, 2)),
    # 8 min 22 s on 2 idle CPU cores for EW and DB-MTL, 3 seeds (see README): smaller model, bonded edges, a subset,
    # a cosine schedule that anneals by the last epoch (every method's curve has settled there).
    # DB-MTL's beta chosen on mean validation Δp (3 seeds) over the paper's grid (Section 4.1): 0.1, 0.5, 0.9 (the
    # library's default) and the same /k^0.5; 0.1 won (applications/qm9/results_quick, README).
    "quick": dict(dim=32, edge_hidden=64, out_dim=64, set2set_steps=3, steps=3, edges="bonds",
                  subset=(4000, 1000, 2000), epochs=12, batch_size=64, lr=2e-3, schedule="cosine",
                  lr_factor=0.7, lr_patience=2, min_lr=1e-5, seeds=(0, 1, 2),
                  balancer_args={"dbmtl": {"beta": 0.1}}),
    # EW, DB-MTL, MGDA, PCGrad, Nash-MTL, FAMO, UPGrad and the 11 STL models: 78 min of one core per seed, 3 seeds
    # in 2 h on 2 cores (benchmarks/qm9_medium.sh, two single-threaded processes); twice the molecules and 20
    # epochs (2,500 steps). Results: applications/qm9/results_medium (README).
    "medium": dict(dim=32, edge_hidden=64, out_dim=64, set2set_steps=3, steps=3, edges="bonds",
                   subset=(8000, 1000, 2000), epochs=20, batch_size=64, lr=2e-3, schedule="cosine",
                   lr_factor=0.7, lr_patience=5, min_lr=1e-5, seeds=(0, 1, 2),
                   balancer_args={"dbmtl": {"beta": 0.1}}),
}


def baselines_path(preset):
    return os.path.join(HERE, f"stl_baselines_{preset}.json")


def load_baselines(path):
    """``{"test": {task: mae}, "val": {task: mae} or None, ...}`` (MAE in paper units)."""
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------- callbacks


class KeepBest(keras.callbacks.Callback):
    """Remembers the weights of the best epoch (by ``monitor``) and restores them at the end."""

    def __init__(self, monitor, mode="max"):
        super().__init__()
        self.monitor, self.mode = monitor, mode
        self.best, self.best_epoch, self._weights = None, None, None

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None or not math.isfinite(float(value)):
            return
        value = float(value)
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if better:
            self.best, self.best_epoch = value, epoch
            self._weights = [np.array(w) for w in self.model.get_weights()]

    def on_train_end(self, logs=None):
        if self._weights is not None:
            self.model.set_weights(self._weights)


class EpochTimer(keras.callbacks.Callback):
    """Records each epoch's wall time and its training part (up to the validation pass); with ``log`` prints
    one short line per epoch; with ``curve_path`` rewrites that JSON file after every epoch with the logs so
    far (the learning curve survives a run that is stopped early)."""

    def __init__(self, monitor, log=None, prefix="", curve_path=None, meta=None):
        super().__init__()
        self.monitor, self.log, self.prefix = monitor, log, prefix
        self.curve_path, self.meta = curve_path, dict(meta or {})

    def on_train_begin(self, logs=None):
        self.times, self.train_times, self.curve = [], [], {}
        self._t = self._epoch_start = time.perf_counter()
        self._train_end = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start, self._train_end = time.perf_counter(), None

    def on_test_begin(self, logs=None):
        if self._train_end is None:  # the validation pass at the end of a training epoch
            self._train_end = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        now = time.perf_counter()
        self.times.append(now - self._t)
        self.train_times.append((self._train_end or now) - self._epoch_start)
        self._t = now
        for key, value in (logs or {}).items():
            try:
                self.curve.setdefault(key, []).append(float(value))
            except (TypeError, ValueError):
                continue
        if self.curve_path:
            doc = dict(self.meta, epochs_done=epoch + 1, epoch_seconds=self.times,
                       train_seconds_per_epoch=self.train_times, history=self.curve)
            with open(self.curve_path + ".tmp", "w") as f:
                json.dump(doc, f, indent=1)
            os.replace(self.curve_path + ".tmp", self.curve_path)
        if self.log is not None and logs:
            lr = logs.get("learning_rate")
            self.log(f"{self.prefix}epoch {epoch + 1}: loss {logs.get('loss', float('nan')):.4f}, "
                     f"val_loss {logs.get('val_loss', float('nan')):.4f}, {self.monitor} "
                     f"{logs.get(self.monitor, float('nan')):.4g}"
                     + (f", lr {float(lr):.2g}" if lr is not None else "") + f" ({self.times[-1]:.1f} s)")


# --------------------------------------------------------------------------- pieces


def make_loaders(d, cfg, tasks, seed):
    kw = dict(batch_size=cfg["batch_size"], edges=cfg["edges"], tasks=tasks,
              edge_quantum=1024 if cfg["edges"] == "bonds" else 4096)
    train = qdata.GraphLoader(d.train, shuffle=True, drop_remainder=True, seed=seed, **kw)
    val = qdata.GraphLoader(d.val, **kw)
    test = qdata.GraphLoader(d.test, **kw)
    if keras.backend.backend() == "tensorflow":
        # Keras fixes a PyDataset's tensor shapes from its first two batches: give TF unknown dims instead.
        return train.as_tf_dataset(), val.as_tf_dataset(), test.as_tf_dataset(), len(train)
    return train, val, test, len(train)


def mae_metrics(d, tasks):
    """compile(metrics=...) entry: de-normalised MAE in the paper's units, log key ``<task>_mae``.

    (Keras prefixes a metric with its output's name only when there are several outputs.)"""
    out = {}
    for t in tasks:
        k = qdata.TARGETS.index(t)
        out[t] = [DenormalizedMAE(mean=float(d.mean[k]), std=float(d.std[k]),
                                  unit_scale=qdata.PAPER_SCALE[t],
                                  name="mae" if len(tasks) > 1 else f"{t}_mae")]
    return out


def learning_rate(cfg, steps_per_epoch):
    """The preset's learning rate: a constant ``lr`` that ``ReduceLROnPlateau`` lowers (``schedule="plateau"``,
    the paper's), or a cosine decay from ``lr`` to ``min_lr`` over all of training's steps (``"cosine"``): every
    method gets the same budget and ends annealed, so its learning curve has settled by the last epoch."""
    schedule = cfg.get("schedule", "plateau")
    if schedule == "plateau":
        return cfg["lr"]
    if schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(cfg["lr"], decay_steps=cfg["epochs"] * steps_per_epoch,
                                                      alpha=cfg["min_lr"] / cfg["lr"])
    raise ValueError(f"schedule must be 'plateau' or 'cosine'; received {schedule!r}.")


def balance_monitor(m):
    """A ``TaskBalanceMonitor`` (pairwise cosines of the task gradients per epoch, the paper's Figure 10) for a
    balancer that forms per-task gradients anyway; None for a loss-level one (EW), which forms none."""
    from keras_dbmtl.callbacks import TaskBalanceMonitor

    if len(m.task_names) < 2 or not m.balancer.uses_task_gradients:
        return None
    return TaskBalanceMonitor(pair_logs_up_to=0)


def build_and_compile(d, cfg, tasks, balancer, name=None, steps_per_epoch=1):
    """The model, compiled with ``balancer`` (a registered name or a fresh ``Balancer``; ``name`` its
    registered name when an instance is given)."""
    name = name or balancer
    m = qmodel.build_model(tasks, dim=cfg["dim"], edge_hidden=cfg["edge_hidden"], steps=cfg["steps"],
                           set2set_steps=cfg["set2set_steps"], out_dim=cfg["out_dim"])
    kwargs = {}
    if keras.backend.backend() == "jax" and name != "ew":
        import jax

        if jax.default_backend() == "cpu":
            # Measured on 2 CPU cores: a loop of T backward passes is 1.4-2.7x faster than jax.vmap for this
            # scatter/gather-heavy model (quick preset: 0.8 s vs 1.1 s per DB-MTL step).
            kwargs["vectorize_jacobian"] = False
    if cfg.get("task_gradients_every", 1) != 1:
        kwargs["task_gradients_every"] = cfg["task_gradients_every"]
    if cfg.get("task_gradients", "parameters") != "parameters":
        kwargs["task_gradients"] = cfg["task_gradients"]
    m.compile(optimizer=keras.optimizers.Adam(learning_rate(cfg, steps_per_epoch)), loss={t: "mse" for t in tasks},
              metrics=mae_metrics(d, tasks), balancer=balancer, **kwargs)
    return m


def _history_floats(history):
    """``History.history`` as lists of floats.  A key whose values cannot be read back (a backend array
    that was freed after the epoch) is left out rather than failing the whole run."""
    out = {}
    for k, vals in history.items():
        try:
            out[k] = [float(v) for v in vals]
        except (RuntimeError, TypeError, ValueError):
            continue
    return out


def fit_one(d, cfg, tasks, balancer, seed, val_baselines, verbose=0, log=None, curve_path=None, name=None,
            tag=None):
    """Train one model; returns (model, history dict, test MAE, info).  ``curve_path``: a JSON file rewritten
    after every epoch with the history so far (``EpochTimer``)."""
    keras.utils.set_random_seed(seed)
    train, val, test, steps = make_loaders(d, cfg, tasks, seed)
    name = name or (balancer if isinstance(balancer, str) else type(balancer).__name__.lower())
    m = build_and_compile(d, cfg, tasks, balancer, name=name, steps_per_epoch=steps)
    if len(tasks) > 1:
        monitor, mode = "val_delta_p", "max"
        callbacks = [DeltaP({f"{t}_mae": val_baselines[t] for t in tasks})]
    else:
        monitor, mode = f"val_{tasks[0]}_mae", "min"
        callbacks = []
    keep = KeepBest(monitor, mode)
    tag = f"STL {tasks[0]}" if len(tasks) == 1 else (tag or name)
    timer = EpochTimer(monitor, log if verbose == 0 else None, prefix=f"  [{tag} seed {seed}] ",
                       curve_path=curve_path, meta=dict(balancer=tag, seed=seed, tasks=list(tasks),
                                                        config=cfg, backend=keras.backend.backend()))
    if cfg.get("schedule", "plateau") == "plateau":
        callbacks.append(keras.callbacks.ReduceLROnPlateau(monitor=monitor, mode=mode, factor=cfg["lr_factor"],
                                                           patience=cfg["lr_patience"], min_lr=cfg["min_lr"]))
    balance = balance_monitor(m)
    callbacks += [keep, timer] + ([balance] if balance is not None else [])
    if verbose == 1 and len(tasks) > 1:  # Keras' bar would print ~4 keys per task at every update
        from applications.experiment import compact_progbar

        callbacks.append(compact_progbar(tasks))
    t0 = time.perf_counter()
    hist = m.fit(train, validation_data=val, epochs=cfg["epochs"], callbacks=callbacks,
                 verbose=verbose, steps_per_epoch=None)
    train_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = m.evaluate(test, return_dict=True, verbose=0)
    test_mae = {t: float(res[f"{t}_mae"]) for t in tasks}
    info = dict(best_epoch=(keep.best_epoch + 1) if keep.best_epoch is not None else None,
                cosines=[c.tolist() for c in balance.cosines] if balance is not None else None,
                best_monitor=keep.best, monitor=monitor, train_seconds=train_seconds,
                eval_seconds=time.perf_counter() - t0, epoch_seconds=timer.times,
                train_seconds_per_epoch=timer.train_times, steps_per_epoch=steps)
    history = _history_floats(hist.history)
    return m, history, test_mae, info


def run_stl(d, cfg, seeds, verbose=1, log=print):
    """One single-task model per target and seed; mean over seeds of val and test MAE."""
    runs = []
    for seed in seeds:
        for t in qdata.TARGETS:
            log(f"[STL] seed {seed} target {t}")
            _, hist, test_mae, info = fit_one(d, cfg, [t], "ew", seed, None, verbose, log)
            val_best = min(hist[f"val_{t}_mae"])
            runs.append(dict(seed=seed, task=t, test_mae=test_mae[t], val_mae=val_best, **info))
            log(f"[STL] {t}: val {val_best:.4g} test {test_mae[t]:.4g} {qdata.PAPER_UNITS[t]} "
                f"({info['train_seconds']:.0f} s)")
    test = {t: float(np.mean([r["test_mae"] for r in runs if r["task"] == t])) for t in qdata.TARGETS}
    val = {t: float(np.mean([r["val_mae"] for r in runs if r["task"] == t])) for t in qdata.TARGETS}
    return dict(test=test, val=val, runs=runs)


def run_mtl(d, cfg, balancer, seeds, baselines, verbose=1, log=print, on_run=None, out=None):
    """Trains ``balancer`` once per seed; ``on_run(run)`` is called as soon as each run finishes (the CLI
    writes ``<out>/run_<balancer>_seed<seed>.json`` there, so a later failure loses nothing); with ``out``,
    ``<out>/curve_<balancer>_seed<seed>.json`` holds the learning curve so far after every epoch."""
    val_base = baselines.get("val") or baselines["test"]
    runs = []
    for seed in seeds:
        log(f"[{balancer}] seed {seed}")
        curve = os.path.join(out, f"curve_{balancer}_seed{seed}.json") if out else None
        _, hist, test_mae, info = fit_one(d, cfg, list(qdata.TARGETS), balancer, seed, val_base, verbose,
                                          log, curve_path=curve)
        dp = delta_p({f"{t}_mae": v for t, v in test_mae.items()},
                     {f"{t}_mae": baselines["test"][t] for t in qdata.TARGETS})
        runs.append(dict(seed=seed, test_mae=test_mae, delta_p=dp, history=hist, **info))
        if on_run is not None:
            on_run(runs[-1])
        log(f"[{balancer}] seed {seed}: test Δp {dp:+.2f}% (best val epoch {info['best_epoch']}, "
            f"{info['train_seconds']:.0f} s)")
    return runs


# --------------------------------------------------------------------------- tables


def summarize(results, baselines):
    """Mean (and std over seeds) of every target's test MAE and of Δp per method."""
    rows = {}
    for method, runs in results.items():
        maes = np.array([[r["test_mae"][t] for t in qdata.TARGETS] for r in runs])
        dps = np.array([r["delta_p"] for r in runs])
        rows[method] = dict(mae=dict(zip(qdata.TARGETS, maes.mean(0).tolist())),
                            mae_std=dict(zip(qdata.TARGETS, maes.std(0).tolist())),
                            delta_p=float(dps.mean()), delta_p_std=float(dps.std()),
                            seeds=[r["seed"] for r in runs],
                            train_seconds=float(np.mean([r["train_seconds"] for r in runs])))
    return rows


def markdown_table(rows, baselines):
    """Markdown table: STL row, then per method the mean test MAE per target and Δp (± std over seeds
    when there are several seeds)."""
    head = "| method | " + " | ".join(f"{qdata.TARGET_LABELS[t]} ({qdata.PAPER_UNITS[t]})"
                                        for t in qdata.TARGETS) + " | Δp (%) ↑ |"
    sep = "|---" * (len(qdata.TARGETS) + 2) + "|"
    lines = [head, sep]
    lines.append("| STL | " + " | ".join(f"{baselines['test'][t]:.4g}" for t in qdata.TARGETS) + " | 0.00 |")
    for method, r in rows.items():
        n = len(r["seeds"])
        dp = f"{r['delta_p']:+.2f}" + (f" ± {r['delta_p_std']:.2f}" if n > 1 else "")
        maes = [f"{r['mae'][t]:.4g}" + (f" ± {r['mae_std'][t]:.2g}" if n > 1 else "") for t in qdata.TARGETS]
        lines.append(f"| {method} | " + " | ".join(maes) + f" | {dp} |")
    return "\n".join(lines)


def plot_results(rows, baselines, results, path):
    """Left: test MAE / STL MAE per target (log scale); right: validation Δp per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw=dict(width_ratios=[2, 1]))
    xs = np.arange(len(qdata.TARGETS))
    width = 0.8 / max(len(rows), 1)
    for k, (method, r) in enumerate(rows.items()):
        ratio = [r["mae"][t] / baselines["test"][t] for t in qdata.TARGETS]
        ax1.bar(xs + (k - (len(rows) - 1) / 2) * width, ratio, width,
                label=f"{method} (Δp {r['delta_p']:+.1f}%)")
    ax1.axhline(1.0, color="k", lw=0.8, ls="--", label="STL")
    ax1.set_xticks(xs)
    ax1.set_xticklabels([qdata.TARGET_LABELS[t] for t in qdata.TARGETS])
    ax1.set_yscale("log")
    ax1.set_ylabel("test MAE / STL test MAE")
    ax1.set_title("QM9: per-target test MAE relative to STL (lower is better)")
    ax1.legend(fontsize=8)
    for method, runs in results.items():
        for r in runs:
            vals = r["history"].get("val_delta_p")
            if vals:
                ax2.plot(np.arange(1, len(vals) + 1), vals, label=f"{method} seed {r['seed']}")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation Δp (%)")
    ax2.set_title("validation Δp (higher is better)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


# --------------------------------------------------------------------------- main entry


def main(args, command, plan):
    """Run what the CLI asked for (``args`` from ``__main__.parser``; ``plan`` the checked
    ``applications.experiment.Plan``: balancer settings, seeds, output folder)."""
    cfg = dict(PRESETS[args.preset])
    for key in ("epochs", "batch_size", "edges", "dim", "lr", "schedule", "lr_patience", "task_gradients_every",
                "task_gradients"):
        if getattr(args, key, None) is not None:
            cfg[key] = getattr(args, key)
    if args.subset is not None:
        cfg["subset"] = None if args.subset == [0] else tuple(args.subset)
    seeds = plan.seeds
    out = plan.out
    log_lines = []

    def log(msg):
        print(msg, flush=True)
        log_lines.append(msg)

    baselines_file = args.baselines or (os.path.join(out, f"stl_baselines_{args.preset}.json")
                                        if args.stl else baselines_path(args.preset))
    if plan.settings and not args.stl and not args.prepare_data and not os.path.isfile(baselines_file):
        raise FileNotFoundError(f"STL baselines {baselines_file} do not exist: pass --stl to train them, or "
                                "--baselines FILE.")
    timings = {}
    t_start = time.perf_counter()
    log(f"QM9 {args.preset} preset on {keras.backend.backend()}: {json.dumps(cfg)}; seeds {seeds}; "
        f"settings {[s.label for s in plan.settings]}")
    t0 = time.perf_counter()
    d = qdata.load_qm9(cache_dir=args.cache_dir, split_seed=args.split_seed, subset=cfg["subset"],
                       features=args.features, rebuild=args.rebuild_cache)
    timings["data_seconds"] = time.perf_counter() - t0
    if args.prepare_data:
        size = os.path.getsize(d.info["cache"]) / 2**20
        log(f"data: {d}; cache {d.info['cache']} ({size:.1f} MiB) ready: run with --cache-dir "
            f"{os.path.dirname(d.info['cache'])}")
        return dict(cache=d.info["cache"], n=dict(train=len(d.train), val=len(d.val), test=len(d.test)))
    log(f"data: {d} in {timings['data_seconds']:.1f} s (cache {d.info['cache']}); RDKit could not assign "
        f"bond orders to {d.info['n_rdkit_failed']} of these molecules (kept, all bonds single)")

    report = dict(command=command, preset=args.preset, backend=keras.backend.backend(), config=cfg,
                  seeds=seeds, split_seed=args.split_seed, features=args.features,
                  n=dict(train=len(d.train), val=len(d.val), test=len(d.test)), data_info={
                      k: v for k, v in d.info.items() if k != "rows"})

    if args.stl:
        t0 = time.perf_counter()
        stl = run_stl(d, cfg, seeds, verbose=args.verbose, log=log)
        timings["stl_seconds"] = time.perf_counter() - t0
        stl_doc = dict(command=command, preset=args.preset, backend=keras.backend.backend(), config=cfg,
                       seeds=seeds, split_seed=args.split_seed, features=args.features,
                       units=qdata.PAPER_UNITS, test=stl["test"], val=stl["val"],
                       runs=[{k: v for k, v in r.items() if k != "epoch_seconds"} for r in stl["runs"]])
        path = os.path.join(out, f"stl_baselines_{args.preset}.json")
        with open(path, "w") as f:
            json.dump(stl_doc, f, indent=1, default=_json_default)
        log(f"STL baselines written to {path} (copy to {baselines_path(args.preset)} to make them the default)")
        report["stl"] = stl_doc

    if plan.settings:
        from applications import experiment

        baselines = load_baselines(baselines_file)
        log(f"Δp against STL baselines in {baselines_file}")
        val_base = baselines.get("val") or baselines["test"]

        def train_one(setting, seed):
            t0 = time.perf_counter()
            curve = os.path.join(out, f"curve_{setting.file_label}_seed{seed}.json")
            _, hist, test_mae, info = fit_one(d, cfg, list(qdata.TARGETS), setting.make(), seed, val_base,
                                              args.verbose, log, curve_path=curve, name=setting.balancer,
                                              tag=setting.label)
            dp = delta_p({f"{t}_mae": v for t, v in test_mae.items()},
                         {f"{t}_mae": baselines["test"][t] for t in qdata.TARGETS})
            log(f"[{setting.label}] seed {seed}: test Δp {dp:+.2f}% (best val epoch {info['best_epoch']}, "
                f"{time.perf_counter() - t0:.0f} s)")
            return dict(balancer=setting.balancer, test_mae=test_mae, delta_p=dp,
                        val_delta_p=info["best_monitor"], history=hist, **info)

        meta = {k: report[k] for k in ("command", "preset", "backend", "config", "split_seed", "features")}
        t0 = time.perf_counter()
        done = experiment.run_plan(plan, train_one, log=log, meta=meta)
        timings["mtl_seconds"] = time.perf_counter() - t0
        results = done["runs"]
        rows = summarize(results, baselines)
        table = markdown_table(rows, baselines)
        report.update(baselines_file=os.path.abspath(baselines_file), summary=rows, runs=results,
                      grids=done["grids"])
        png = os.path.join(out, "qm9_results.png")
        try:
            plot_results(rows, baselines, results, png)
        except ImportError as err:  # matplotlib is optional: the JSON and table hold every number
            png = f"(no plot: {err})"
        from applications.qm9 import report as qreport

        methods = qreport.group({(label, r["seed"]): r for label, rs in results.items() for r in rs})
        merged = qreport.markdown(methods, "Per method, over seeds (sample std)", f"Command: `{command}`", out)
        spread = qreport.difference_lines(methods)
        log("\nTest MAE (paper units) at the best validation-Δp epoch, mean over seeds:\n" + table)
        log("\n" + done["table"])
        log("\n".join(spread))
        log(f"plots: {png}, {os.path.join(out, 'curves.png')}"
            + (f", {os.path.join(out, 'diagnostics.png')}" if "diagnostics.png" in merged else ""))
        with open(os.path.join(out, "results.md"), "w") as f:
            f.write(f"# QM9 ({args.preset} preset, {keras.backend.backend()} backend, seeds {seeds})\n\n")
            f.write(f"Command: `{command}`\n\nTest MAE in the paper's units, mean ± population std over seeds:\n\n"
                    f"{table}\n\n{done['table']}\nSTL baselines: `{baselines_file}`\n\n#{merged}")
    timings["total_seconds"] = time.perf_counter() - t_start
    report["timings"] = timings
    log("timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(report, f, indent=1, default=_json_default)
    with open(os.path.join(out, "log.txt"), "w") as f:
        f.write("\n".join(log_lines) + "\n")
    return report


__all__ = ["PRESETS", "main", "run_stl", "run_mtl", "fit_one", "summarize", "markdown_table",
           "plot_results", "KeepBest", "load_baselines", "baselines_path"]
