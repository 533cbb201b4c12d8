"""The per-task Jacobian alone: looped (T backward passes) against vectorised (one batched backward), per backend.

For each compile mode of the backend and each model, `keras_dbmtl.gradients.task_gradients` (the function the
train step calls for gradient-level balancers) is wrapped in the mode's compiler (tf.function with or without
XLA, jax.jit, plain torch) twice, with `vectorize=False` and `vectorize=True`, and timed interleaved with a
forward+backward of the summed loss (the EW gradient) on the same batch. The full-step comparison (DB-MTL compiled
with `vectorize_jacobian` flipped) is in step_time.py; `DEFAULT_VECTORIZE` of each gradients module should be the
faster of the two in both.

    python benchmarks/jacobian.py --backend torch --models dense-T11,qm9 --json out.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402


def jacobian_function(model, x, y, mode, vectorize):
    """A zero-argument callable computing the task Jacobian (shared blocks + head gradients), synchronised."""
    import keras

    from keras_dbmtl import gradients

    backend = keras.backend.backend()
    xs, ys = common.to_backend(x), common.to_backend(y)
    shared = model.shared_variables()
    by_task = model.task_variables()
    groups = [by_task[t] for t in model.task_names]

    def forward_on(inputs):
        def forward():
            y_pred = model(inputs, training=True)
            return model._task_losses(ys, y_pred, None), 0.0, None

        return forward

    if backend == "jax":
        import jax
        import jax.numpy as jnp
        from keras.src.backend.common.stateless_scope import StatelessScope

        tv_vars, ntv_vars = model.trainable_variables, model.non_trainable_variables
        tv = [jnp.copy(v.value) for v in tv_vars]
        ntv = [jnp.copy(v.value) for v in ntv_vars]

        def pure(tv, ntv, inputs):
            mapping = list(zip(tv_vars, tv)) + list(zip(ntv_vars, ntv))
            with StatelessScope(state_mapping=mapping):
                result = gradients.task_gradients(forward_on(inputs), shared, groups, (), vectorize)
            return result.shared_blocks, result.task_gradients

        jitted = jax.jit(pure)

        def run():
            jax.block_until_ready(jitted(tv, ntv, xs))

        return run
    if backend == "tensorflow":
        import tensorflow as tf

        def compute(inputs):
            result = gradients.task_gradients(forward_on(inputs), shared, groups, (), vectorize)
            return result.shared_blocks, result.task_gradients

        if mode != "tf-eager":
            compute = tf.function(compute, jit_compile=(mode == "tf-xla"), reduce_retracing=True)

        def run():
            blocks, _ = compute(xs)
            blocks[0].numpy()

        return run

    def run():
        gradients.task_gradients(forward_on(xs), shared, groups, (), vectorize)

    return run


def time_model(model_name, mode, repeats, rounds, warmup):
    import keras

    from keras_dbmtl import gradients

    backend = keras.backend.backend()
    x, y = common.make_data(model_name)
    model, losses = common.build_keras_model(model_name)
    common.compile_model(model, losses, mode, balancer="ew")
    model.train_on_batch(common.to_backend(x), common.to_backend(y))  # builds everything
    functions, compile_s, errors = {}, {}, {}
    for vectorize in (False, True):
        key = "vectorized" if vectorize else "looped"
        t0 = time.perf_counter()
        try:
            fn = jacobian_function(model, x, y, mode, vectorize)
            fn()
        except Exception as exc:
            errors[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            common.log(f"  [{mode} {model_name}] jacobian {key} FAILED: {errors[key]}")
            continue
        functions[key] = fn
        compile_s[key] = time.perf_counter() - t0
    forward, forward_backward = common.forward_backward_functions(model, x, y, mode)
    functions["forward_backward"] = forward_backward
    timings = common.interleaved_medians(functions, repeats=repeats, rounds=rounds, warmup=warmup)
    fb = timings["forward_backward"]["median"]
    result = {
        "model": model_name,
        "mode": mode,
        "backend": backend,
        "num_tasks": common.num_tasks_of(model_name),
        "num_shared_parameters": common.num_shared_parameters(model),
        "forward_backward_ms": 1e3 * fb,
        "default_vectorize": bool(gradients.default_vectorize(gradients.backend_module(backend))),
        "clock": common.CLOCK,
        "threads": common.threads(),
        "errors": errors,
        "compile_s": compile_s,
    }
    for key in ("looped", "vectorized"):
        if key in timings:
            result[f"{key}_ms"] = 1e3 * timings[key]["median"]
            result[f"{key}_over_forward_backward"] = timings[key]["median"] / fb
            result[f"{key}_wall_ms"] = 1e3 * timings[key]["wall"]
    if "looped_ms" in result and "vectorized_ms" in result:
        result["vectorized_over_looped"] = result["vectorized_ms"] / result["looped_ms"]
        result["faster"] = "vectorized" if result["vectorized_ms"] < result["looped_ms"] else "looped"
    return result


def main(backend=None, modes=None, models=None, repeats=10, rounds=5, warmup=1, out=None):
    backend = backend or os.environ.get("KERAS_BACKEND", "jax")
    common.use_backend(backend)
    modes = list(modes or [m for m in common.MODES[backend] if m != "tf-eager"])
    models = common.parse_models(models) if isinstance(models, (str, type(None))) else list(models)
    results = []
    for mode in modes:
        for model_name in models:
            if common.is_qm9(model_name) and not common.qm9_available():
                results.append({"model": model_name, "mode": mode, "backend": backend, "pending": True})
                continue
            t0 = time.perf_counter()
            result = time_model(model_name, mode, repeats, rounds, warmup)
            result["wall_s"] = time.perf_counter() - t0
            common.log(f"[jacobian {mode} {model_name}] looped {result.get('looped_ms', float('nan')):.2f} ms, "
                       f"vectorized {result.get('vectorized_ms', float('nan')):.2f} ms, "
                       f"fwd+bwd {result['forward_backward_ms']:.2f} ms ({result['wall_s']:.0f} s)")
            results.append(result)
            import keras

            keras.backend.clear_session()
    payload = {"benchmark": "jacobian", "versions": common.backend_versions(), "machine": common.machine_info(),
               "repeats": repeats, "rounds": rounds, "results": results}
    if out:
        common.write_json(out, payload)
    return payload


def _cli(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", required=True, choices=sorted(common.MODES))
    parser.add_argument("--modes", default=None)
    parser.add_argument("--models", default="all")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=common.DEFAULT_THREADS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    common.use_backend(args.backend, args.threads)
    main(args.backend, modes=args.modes.split(",") if args.modes else None, models=args.models,
         repeats=args.repeats, rounds=args.rounds, warmup=args.warmup, out=args.json)


if __name__ == "__main__":
    _cli()
