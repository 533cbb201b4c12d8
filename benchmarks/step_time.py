"""Step time of every registered balancer relative to EW, and the per-task-gradient floor, on one backend.

For each compile mode of the backend and each model, one MultiTaskModel per balancer is built and compiled; then
the compiled train functions of all of them, plus a forward-only and a forward+backward function of the same
model, are called round-robin on one fixed batch (`common.interleaved_medians`). Reported per balancer: median
ms per step, ratio to EW, and the floor of a method that needs T per-task backward passes,

    floor = (F + T * B) / (F + B),   F = forward time, B = (forward + backward time) - F,

measured on the same model, batch and backend. DB-MTL is also timed with the non-default Jacobian computation
(`vectorize_jacobian` flipped), so the looped and the vectorised Jacobian are compared inside full steps, and on
backends that pull the looped Jacobian's rows in a sequential map (SEQUENTIAL_ROWS: JAX, TensorFlow) with the
rows unrolled in a Python loop instead (`dbmtl[unrolled]`, the step before the map; `--jacobian-variants`).

    KERAS_BACKEND is set by --backend:  python benchmarks/step_time.py --backend jax --models dense-T3 --json out.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

FLOOR_KEYS = ("_forward", "_forward_backward")


def _balancer_names(requested=None):
    import keras_dbmtl

    names = keras_dbmtl.balancers.names()
    if requested:
        unknown = [b for b in requested if b not in names]
        if unknown:
            raise ValueError(f"unknown balancers {unknown}; registered: {names}")
        names = [b for b in names if b in requested]
    # EW first (the reference), DB-MTL second.
    return ["ew"] + (["dbmtl"] if "dbmtl" in names else []) + [b for b in names if b not in ("ew", "dbmtl")]


def _default_vectorize(backend):
    from keras_dbmtl import gradients

    return bool(gradients.default_vectorize(gradients.backend_module(backend)))


def host_round_trips(model, runner, mode):
    """Host round trips inside one train step, counted on the traced/compiled program.

    jax: primitives with "callback" in the jaxpr of the train step (pure_callback, io_callback, debug_callback);
    tf-graph: PyFunc/EagerPyFunc ops in the traced step graph and its nested functions; tf-xla: 0 when the step
    compiled (XLA rejects host ops), which it did if we got here; torch: `aten::_local_scalar_dense` calls in a
    profiled step (.item(), bool(tensor), float(tensor): a device sync on a GPU), counted with the non-finite-step
    guard as an accelerator runs it (a select; on the CPU the guard is a Python branch on the flag, two reads that
    cost no sync there and are left out).
    """
    if mode == "jax":
        import jax

        jaxpr = jax.make_jaxpr(model.train_step)(runner.state, runner.data)
        return str(jaxpr).count("callback")
    if mode == "tf-graph":
        import tensorflow as tf

        graph_def = tf.function(model.train_step).get_concrete_function(runner.data).graph.as_graph_def()
        nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
        return sum(n.op in ("PyFunc", "EagerPyFunc", "PyFuncStateless") for n in nodes)
    if mode == "tf-xla":
        return 0
    if mode == "torch":
        from unittest import mock

        from torch.profiler import ProfilerActivity, profile

        with mock.patch("keras_dbmtl.gradients.torch.skips_by_branch", lambda: False), \
                profile(activities=[ProfilerActivity.CPU]) as prof:
            runner()
        return sum(1 for e in prof.events() if e.name == "aten::_local_scalar_dense")
    return None


def _has_sequential_rows(backend):
    from keras_dbmtl import gradients

    return bool(getattr(gradients.backend_module(backend), "SEQUENTIAL_ROWS", False))


class _UnrolledRows:
    """While active (the model is built, compiled and traced), the looped Jacobian's rows are pulled by an
    unrolled Python loop instead of the backend's sequential map."""

    def __init__(self, backend, active):
        from keras_dbmtl import gradients

        self.module, self.active = gradients.backend_module(backend), active

    def __enter__(self):
        if self.active:
            self.module.SEQUENTIAL_ROWS = False

    def __exit__(self, *exc):
        if self.active:
            self.module.SEQUENTIAL_ROWS = True


