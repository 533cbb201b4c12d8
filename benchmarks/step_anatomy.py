"""How far one traced DB-MTL training step travels through the library (`sys.setprofile`).

Counts, for one call of `MultiTaskModel.train_step` (JAX: the pure step, unjitted; the Python a trace runs) on a small dense model: the library's function
calls, the distinct functions, the hops between files (consecutive library calls in different files) and the files
reached. A measure of how easy the centre is to read, not of speed.

    KERAS_BACKEND=jax .venv/bin/python benchmarks/step_anatomy.py [--balancer dbmtl]
"""

import argparse
import collections
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--balancer", default="dbmtl")
    parser.add_argument("--trace", action="store_true", help="also print every library call, in order")
    args = parser.parse_args()
    import keras
    import numpy as np

    import keras_dbmtl

    package = os.path.dirname(keras_dbmtl.__file__)
    inputs = keras.Input((8,))
    trunk = keras.layers.Dense(16, activation="relu")(inputs)
    model = keras_dbmtl.MultiTaskModel(inputs=inputs, outputs={t: keras.layers.Dense(1, name=t)(trunk)
                                                               for t in ("a", "b", "c")})
    model.compile(optimizer="adam", loss="mse", balancer=args.balancer)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8)).astype("float32")
    y = {t: rng.normal(size=(32, 1)).astype("float32") for t in ("a", "b", "c")}
    model.fit(x, y, epochs=1, batch_size=32, verbose=0)           # build everything; then trace one step alone

    calls, files, hops = [], collections.Counter(), 0
    last_file = [None]

    def profile(frame, event, arg):
        nonlocal hops
        if event != "call":
            return
        path = frame.f_code.co_filename
        if not path.startswith(package):
            return
        name = os.path.relpath(path, package)
        calls.append((name, frame.f_code.co_name))
        files[name] += 1
        if last_file[0] is not None and last_file[0] != name:
            hops += 1
        last_file[0] = name

    data = (keras.ops.convert_to_tensor(x), {t: keras.ops.convert_to_tensor(v) for t, v in y.items()})
    backend = keras.backend.backend()
    if backend == "jax":
        state = (
            [v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables],
            [v.value for v in model.optimizer.variables], [v.value for v in model.metrics_variables],
        )
        sys.setprofile(profile)
        model.train_step(state, data)            # the pure step, run once without jit: the same Python calls
    else:
        sys.setprofile(profile)
        model.train_step(data)
    sys.setprofile(None)
    print(f"backend {backend}, balancer {args.balancer}: {len(calls)} library calls to {len(set(calls))} functions,"
          f" {hops} hops between {len(files)} files")
    for name, count in files.most_common():
        print(f"  {count:4d}  {name}")
    if args.trace:
        for name, function in calls:
            print(f"    {name}:{function}")


if __name__ == "__main__":
    main()
