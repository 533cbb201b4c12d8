"""What TaskBalanceMonitor costs per training step: fit with and without it, same model, data and backend.

    KERAS_BACKEND=jax OMP_NUM_THREADS=1 .venv/bin/python benchmarks/monitor_cost.py [--tasks 3] [--steps 200]

Dense encoder (32 -> 128 -> 128, ~21k shared parameters), T heads, DB-MTL, batch 64. Each variant is fitted once to
compile, then for `--repeats` rounds (interleaved) one epoch of `--steps` steps is timed in process CPU time
(single-threaded, so the number holds on a shared machine). Prints the median ms/step of each and the difference.
"""

import argparse
import time

import keras
import numpy as np

import keras_dbmtl
from keras_dbmtl.callbacks import TaskBalanceMonitor


def build(tasks):
    keras.utils.set_random_seed(0)
    encoder = keras.Sequential([keras.layers.Dense(128, activation="relu"), keras.layers.Dense(128, activation="relu")])
    model = keras_dbmtl.MultiTaskModel(encoder=encoder, heads={f"t{i}": keras.layers.Dense(1) for i in range(tasks)})
    model.compile(optimizer="adam", loss="mse", balancer="dbmtl")
    return model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64 * args.steps, 32)).astype("float32")
    y = {f"t{i}": rng.normal(size=(len(x), 1)).astype("float32") for i in range(args.tasks)}
    variants = {"without": (build(args.tasks), []), "with": None}
    monitor_model = build(args.tasks)
    variants["with"] = (monitor_model, [TaskBalanceMonitor()])
    times = {name: [] for name in variants}
    for name, (model, callbacks) in variants.items():
        model.fit(x[:640], {k: v[:640] for k, v in y.items()}, batch_size=64, epochs=1, verbose=0, callbacks=callbacks)
    for _ in range(args.repeats):
        for name, (model, callbacks) in variants.items():
            start = time.process_time()
            model.fit(x, y, batch_size=64, epochs=1, verbose=0, callbacks=callbacks)
            times[name].append((time.process_time() - start) / args.steps * 1e3)
    median = {name: float(np.median(t)) for name, t in times.items()}
    print(f"backend {keras.backend.backend()}, T = {args.tasks}, {args.steps} steps x {args.repeats}: "
          f"without {median['without']:.3f} ms/step, with {median['with']:.3f} ms/step, "
          f"difference {median['with'] - median['without']:+.3f} ms/step "
          f"({100 * (median['with'] / median['without'] - 1):+.1f} %)")


if __name__ == "__main__":
    main()
