"""The experiment runner every application's command line uses (qm9, office, nyuv2/cityscapes).

One preamble (``add_arguments`` + ``apply_backend``), every argument checked before any training
(``plan_from_args``: balancer names, their arguments, grids, seeds, the output folder), then ``run_plan``: each
(balancer setting, seed) is trained by the application's ``train_one`` and its result written at once to
``<out>/run_<setting>_seed<seed>.json``; a balancer given a grid has its setting chosen on the mean validation
Δp over the seeds, written to ``<out>/grid_<balancer>.json``; ``<out>/experiment.json`` and ``experiment.md``
hold the table (test Δp mean ± std per setting).

Command-line syntax (the same in every application)::

    --balancer ew dbmtl                                   balancers to train (registered names)
    --balancer-args dbmtl:beta=0.5,beta_sigma=0.5         arguments of one balancer (repeatable); without
                                                          "name:" they go to the only --balancer given
    --grid dbmtl:paper                                    the paper's β grid for DB-MTL (Section 4.1):
                                                          β in {0.1, 0.5, 0.9} and the same / k^0.5
    --grid famo:gamma=0.001|0.01,weight_learning_rate=0.025
                                                          any balancer: values separated by '|', the
                                                          cartesian product of the keys
    --seeds 0 1 2                                         non-negative, distinct

Nothing here imports Keras at module level, so that ``apply_backend`` can still choose the backend.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
import tempfile

import numpy as np

from applications.common import parse_balancer_args

PAPER_GRIDS = {
    # Section 4.1: "grid search for β over {0.1, 0.5, 0.9, 0.1/k^0.5, 0.5/k^0.5, 0.9/k^0.5}" (k: iteration);
    # in keras_dbmtl.balancers.DBMTL beta_k = beta / k^beta_sigma.
    "dbmtl": [{"beta": beta, "beta_sigma": sigma} for sigma in (0.0, 0.5) for beta in (0.1, 0.5, 0.9)],
}


class ExperimentError(ValueError):
    """A command-line argument of the experiment is wrong; the message names it and the fix."""


# --------------------------------------------------------------------------- the preamble


def add_arguments(parser, balancers=("ew", "dbmtl"), seeds=(0,), out=None, backend=None):
    """Adds --backend, --balancer, --balancer-args, --grid, --seeds, --out to an ``argparse`` parser."""
    parser.add_argument("--backend", default=None, choices=("jax", "tensorflow", "torch"),
                        help="Keras backend (sets KERAS_BACKEND before Keras is imported; default: the "
                             "environment's KERAS_BACKEND" + (f", else {backend}" if backend else "") + ")")
    parser.add_argument("--balancer", nargs="+", default=None,
                        help=f"registered balancer name(s) (keras_dbmtl.balancers.names()); default: "
                             f"{' '.join(balancers)}")
    parser.add_argument("--balancer-args", dest="balancer_args", action="append", default=[],
                        metavar="[NAME:]KEY=VALUE,...",
                        help="a balancer's arguments, e.g. dbmtl:beta=0.5,beta_sigma=0.5 (repeatable; without "
                             "NAME: for the only --balancer)")
    parser.add_argument("--grid", action="append", default=[], metavar="NAME:paper|KEY=V1|V2,...",
                        help="train every setting of a grid and keep the one with the best mean validation Δp "
                             "(written to <out>/grid_<NAME>.json): 'dbmtl:paper' is the paper's β grid, "
                             "'NAME:key=v1|v2,key2=w1|w2' any balancer's")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help=f"training seeds (non-negative; default {' '.join(map(str, seeds))})")
    parser.add_argument("--out", default=out, help="output folder (checked for writing before any training)")
    parser.set_defaults(_experiment_defaults=dict(balancers=tuple(balancers), seeds=tuple(seeds)))
    return parser


def apply_backend(backend, default=None):
    """Sets ``KERAS_BACKEND`` to ``backend`` before Keras is imported; without one, keeps the environment's,
    else sets ``default`` (None: Keras' own default)."""
    if backend:
        if "keras" in sys.modules:
            import keras

            if keras.backend.backend() != backend:
                raise ExperimentError(f"--backend {backend}: Keras was already imported with the "
                                      f"{keras.backend.backend()} backend; set KERAS_BACKEND instead.")
        os.environ["KERAS_BACKEND"] = backend
    elif default and "keras" not in sys.modules:
        os.environ.setdefault("KERAS_BACKEND", default)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return os.environ.get("KERAS_BACKEND")


def backend_name():
    """The Keras backend in use (imports Keras: call after ``apply_backend``)."""
    import keras

    return keras.backend.backend()


# --------------------------------------------------------------------------- settings and checks


def file_part(text):
    """``text`` as a part of a file name: every character but letters, digits and ``._-`` becomes ``-``."""
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in text)


