"""XLA's own account of the JAX train step's memory: temporaries, arguments and outputs of the compiled step
(`jax.jit(model.train_step).lower(...).compile().memory_analysis()`), and how many weight-gradient products of the
QM9 edge network's output kernel (edge_hidden x dim^2) the compiled program holds, i.e. backward passes through
the encoder (inside a while loop, the sequential map's one pass counts once).

    KERAS_BACKEND=jax python benchmarks/jax_memory_analysis.py --model qm9-paper --balancer dbmtl [--unrolled]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402


def analyse(model_name, balancer, unrolled=False):
    import jax

    from keras_dbmtl.gradients import jax as jax_gradients

    x, y = common.make_data(model_name)
    model, losses = common.build_keras_model(model_name)
    common.compile_model(model, losses, "jax", balancer=balancer)
    jax_gradients.SEQUENTIAL_ROWS = not unrolled
    model.train_on_batch(x, y)
    state = model._get_jax_state(trainable_variables=True, non_trainable_variables=True, optimizer_variables=True,
                                 metrics_variables=True)
    data = (common.to_backend(x), common.to_backend(y), None)
    t0 = time.perf_counter()
    compiled = jax.jit(model.train_step).lower(state, data).compile()
    seconds = time.perf_counter() - t0
    jax_gradients.SEQUENTIAL_ROWS = True
    memory = compiled.memory_analysis()
    result = {"model": model_name, "balancer": balancer, "unrolled": unrolled, "compile_s": seconds}
    for key in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes"):
        result[key.replace("_in_bytes", "_mb")] = getattr(memory, key) / 2**20
    if common.is_qm9(model_name):
        size = common.qm9_size(model_name)
        shape = f"f32[{size['edge_hidden']},{size['dim'] * size['dim']}]"
        pattern = re.compile(r"= " + re.escape(shape) + r"\{[0-9,]*\} dot\(")
        result["edge_kernel_gradient_dots"] = len(pattern.findall(compiled.as_text()))
    return result


def _cli(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qm9-paper")
    parser.add_argument("--balancer", default="dbmtl")
    parser.add_argument("--unrolled", action="store_true", help="the Jacobian rows unrolled (SEQUENTIAL_ROWS off)")
    parser.add_argument("--threads", type=int, default=common.DEFAULT_THREADS)
    args = parser.parse_args(argv)
    common.use_backend("jax", args.threads)
    print(analyse(args.model, args.balancer, args.unrolled), flush=True)


if __name__ == "__main__":
    _cli()