def time_model(model_name, mode, balancers, repeats, rounds, warmup, budget_s=None, jacobian_variants=True,
               overhead=False, check_host=False):
    """Times one model under one mode. Returns a dict (rows per balancer + floor)."""
    import keras

    backend = keras.backend.backend()
    x, y = common.make_data(model_name)
    num_tasks = common.num_tasks_of(model_name)
    functions, info, errors = {}, {}, {}
    default_vec = _default_vectorize(backend)
    variants = {"vectorize"} if jacobian_variants is True else set(jacobian_variants or ())
    configs = [(b, None) for b in balancers]
    if "vectorize" in variants and "dbmtl" in balancers:
        configs.append(("dbmtl", not default_vec))
    if "unrolled" in variants and "dbmtl" in balancers and not default_vec and _has_sequential_rows(backend):
        configs.append(("dbmtl", "unrolled"))
    models = {}
    for balancer, vectorize in configs:
        key = balancer if vectorize is None else (
            "dbmtl[unrolled]" if vectorize == "unrolled" else f"dbmtl[vectorize={vectorize}]")
        t0 = time.perf_counter()
        try:
            with _UnrolledRows(backend, vectorize == "unrolled"):
                model, losses = common.build_keras_model(model_name)
                common.compile_model(model, losses, mode, balancer=balancer,
                                     vectorize=False if vectorize == "unrolled" else vectorize)
                runner = common.TrainFunctionRunner(model, x, y)
                runner()  # a second step: anything traced lazily on step 2 (state-dependent branches) is compiled
        except Exception as exc:  # a balancer that fails here is reported, not fatal
            errors[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            common.log(f"  [{mode} {model_name}] {key} FAILED: {errors[key]}")
            continue
        functions[key] = runner
        models[key] = model
        info[key] = {"compile_s": time.perf_counter() - t0}
        if check_host:
            try:
                info[key]["host_round_trips"] = host_round_trips(model, runner, mode)
            except Exception as exc:
                info[key]["host_round_trips"] = f"check failed: {type(exc).__name__}: {str(exc)[:200]}"
    if "ew" not in functions:
        raise RuntimeError(f"EW failed on {model_name} / {mode}: {errors.get('ew')}")
    ew_model = models["ew"]
    forward, forward_backward = common.forward_backward_functions(ew_model, x, y, mode)
    functions["_forward"] = forward
    functions["_forward_backward"] = forward_backward
    if overhead:
        for key in ("ew", "dbmtl"):
            if key in models:
                tob_model, losses = common.build_keras_model(model_name)
                common.compile_model(tob_model, losses, mode, balancer=key)
                functions[f"{key}[train_on_batch]"] = common.TrainOnBatchRunner(tob_model, x, y)
    timings = common.interleaved_medians(functions, repeats=repeats, rounds=rounds, warmup=warmup, budget_s=budget_s)
    f = timings["_forward"]["median"]
    fb = timings["_forward_backward"]["median"]
    b = max(fb - f, 1e-9)
    floor = common.floor_ratio(f, fb, num_tasks)
    f_wall, fb_wall = timings["_forward"]["wall"], timings["_forward_backward"]["wall"]
    floor_wall = common.floor_ratio(f_wall, fb_wall, num_tasks)
    ew = timings["ew"]["median"]
    rows = []
    for key, timing in timings.items():
        if key in FLOOR_KEYS:
            continue
        name = key.split("[")[0]
        rows.append(
            {
                "balancer": key,
                "needs": _needs(name),
                "ms": 1e3 * timing["median"],
                "ratio_to_ew": timing["median"] / ew,
                "ratio_to_floor": (timing["median"] / ew) / floor,
                # time beyond EW (+ the T - 1 extra backward passes of a per-task-gradient method): what the
                # balancing itself costs
                "extra_ms": 1e3 * (timing["median"] - ew - (0 if _needs(name) == "losses" else (num_tasks - 1) * b)),
                "wall_ms": 1e3 * timing["wall"],
                "cpu_ms": 1e3 * timing["cpu"],
                "ratio_to_ew_wall": timing["wall"] / timings["ew"]["wall"],
                "samples": timing["samples"],
                "compile_s": info.get(key, {}).get("compile_s"),
                "host_round_trips": info.get(key, {}).get("host_round_trips"),
            }
        )
    return {
        "model": model_name,
        "mode": mode,
        "backend": backend,
        "num_tasks": num_tasks,
        "num_shared_parameters": common.num_shared_parameters(ew_model),
        "num_parameters": common.num_parameters(ew_model),
        "forward_ms": 1e3 * f,
        "forward_backward_ms": 1e3 * fb,
        "backward_over_forward": b / f,
        "backward_ms": 1e3 * b,
        "floor": floor,
        "floor_wall": floor_wall,
        "clock": common.CLOCK,
        "threads": common.threads(),
        "ew_ms": 1e3 * ew,
        "default_vectorize": default_vec,
        "rows": rows,
        "errors": errors,
    }


def _kind(balancer):
    """"losses", "gramian" or "jacobian": what the balancer's kind (its base class) asks the step for."""
    from keras_dbmtl.balancers import GramianBalancer

    if not balancer.uses_task_gradients:
        return "losses"
    return "gramian" if isinstance(balancer, GramianBalancer) else "jacobian"


def _needs(name):
    import keras_dbmtl

    try:
        return _kind(keras_dbmtl.balancers.get(name))
    except Exception:
        return "?"


CORE_BALANCERS = ("ew", "dbmtl", "uw", "imtl_g", "pcgrad")


def main(backend=None, modes=None, models=None, balancers=None, core_models=(), core_balancers=CORE_BALANCERS,
         per_model_balancers=None,
         repeats=10, rounds=5, warmup=1, budget_s=None, jacobian_variants=True, overhead_model=None,
         check_host_model=None, eager_models=None, out=None):
    """Runs the step-time benchmark in this process (backend fixed at first keras import). Returns the payload.

    `models` get every registered balancer (or `balancers`); `core_models` get `core_balancers` only. The mode
    "tf-eager" (not a compiled step) runs EW and DB-MTL only, on `eager_models` (default: all but QM9).
    """
    backend = backend or os.environ.get("KERAS_BACKEND", "jax")
    common.use_backend(backend)
    modes = list(modes or common.MODES[backend])
    models = common.parse_models(models) if isinstance(models, (str, type(None))) else list(models)
    plan = [(m, _balancer_names(balancers)) for m in models]
    per_model_balancers = per_model_balancers or {}
    plan += [(m, _balancer_names(list(per_model_balancers.get(m, core_balancers)))) for m in core_models
             if m not in models]
    results = []
    for mode in modes:
        if common.BACKEND_OF_MODE[mode] != backend:
            raise ValueError(f"mode {mode!r} needs backend {common.BACKEND_OF_MODE[mode]!r}")
        for model_name, names in plan:
            if common.is_qm9(model_name) and not common.qm9_available():
                results.append({"model": model_name, "mode": mode, "backend": backend, "pending": True})
                continue
            if mode == "tf-eager":  # not a compiled step: EW and DB-MTL only, and no QM9 (seconds per step)
                if common.is_qm9(model_name) or (eager_models is not None and model_name not in eager_models):
                    continue
                names = [n for n in names if n in ("ew", "dbmtl")]
            t0 = time.perf_counter()
            result = time_model(model_name, mode, names, repeats, rounds, warmup, budget_s=budget_s,
                                jacobian_variants=jacobian_variants, overhead=(model_name == overhead_model),
                                check_host=(model_name == check_host_model and mode != "tf-eager"))
            result["wall_s"] = time.perf_counter() - t0
            result["sweep"] = "all" if model_name in models else "core"
            common.log(f"[{mode} {model_name}] floor {result['floor']:.2f}  EW {result['ew_ms']:.2f} ms  "
                       + " ".join(f"{r['balancer']}={r['ratio_to_ew']:.2f}" for r in result["rows"][:3])
                       + f"  ({result['wall_s']:.0f} s)")
            results.append(result)
            import keras

            keras.backend.clear_session()
    payload = {"benchmark": "step_time", "versions": common.backend_versions(), "machine": common.machine_info(),
               "repeats": repeats, "rounds": rounds, "warmup": warmup, "results": results}
    if out:
        common.write_json(out, payload)
    return payload


def _cli(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", required=True, choices=sorted(common.MODES))
    parser.add_argument("--modes", default=None, help="comma list, e.g. tf-graph,tf-xla (default: all of the backend)")
    parser.add_argument("--models", default="all", help="every balancer on these: comma list of "
                        + ", ".join(common.MODEL_NAMES))
    parser.add_argument("--core-models", default="", help="the core balancers only on these")
    parser.add_argument("--check-host-model", default=None, help="count host round trips per balancer on this model")
    parser.add_argument("--balancers", default=None, help="comma list (default: every registered balancer)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--budget-s", type=float, default=None, help="per model and mode, after compilation")
    parser.add_argument("--overhead-model", default=None, help="also time train_on_batch for EW/DB-MTL on this model")
    parser.add_argument("--threads", type=int, default=common.DEFAULT_THREADS, help="0: each framework's default")
    parser.add_argument("--jacobian-variants", default="vectorize",
                        help="DB-MTL variants timed beside it: comma list of vectorize (the non-default "
                             "vectorize_jacobian), unrolled (the looped rows unrolled instead of the sequential map), "
                             "or none")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    common.use_backend(args.backend, args.threads)
    main(args.backend, modes=args.modes.split(",") if args.modes else None, models=args.models,
         balancers=args.balancers.split(",") if args.balancers else None, repeats=args.repeats, rounds=args.rounds,
         warmup=args.warmup, budget_s=args.budget_s, overhead_model=args.overhead_model,
         core_models=[m for m in args.core_models.split(",") if m], check_host_model=args.check_host_model,
         jacobian_variants=[v for v in args.jacobian_variants.split(",") if v not in ("", "none")], out=args.json)


if __name__ == "__main__":
    _cli()