class Setting:
    """One balancer with fixed arguments; ``grid`` when it is one point of a grid search."""

    def __init__(self, balancer, kwargs=None, grid=False, tag=None):
        self.balancer, self.kwargs, self.grid, self.tag = balancer, dict(kwargs or {}), grid, tag

    @property
    def _name(self):
        """The balancer's name, with the ``tag`` (how it was trained, e.g. ``every5``) when there is one."""
        return self.balancer + ("-" + self.tag if self.tag else "")

    @property
    def label(self):
        """``dbmtl``, ``dbmtl[beta=0.5,beta_sigma=0.5]``, or with a tag ``dbmtl-every5``."""
        if not self.kwargs:
            return self._name
        return self._name + "[" + ",".join(f"{k}={v}" for k, v in sorted(self.kwargs.items())) + "]"

    @property
    def file_label(self):
        """The label as a file-name part: ``dbmtl_beta0.5_beta_sigma0.5``."""
        return file_part("_".join([self._name] + [f"{k}{v}" for k, v in sorted(self.kwargs.items())]))

    def make(self):
        """A fresh balancer instance (never shared between runs)."""
        from keras_dbmtl import balancers

        return balancers.get(self.balancer, **self.kwargs)

    def to_json(self):
        return dict(balancer=self.balancer, kwargs=self.kwargs, label=self.label, grid=self.grid, tag=self.tag)

    def __repr__(self):
        return f"Setting({self.label})"


def parse_named(text, option):
    """``'dbmtl:beta=0.5'`` -> ``('dbmtl', 'beta=0.5')``; ``'beta=0.5'`` -> ``(None, 'beta=0.5')``."""
    name, sep, rest = text.partition(":")
    if sep and "=" not in name:
        if not name.strip():
            raise ExperimentError(f"{option} {text!r}: the balancer name before ':' is empty.")
        return name.strip(), rest
    return None, text


def parse_grid(text, option="--grid"):
    """``'dbmtl:paper'`` or ``'famo:gamma=0.001|0.01,weight_learning_rate=0.025'`` -> (name, [kwargs, ...])."""
    name, rest = parse_named(text, option)
    if name is None:
        raise ExperimentError(f"{option} {text!r}: give the balancer first, e.g. dbmtl:paper or "
                              "dbmtl:beta=0.1|0.5|0.9,beta_sigma=0|0.5.")
    if rest.strip() == "paper":
        if name not in PAPER_GRIDS:
            raise ExperimentError(f"{option} {text!r}: the paper gives a grid for {sorted(PAPER_GRIDS)} only; "
                                  f"list the values instead ({name}:key=v1|v2).")
        return name, [dict(point) for point in PAPER_GRIDS[name]]
    axes = {}
    for item in filter(None, rest.split(",")):
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ExperimentError(f"{option} {text!r}: {item!r} is not key=value1|value2|...")
        parsed = []
        for value in values.split("|"):
            if not value.strip():
                raise ExperimentError(f"{option} {text!r}: an empty value in {item!r}.")
            parsed.append(parse_balancer_args(f"x={value.strip()}")["x"])
        axes[key.strip()] = parsed
    if not axes:
        raise ExperimentError(f"{option} {text!r}: no key=values after '{name}:'.")
    keys = list(axes)
    return name, [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]


def check_output_folder(out):
    """Creates ``out`` and writes a probe file in it; an ``ExperimentError`` naming the folder if it cannot."""
    if not out:
        raise ExperimentError("--out: no output folder given.")
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write_probe_"):
            pass
    except OSError as err:
        raise ExperimentError(f"--out {out}: the output folder cannot be written ({err.strerror or err}); "
                              "choose a writable folder before training starts.") from err
    return os.path.abspath(out)


def check_seeds(seeds):
    seeds = list(seeds)
    bad = [s for s in seeds if not 0 <= int(s) < 2**32]
    if bad:
        raise ExperimentError(f"--seeds {' '.join(map(str, seeds))}: seeds must be integers in [0, 2**32); "
                              f"got {bad}.")
    if len(set(seeds)) != len(seeds):
        raise ExperimentError(f"--seeds {' '.join(map(str, seeds))}: a seed is repeated (runs would be "
                              "identical).")
    if not seeds:
        raise ExperimentError("--seeds: give at least one seed.")
    return seeds


