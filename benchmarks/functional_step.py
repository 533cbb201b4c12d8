"""Door 1's step (a functional `MultiTaskModel(inputs=..., outputs=...)`) against the same network written as
`MultiTaskModel(encoder=..., heads=...)`, on every backend, timed interleaved.

    nice -n 5 .venv/bin/python benchmarks/functional_step.py --backends jax,tensorflow,torch --rounds 20
    .venv/bin/python benchmarks/functional_step.py --backends jax --quick          # smoke (a few rounds)
    .venv/bin/python benchmarks/functional_step.py --worker torch --json /tmp/t.json   # one backend, this process

Models (batch 128, 64 inputs, MSE on every task, Adam 1e-3):

- `dense-T3`, `dense-T11`: a trunk Dense(256) + ReLU -> Dense(256) + ReLU and T heads Dense(64) + ReLU ->
  Dense(1). Built twice: `encoder=keras.Sequential(trunk)`, `heads={t: keras.Sequential(head)}`, and as one
  functional graph `MultiTaskModel(inputs=x, outputs={t: head_t(trunk(x))})` whose shared variables (the trunk's)
  are read from the graph. The functional copy gets the encoder/heads copy's initial weights, and after the first
  (untimed) `train_on_batch` the weights of the two are compared: they must agree within float32 round-off
  (`max_weight_difference` in the JSON), so both sides do the same work.
- `branch-T11` (functional form only: no encoder/heads equivalent without a rewrite): the same trunk, which
  branches into two towers Dense(128) + ReLU (tower_a used by t0-t4, tower_b by t5-t9) and into t10's head
  directly; every tower branches again into its tasks' heads (Dense(64) + ReLU -> Dense(1)). The shared
  variables are the trunk's and both towers' (a tower has zero Jacobian rows for the tasks that skip it).
  Reported as ms per step and DB-MTL / EW; it has no encoder/heads ratio.

Balancers: "dbmtl" (the per-task Jacobian of the shared variables) and "ew" (one backward: the control).
Modes: each backend's default compiled step (`tf-graph`: tf.function; `jax`: jax.jit; `torch`: eager), or
`--modes` (e.g. `tf-graph,tf-xla`), as in benchmarks/step_time.py.

Timing: one process per backend (KERAS_BACKEND is fixed per process); in it every configuration is built,
compiled and warmed up (`--warmup` calls), then `--rounds` rounds, each calling every configuration `--per-round`
times in a row, encoder/heads and functional of one configuration next to each other, the order reversed every
other round (A, B, B, A, ...). A step is the model's compiled train function on one fixed batch
(`common.TrainFunctionRunner`: what `fit` calls per step, without the per-call metric reset and log conversion of
`train_on_batch`; `--runner train_on_batch` times that instead). Clock: CPU time of the process
(`time.process_time`; frameworks on one thread, `--threads`), wall clock also recorded. For every round, the
median step of each side in that round; the functional / encoder-heads ratio of those two medians is the round's
ratio. Reported: the median of the per-round ratios and their min-max, and the medians over all steps.

Writes benchmarks/results/functional_step.json (`--json`) and prints the Markdown tables.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

INPUTS, HIDDEN, HEAD_HIDDEN, TOWER, BATCH = 64, 256, 64, 128, 128
PAIRED_MODELS = ("dense-T3", "dense-T11")
FUNCTIONAL_ONLY = ("branch-T11",)
MODELS = PAIRED_MODELS + FUNCTIONAL_ONLY
BALANCERS = ("ew", "dbmtl")
FORMS = ("encoder_heads", "functional")
DEFAULT_MODE = {"tensorflow": "tf-graph", "jax": "jax", "torch": "torch"}
DEFAULT_OUT = os.path.join(common.ROOT, "benchmarks", "results", "functional_step.json")


# --------------------------------------------------------------------------- models and data


def num_tasks(model_name):
    return int(model_name.split("-T")[1])


def make_data(model_name, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(BATCH, INPUTS)).astype("float32")
    y = {f"t{i}": rng.normal(size=(BATCH, 1)).astype("float32") for i in range(num_tasks(model_name))}
    return x, y


def _trunk_layers():
    from keras import layers

    return [layers.Dense(HIDDEN, activation="relu", name="trunk_1"),
            layers.Dense(HIDDEN, activation="relu", name="trunk_2")]


def _head_layers(task):
    from keras import layers

    return [layers.Dense(HEAD_HIDDEN, activation="relu", name=f"{task}_hidden"), layers.Dense(1, name=f"{task}_out")]


def build_encoder_heads(model_name, seed=0):
    import keras

    import keras_dbmtl

    keras.utils.set_random_seed(seed)
    tasks = [f"t{i}" for i in range(num_tasks(model_name))]
    encoder = keras.Sequential(_trunk_layers(), name="trunk")
    heads = {t: keras.Sequential(_head_layers(t), name=f"head_{t}") for t in tasks}
    model = keras_dbmtl.MultiTaskModel(encoder=encoder, heads=heads, name="encoder_heads")
    model.build((None, INPUTS))
    return model


def build_functional(model_name, seed=0):
    import keras

    import keras_dbmtl

    keras.utils.set_random_seed(seed)
    tasks = [f"t{i}" for i in range(num_tasks(model_name))]
    x = keras.Input((INPUTS,), name="x")
    h = x
    for layer in _trunk_layers():
        h = layer(h)
    if model_name.startswith("branch-"):
        from keras import layers

        tower_a = layers.Dense(TOWER, activation="relu", name="tower_a")(h)
        tower_b = layers.Dense(TOWER, activation="relu", name="tower_b")(h)
        sources = {t: tower_a if i < 5 else tower_b if i < 10 else h for i, t in enumerate(tasks)}
    else:
        sources = {t: h for t in tasks}
    outputs = {}
    for t in tasks:
        z = sources[t]
        for layer in _head_layers(t):
            z = layer(z)
        outputs[t] = z
    model = keras_dbmtl.MultiTaskModel(inputs=x, outputs=outputs, name="functional")
    model.build((None, INPUTS))
    return model


def _layers_by_name(model):
    """dict layer name -> Dense layer, over either form (the functional copy's names match the other's)."""
    import keras

    found = {}
    roots = [model.network] if model.network is not None else [model.encoder, *model.heads.values()]
    for root in roots:
        for layer in root._flatten_layers(include_self=False):
            if isinstance(layer, keras.layers.Dense):
                found[layer.name] = layer
    return found


def copy_weights(source, target):
    src, dst = _layers_by_name(source), _layers_by_name(target)
    assert set(src) == set(dst), (sorted(src), sorted(dst))
    for name, layer in src.items():
        dst[name].set_weights(layer.get_weights())


def max_weight_difference(a, b):
    import numpy as np

    la, lb = _layers_by_name(a), _layers_by_name(b)
    worst = 0.0
    for name, layer in la.items():
        for wa, wb in zip(layer.get_weights(), lb[name].get_weights()):
            worst = max(worst, float(np.max(np.abs(wa.astype(np.float64) - wb.astype(np.float64)))))
    return worst


def compile_model(model, mode, balancer):
    import keras

    kwargs = {"jit_compile": mode in ("tf-xla", "jax")}
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse", balancer=balancer, **kwargs)
    return model


# --------------------------------------------------------------------------- one backend, in this process


def timed_rounds(runners, order, rounds, per_round, warmup):
    """dict key -> list (one per round) of lists of (cpu_s, wall_s) per step; `order` lists the keys."""
    for key in order:
        for _ in range(warmup):
            runners[key]()
    samples = {key: [] for key in order}
    for r in range(rounds):
        for key in (order if r % 2 == 0 else list(reversed(order))):
            fn, steps = runners[key], []
            for _ in range(per_round):
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                t1, c1 = time.perf_counter(), time.process_time()
                steps.append((c1 - c0, t1 - t0))
            samples[key].append(steps)
    return samples


def _summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def run_backend(backend, modes, models, balancers, rounds, per_round, warmup, runner="train_function"):
    import keras

    assert keras.backend.backend() == backend, keras.backend.backend()
    results = []
    for mode in modes:
        runners, order, info = {}, [], {}
        for model_name in models:
            x, y = make_data(model_name)
            forms = ("functional",) if model_name in FUNCTIONAL_ONLY else FORMS
            for balancer in balancers:
                built, started = {}, {}
                for form in forms:              # both copies first: the functional one takes the initial weights
                    started[form] = time.perf_counter()
                    model = (build_encoder_heads if form == "encoder_heads" else build_functional)(model_name)
                    if form == "functional" and "encoder_heads" in built:
                        copy_weights(built["encoder_heads"], model)
                    compile_model(model, mode, balancer)
                    built[form] = model
                    started[form] = time.perf_counter() - started[form]
                make = common.TrainFunctionRunner if runner == "train_function" else common.TrainOnBatchRunner
                for form in forms:
                    t0 = time.perf_counter()
                    model, key = built[form], (model_name, balancer, form)
                    runners[key] = make(model, x, y)          # one train_on_batch: builds and traces the step
                    order.append(key)
                    info[key] = {"build_compile_s": started[form] + time.perf_counter() - t0,
                                 "shared_parameters": common.num_shared_parameters(model),
                                 "parameters": common.num_parameters(model)}
                if len(built) == 2:     # after one identical step from identical weights, the same weights
                    info[(model_name, balancer, "functional")]["max_weight_difference"] = max_weight_difference(
                        built["encoder_heads"], built["functional"])
                common.log(f"[{mode}] built {model_name} {balancer}: "
                           + ", ".join(f"{f} {info[(model_name, balancer, f)]['build_compile_s']:.1f} s"
                                       for f in forms))
        t0 = time.perf_counter()
        samples = timed_rounds(runners, order, rounds, per_round, warmup)
        timing_s = time.perf_counter() - t0
        rows = []
        for model_name in models:
            for balancer in balancers:
                row = {"model": model_name, "balancer": balancer, "mode": mode}
                for form in FORMS:
                    key = (model_name, balancer, form)
                    if key not in samples:
                        continue
                    cpu = [c for steps in samples[key] for c, _ in steps]
                    wall = [w for steps in samples[key] for _, w in steps]
                    row[form] = {"cpu_ms": 1e3 * statistics.median(cpu), "wall_ms": 1e3 * statistics.median(wall),
                                 "round_cpu_ms": [1e3 * statistics.median([c for c, _ in s]) for s in samples[key]],
                                 "round_wall_ms": [1e3 * statistics.median([w for _, w in s]) for s in samples[key]],
                                 "samples": len(cpu), **info[key]}
                if "encoder_heads" in row and "functional" in row:
                    for clock in ("cpu", "wall"):
                        ratios = [f / e for f, e in zip(row["functional"][f"round_{clock}_ms"],
                                                        row["encoder_heads"][f"round_{clock}_ms"])]
                        row[f"ratio_{clock}"] = _summary(ratios)
                        row[f"ratio_{clock}"]["per_round"] = ratios
                rows.append(row)
        for model_name in models:            # DB-MTL / EW of each form, per round
            for form in FORMS:
                ew, db = (model_name, "ew", form), (model_name, "dbmtl", form)
                if ew in samples and db in samples:
                    ratios = [statistics.median([c for c, _ in d]) / statistics.median([c for c, _ in e])
                              for d, e in zip(samples[db], samples[ew])]
                    for row in rows:
                        if row["model"] == model_name and row["balancer"] == "dbmtl":
                            row[form]["dbmtl_over_ew_cpu"] = _summary(ratios)
        results.append({"mode": mode, "backend": backend, "rows": rows, "timing_s": timing_s})
        keras.backend.clear_session()
    return results


def worker(args):
    common.use_backend(args.worker, args.threads)
    modes = args.modes.split(",") if args.modes else [DEFAULT_MODE[args.worker]]
    for mode in modes:
        if common.BACKEND_OF_MODE[mode] != args.worker:
            raise ValueError(f"mode {mode!r} is not a {args.worker} mode")
    t0 = time.perf_counter()
    results = run_backend(args.worker, modes, args.models.split(","), args.balancers.split(","), args.rounds,
                          args.per_round, args.warmup, args.runner)
    payload = {"backend": args.worker, "versions": common.backend_versions(), "machine": common.machine_info(),
               "threads": common.threads(), "runner": args.runner, "rounds": args.rounds,
               "per_round": args.per_round, "warmup": args.warmup, "wall_s": time.perf_counter() - t0,
               "results": results}
    common.write_json(args.json, payload)
    return payload


# --------------------------------------------------------------------------- every backend, one process each


def _fmt_ratio(summary):
    return f"{summary['median']:.2f} ({summary['min']:.2f}-{summary['max']:.2f})"


MODE_LABEL = {"tf-graph": "TF graph", "tf-xla": "TF XLA", "tf-eager": "TF eager", "torch": "torch", "jax": "JAX jit"}


def spread(ratios, resamples=5000, seed=0):
    """median, min, max, interquartile range and a bootstrap 95% interval of the median of per-round ratios."""
    import numpy as np

    x = np.asarray(ratios, dtype=float)
    medians = np.median(np.random.default_rng(seed).choice(x, size=(resamples, len(x))), axis=1)
    q1, q3 = np.percentile(x, [25, 75])
    lo, hi = np.percentile(medians, [2.5, 97.5])
    return {"median": float(np.median(x)), "min": float(x.min()), "max": float(x.max()), "q1": float(q1),
            "q3": float(q3), "ci_low": float(lo), "ci_high": float(hi), "above_one": int((x > 1).sum()), "n": len(x)}


def tables(payloads):
    """Markdown lines: the paired table (functional / encoder-heads per round), then the functional-only table."""
    lines = ["| backend (mode) | model | balancer | encoder/heads ms | functional ms | functional / encoder-heads: "
             "median (min-max) | IQR | 95% CI of the median | rounds with ratio > 1 | wall-clock ratio, median | "
             "max weight diff after step 1 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    only = ["| backend (mode) | model | EW ms | DB-MTL ms | DB-MTL / EW: median (min-max over rounds) | shared "
            "parameters |", "|---|---|---|---|---|---|"]
    for payload in payloads:
        for result in payload["results"]:
            label = MODE_LABEL.get(result["mode"], result["mode"])
            by_model = {}
            for row in result["rows"]:
                by_model.setdefault(row["model"], {})[row["balancer"]] = row
                if "ratio_cpu" not in row:
                    continue
                e, f = row["encoder_heads"], row["functional"]
                r = spread(row["ratio_cpu"]["per_round"])
                lines.append(f"| {label} | {row['model']} | {row['balancer']} | {e['cpu_ms']:.2f} | "
                             f"{f['cpu_ms']:.2f} | **{r['median']:.3f}** ({r['min']:.2f}-{r['max']:.2f}) | "
                             f"{r['q1']:.2f}-{r['q3']:.2f} | {r['ci_low']:.3f}-{r['ci_high']:.3f} | "
                             f"{r['above_one']}/{r['n']} | {row['ratio_wall']['median']:.3f} | "
                             f"{f.get('max_weight_difference', 0):.1e} |")
            for model, rows in by_model.items():
                if model not in FUNCTIONAL_ONLY or "ew" not in rows or "dbmtl" not in rows:
                    continue
                ew, db = rows["ew"]["functional"], rows["dbmtl"]["functional"]
                only.append(f"| {label} | {model} | {ew['cpu_ms']:.2f} | {db['cpu_ms']:.2f} | "
                            f"{_fmt_ratio(db['dbmtl_over_ew_cpu'])} | {db['shared_parameters']:,} |")
    return lines + [""] + only


def main(args):
    from applications.common import MALLOC_TUNABLES, wants_malloc_tunables

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    payloads = []
    t0 = time.perf_counter()
    for backend in backends:
        with tempfile.TemporaryDirectory() as folder:
            out = os.path.join(folder, f"{backend}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", backend, "--json", out,
                   "--models", args.models, "--balancers", args.balancers, "--rounds", str(args.rounds),
                   "--per-round", str(args.per_round), "--warmup", str(args.warmup), "--threads", str(args.threads),
                   "--runner", args.runner]
            if args.modes:
                modes = [m for m in args.modes.split(",") if common.BACKEND_OF_MODE.get(m) == backend]
                if modes:
                    cmd += ["--modes", ",".join(modes)]
            env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
            if wants_malloc_tunables(env):      # timed as the application commands and run_all.py run
                env["GLIBC_TUNABLES"] = MALLOC_TUNABLES
            common.log(f"== {backend}: {' '.join(cmd[1:])}")
            b0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, cwd=common.ROOT)
            if proc.returncode != 0:
                common.log(f"{backend} FAILED (exit {proc.returncode})")
                continue
            payload = common.read_json(out)
            common.log(f"== {backend} done in {time.perf_counter() - b0:.0f} s")
            payloads.append(payload)
    combined = {"benchmark": "functional_step", "date": datetime.datetime.now().isoformat(timespec="minutes"),
                "command": " ".join(["benchmarks/functional_step.py", *sys.argv[1:]]),
                "wall_s": time.perf_counter() - t0, "backends": payloads}
    if args.json:
        common.write_json(args.json, combined)
    print("\n".join(tables(payloads)))
    return combined


def _cli(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="jax,tensorflow,torch")
    parser.add_argument("--modes", default=None, help="comma list, e.g. tf-graph,tf-xla (default: each backend's "
                        "default compiled step: tf-graph, jax, torch)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--balancers", default=",".join(BALANCERS))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--per-round", type=int, default=10, help="timed steps of each configuration per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=common.DEFAULT_THREADS, help="0: each framework's default")
    parser.add_argument("--runner", default="train_function", choices=("train_function", "train_on_batch"))
    parser.add_argument("--quick", action="store_true", help="3 rounds of 3 steps (smoke)")
    parser.add_argument("--report", default=None, help="print the tables of this JSON (a previous run) and exit")
    parser.add_argument("--json", default=DEFAULT_OUT)
    parser.add_argument("--worker", default=None, choices=sorted(DEFAULT_MODE),
                        help="run one backend in this process (what the parent runs per backend)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.per_round, args.warmup = 3, 3, 1
        if args.json == DEFAULT_OUT:
            args.json = DEFAULT_OUT.replace(".json", "_quick.json")
    if args.report:
        print("\n".join(tables(common.read_json(args.report)["backends"])))
        return None
    if args.worker:
        return worker(args)
    return main(args)


if __name__ == "__main__":
    _cli()
