"""What a loop over tasks costs to compile and to run: PCGrad's and GradVac's visits as one `ops.fori_loop` (the
library) against the same body unrolled T times (as before 0.2: a Python `for k in range(T)` while tracing).

    KERAS_BACKEND=jax .venv/bin/python benchmarks/task_loop_compile.py [--tasks 2 5 11 40] [--repeats 200]

The unrolled variant is the library's own code traced with `keras.ops.fori_loop` replaced by a Python loop, so
both run the same operations. For each method and T: the compile time (first call of a freshly compiled
aggregate: `jax.jit`, `tf.function` with XLA; torch is eager and compiles nothing) and the median time per call,
the two variants interleaved (`benchmarks.common.interleaved_medians`), and whether their directions agree.
Prints a table; `--markdown` prints it as the rows of the table in `benchmarks/RESULTS.md`.
"""

import argparse
import os
import sys
import time
from unittest import mock

import keras
import numpy as np
from keras import ops

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import interleaved_medians  # noqa: E402
from keras_dbmtl import balancers  # noqa: E402
from keras_dbmtl._utils import compile_like_a_train_step  # noqa: E402
from keras_dbmtl.balancers import TaskJacobian  # noqa: E402

NUM_PARAMETERS = 64


def _python_fori_loop(lower, upper, body, value):
    for index in range(lower, upper):
        value = body(index, value)
    return value


def _aggregate(name, num_tasks, unrolled):
    """A compiled `(jacobian, losses) -> direction` of a freshly built balancer, traced on its first call."""
    balancer = balancers.get(name, seed=0)
    balancer.build(num_tasks, NUM_PARAMETERS)
    variables = list(balancer.variables)
    initial = [ops.convert_to_tensor(v.value) for v in variables]

    def step(values, jacobian, losses):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            result = balancer.aggregate(balancer.task_losses(losses), TaskJacobian([jacobian], num_tasks))
            return ops.matmul(result.task_weights[None, :], jacobian)[0]

    compiled = compile_like_a_train_step(step)

    def call(jacobian, losses):
        if unrolled:
            with mock.patch.object(keras.ops, "fori_loop", _python_fori_loop):
                return compiled(initial, jacobian, losses)
        return compiled(initial, jacobian, losses)

    return call


def measure(name, num_tasks, repeats):
    rng = np.random.default_rng(num_tasks)
    jacobian = ops.convert_to_tensor(rng.normal(size=(num_tasks, NUM_PARAMETERS)).astype("float32"))
    losses = ops.convert_to_tensor(rng.uniform(0.5, 2.0, size=num_tasks).astype("float32"))
    row, calls, directions = {"method": name, "T": num_tasks}, {}, {}
    for variant in ("unrolled", "loop"):
        call = _aggregate(name, num_tasks, variant == "unrolled")
        begin = time.perf_counter()
        directions[variant] = np.asarray(ops.convert_to_numpy(call(jacobian, losses)))
        row[f"{variant}_compile_s"] = time.perf_counter() - begin
        calls[variant] = lambda call=call: ops.convert_to_numpy(call(jacobian, losses))
    medians = interleaved_medians(calls, repeats)
    for variant in calls:
        row[f"{variant}_ms"] = 1e3 * medians[variant]["median"]
    scale = np.max(np.abs(directions["unrolled"])) + 1e-30
    row["max_difference"] = float(np.max(np.abs(directions["loop"] - directions["unrolled"])) / scale)
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 5, 11, 40])
    parser.add_argument("--methods", nargs="+", default=["pcgrad", "gradvac"])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    backend = keras.backend.backend()
    header = "| backend | method | T | compile unrolled (s) | compile loop (s) | step unrolled (ms) | step loop (ms) " \
             "| loop / unrolled step | max rel. difference |"
    print(header if args.markdown else f"{'method':8s} {'T':>3s} {'compile unrolled':>17s} {'compile loop':>13s} "
          f"{'ms unrolled':>12s} {'ms loop':>8s} {'ratio':>6s} {'difference':>10s}")
    if args.markdown:
        print("|" + " --- |" * 9)
    for name in args.methods:
        for num_tasks in args.tasks:
            r = measure(name, num_tasks, args.repeats)
            ratio = r["loop_ms"] / r["unrolled_ms"]
            if args.markdown:
                print(f"| {backend} | {name} | {num_tasks} | {r['unrolled_compile_s']:.2f} | {r['loop_compile_s']:.2f} "
                      f"| {r['unrolled_ms']:.3f} | {r['loop_ms']:.3f} | {ratio:.2f} | {r['max_difference']:.1e} |",
                      flush=True)
            else:
                print(f"{name:8s} {num_tasks:3d} {r['unrolled_compile_s']:17.2f} {r['loop_compile_s']:13.2f} "
                      f"{r['unrolled_ms']:12.3f} {r['loop_ms']:8.3f} {ratio:6.2f} {r['max_difference']:10.1e}",
                      flush=True)


if __name__ == "__main__":
    main()