class Plan:
    """Validated settings, seeds and output folder."""

    def __init__(self, settings, seeds, out):
        self.settings, self.seeds, self.out = list(settings), list(seeds), out

    @property
    def grids(self):
        """{balancer: [settings of its grid]}."""
        out = {}
        for s in self.settings:
            if s.grid:
                out.setdefault(s.balancer, []).append(s)
        return out

    def to_json(self):
        return dict(settings=[s.to_json() for s in self.settings], seeds=self.seeds, out=self.out)


def make_plan(balancers, balancer_args=(), grids=(), seeds=(0,), out=None, check_out=True):
    """Checks every argument (balancer names and arguments by building each balancer once, grid syntax, seeds,
    the output folder) and returns a ``Plan``; raises ``ExperimentError`` naming the mistake."""
    from keras_dbmtl import balancers as registry

    names = registry.names()
    balancers = list(balancers)
    unknown = [b for b in balancers if b not in names]
    if unknown:
        raise ExperimentError(f"--balancer: unknown {unknown}; registered: {', '.join(names)}.")
    fixed = {}
    for text in balancer_args:
        name, rest = parse_named(text, "--balancer-args")
        if name is None:
            if len(balancers) != 1:
                raise ExperimentError(f"--balancer-args {text!r}: several balancers are trained "
                                      f"({' '.join(balancers)}); name one, e.g. {balancers[-1]}:{text}.")
            name = balancers[0]
        if name not in names:
            raise ExperimentError(f"--balancer-args {text!r}: unknown balancer {name!r}; registered: "
                                  f"{', '.join(names)}.")
        try:
            fixed.setdefault(name, {}).update(parse_balancer_args(rest))
        except ValueError as err:
            raise ExperimentError(str(err)) from err
    for name in fixed:
        if name not in balancers:
            balancers.append(name)
    grid_points = {}
    for text in grids:
        name, points = parse_grid(text)
        if name not in names:
            raise ExperimentError(f"--grid {text!r}: unknown balancer {name!r}; registered: {', '.join(names)}.")
        grid_points.setdefault(name, []).extend(points)
        if name not in balancers:
            balancers.append(name)
    settings = []
    for name in balancers:
        if name in grid_points:
            settings += [Setting(name, dict(fixed.get(name, {}), **p), grid=True) for p in grid_points[name]]
        else:
            settings.append(Setting(name, fixed.get(name, {})))
    for setting in settings:
        try:
            setting.make()
        except (TypeError, ValueError) as err:
            raise ExperimentError(f"balancer {setting.label}: {err}") from err
    seeds = check_seeds(seeds)
    out = check_output_folder(out) if check_out else out
    return Plan(settings, seeds, out)


def plan_from_args(args, check_out=True):
    """``make_plan`` from the arguments ``add_arguments`` defined."""
    defaults = getattr(args, "_experiment_defaults", dict(balancers=("ew", "dbmtl"), seeds=(0,)))
    return make_plan(args.balancer or defaults["balancers"], args.balancer_args, args.grid,
                     args.seeds if args.seeds is not None else defaults["seeds"], args.out, check_out=check_out)


# --------------------------------------------------------------------------- progress bar


def per_task_key(key, tasks):
    """Whether a log key belongs to one task (``<task>_...`` or ``val_<task>_...``)."""
    bare = key[4:] if key.startswith("val_") else key
    return any(bare.startswith(f"{t}_") for t in tasks)


def compact_progbar(tasks):
    """A ``keras.callbacks.ProgbarLogger`` (it replaces Keras' own when passed to ``fit``) whose bar shows the
    keys that are not per task (loss, Δp, learning rate) and, per kind of per-task key, the number of tasks:
    with 40 tasks Keras' bar would print every task's loss, weight, gradient norm and metric at each update
    (thousands of characters). History and the other callbacks still receive every key."""
    import keras

    tasks = tuple(tasks)

    class CompactProgbar(keras.callbacks.ProgbarLogger):
        def _shown(self, logs):
            return {k: v for k, v in (logs or {}).items() if not per_task_key(k, tasks)}

        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            if self.verbose:
                print(f"({len(tasks)} tasks: the per-task losses, weights and metrics are in History, not in "
                      "the bar)", flush=True)

        def _update_progbar(self, batch, logs=None):
            super()._update_progbar(batch, self._shown(logs))

        def _finalize_progbar(self, logs):
            super()._finalize_progbar(self._shown(logs))

    return CompactProgbar()


# --------------------------------------------------------------------------- running


