"""Door 2's step against the `fit` step on JAX: the same MLP, DB-MTL and Adam, timed interleaved in one process.

    python benchmarks/jax_door_step.py                   # dense-T3 (Dense 256 -> 256, 3 heads, batch 128)
    python benchmarks/jax_door_step.py --tasks 11 --repeats 200
    python benchmarks/jax_door_step.py --quick           # a few seconds (smoke)

`fit` side: `MultiTaskModel.compile(balancer="dbmtl")`'s compiled train function on one fixed batch, with its
state threaded by hand as `fit` does (`benchmarks.common.TrainFunctionRunner`). Door side: the same network
written in plain JAX (same shapes and initial weights), `keras_dbmtl.jax.balancer("dbmtl")` and `optax.adam` in
one `jax.jit` step with donated buffers: `tx.task_jacobian` (raw losses, the log-loss Jacobian on the trunk, each
head's own gradient), `tx.update_with_info`, `optimizer.update`. Both balance with the same core
(`keras_dbmtl.balancing`). The issue's target: the door's step within 1.05x of the `fit` step.

Prints the median CPU time per step of each side and their ratio, and writes a section keyed by the model to
benchmarks/results/jax_door_step.json (`--out`).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402


def door_step(model, tasks, learning_rate):
    """The door's jitted step on the model's initial weights: (step(params, opt_state, state, x, ys), carry)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import keras_dbmtl

    def copy(variable):
        return jnp.asarray(np.array(variable.value))

    trunk = [(copy(layer.kernel), copy(layer.bias)) for layer in model.encoder.layers]
    heads = [(copy(model.heads[t].kernel), copy(model.heads[t].bias)) for t in tasks]
    params = {"trunk": trunk, "heads": heads}

    def loss_fn(trunk, heads, x, ys):
        z = x
        for kernel, bias in trunk:
            z = jax.nn.relu(z @ kernel + bias)
        return jnp.stack([jnp.mean(jnp.square(z @ kernel + bias - y)) for (kernel, bias), y in zip(heads, ys)])

    tx = keras_dbmtl.jax.balancer("dbmtl")
    state = tx.init(params["trunk"], task_names=list(tasks))
    optimizer = optax.adam(learning_rate)
    opt_state = optimizer.init(params)

    def step(params, opt_state, state, x, ys):
        raw, jacobian, own = tx.task_jacobian(loss_fn, state, params["trunk"], params["heads"], x, ys)
        update = tx.update_with_info(jacobian, state, raw)
        grads = {"trunk": update.direction, "heads": keras_dbmtl.jax.scale_task_gradients(own, update.head_weights)}
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, update.state, raw

    return jax.jit(step, donate_argnums=(0, 1, 2)), (params, opt_state, state)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=common.DEFAULT_THREADS)
    parser.add_argument("--quick", action="store_true", help="a few repeats (smoke run)")
    parser.add_argument("--out", default=os.path.join(common.ROOT, "benchmarks", "results", "jax_door_step.json"))
    args = parser.parse_args(argv)
    common.use_backend("jax", threads=args.threads)

    import jax

    model_name = f"dense-T{args.tasks}"
    repeats, rounds = (10, 2) if args.quick else (args.repeats, args.rounds)
    x, y = common.make_data(model_name)
    model, losses = common.build_keras_model(model_name)
    model.build((None, x.shape[1]))
    tasks = list(model.task_names)
    step, carry = door_step(model, tasks, 1e-3)                 # the initial weights, before fit's step moves them
    common.compile_model(model, losses, "jax", balancer="dbmtl")
    fit_step = common.TrainFunctionRunner(model, x, y)

    xs, ys = jax.numpy.asarray(x), [jax.numpy.asarray(y[t]) for t in tasks]
    holder = {"carry": carry}

    def door():
        params, opt_state, state, raw = step(*holder["carry"], xs, ys)
        holder["carry"] = (params, opt_state, state)
        jax.block_until_ready((params, state))

    for _ in range(3):                      # compile both (a slow first call would be timed once per round only)
        fit_step()
        door()
    timings = common.interleaved_medians({"fit": fit_step, "door": door}, repeats=repeats, rounds=rounds, warmup=2)
    ratio = timings["door"]["median"] / timings["fit"]["median"]
    section = {
        "model": model_name, "balancer": "dbmtl", "optimizer": "adam", "clock": common.CLOCK,
        "fit_step_ms": 1e3 * timings["fit"]["median"], "door_step_ms": 1e3 * timings["door"]["median"],
        "fit_wall_ms": 1e3 * timings["fit"]["wall"], "door_wall_ms": 1e3 * timings["door"]["wall"],
        "samples": timings["door"]["samples"], "door_over_fit": ratio, "quick": bool(args.quick),
        "threads": common.threads(), "machine": common.machine_info(), "versions": common.backend_versions(),
    }
    print(f"{model_name} DB-MTL + Adam, median {common.CLOCK} time per step: fit {section['fit_step_ms']:.3f} ms, "
          f"door 2 {section['door_step_ms']:.3f} ms, door / fit = {ratio:.3f} ({section['samples']} samples each)")
    payload = common.read_json(args.out) if os.path.exists(args.out) else {}
    payload[model_name + ("-quick" if args.quick else "")] = section
    common.write_json(args.out, payload)
    return section


if __name__ == "__main__":
    main()