def backbone_weights(value, auto):
    """`--weights`: "auto" gives `auto` (the preset's pretrained weights, or None), ""/"none"/"null" give None,
    anything else is a preset name or a file, passed on as is."""
    if str(value).lower() == "auto":
        return auto
    if str(value).lower() in ("", "none", "null"):
        return None
    return value


def run_tag(tag, setting, seed, single):
    """The file tag of one run: `tag` alone for a single run, else with the setting's label and the seed."""
    return tag if single else f"{tag}_{setting.file_label}_seed{seed}"


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def write_json(path, doc):
    """Writes ``doc`` to ``path`` atomically (a temporary file, then a rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, default=_json_default)
    os.replace(tmp, path)
    return path


def _mean_std(values):
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values))


def run_plan(plan, train_one, log=print, meta=None):
    """Trains every setting of ``plan`` for every seed with ``train_one(setting, seed) -> dict`` (keys used here:
    ``val_delta_p``, the selection score, and ``delta_p``, the test Δp at the selected epoch; anything else
    JSON-able is stored). Writes each run's file as soon as it finishes, then the grid winners and the table.
    Returns ``{"runs": {label: [result, ...]}, "grids": {balancer: {...}}, "table": markdown}``."""
    meta = dict(meta or {})
    runs = {}
    for setting in plan.settings:
        for seed in plan.seeds:
            log(f"[{setting.label}] seed {seed}")
            result = dict(train_one(setting, seed))
            result.update(seed=seed, setting=setting.to_json())
            runs.setdefault(setting.label, []).append(result)
            if plan.out:
                path = write_json(os.path.join(plan.out, f"run_{setting.file_label}_seed{seed}.json"),
                                  dict(meta, **result))
                log(f"[{setting.label}] seed {seed}: written {path}")
    grids = {}
    for balancer, settings in plan.grids.items():
        scored = []
        for s in settings:
            val_mean, val_std = _mean_std(r.get("val_delta_p") for r in runs[s.label])
            test_mean, test_std = _mean_std(r.get("delta_p") for r in runs[s.label])
            scored.append(dict(s.to_json(), val_delta_p=val_mean, val_delta_p_std=val_std,
                               delta_p=test_mean, delta_p_std=test_std))
        usable = [d for d in scored if d["val_delta_p"] is not None]
        winner = max(usable, key=lambda d: d["val_delta_p"]) if usable else None
        grids[balancer] = dict(selected_on="mean validation Δp over seeds " + str(plan.seeds),
                               winner=winner, settings=scored)
        if plan.out:
            write_json(os.path.join(plan.out, f"grid_{balancer}.json"), dict(meta, **grids[balancer]))
        log(f"[grid {balancer}] winner: {winner['label'] if winner else None} "
            f"(validation Δp {winner['val_delta_p']:+.2f}%)" if winner else f"[grid {balancer}] no usable run")
    table = summary_table(plan, runs, grids)
    if plan.out:
        write_json(os.path.join(plan.out, "experiment.json"),
                   dict(meta, plan=plan.to_json(), runs=runs, grids=grids, table=table))
        with open(os.path.join(plan.out, "experiment.md"), "w", encoding="utf-8") as f:
            f.write(table)
    return dict(runs=runs, grids=grids, table=table)


def summary_table(plan, runs, grids):
    """Markdown: per setting, validation and test Δp mean ± std over seeds; grid winners marked."""
    winners = {g["winner"]["label"] for g in grids.values() if g.get("winner")}
    lines = ["| setting | seeds | validation Δp (%) | test Δp (%) |", "|---|---|---|---|"]

    def cell(mean, std, n):
        if mean is None:
            return "n/a"
        return f"{mean:+.2f}" + (f" ± {std:.2f}" if n > 1 else "")

    for setting in plan.settings:
        rs = runs.get(setting.label, [])
        val = _mean_std(r.get("val_delta_p") for r in rs)
        test = _mean_std(r.get("delta_p") for r in rs)
        mark = " (grid winner)" if setting.label in winners else ""
        lines.append(f"| {setting.label}{mark} | {len(rs)} | {cell(*val, len(rs))} | {cell(*test, len(rs))} |")
    return "\n".join(lines) + "\n"


__all__ = ["PAPER_GRIDS", "ExperimentError", "add_arguments", "apply_backend", "backend_name", "file_part", "Setting",
           "parse_grid", "check_output_folder", "check_seeds", "per_task_key", "compact_progbar", "Plan", "make_plan",
           "plan_from_args", "run_plan", "summary_table", "write_json"]
