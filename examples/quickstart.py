"""Quick start: EW vs DB-MTL on three regression tasks whose losses differ in scale by 10^4.

    python examples/quickstart.py            # any backend: KERAS_BACKEND=jax|torch|tensorflow

Prints each task's validation MSE relative to its target variance after training with each balancer.
"""

import numpy as np
import keras

import keras_dbmtl

SCALES = {"small": 1.0, "medium": 10.0, "large": 100.0}


def data(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 16)).astype("float32")
    w = np.random.default_rng(0).normal(size=(16, 3))
    y = {name: (s * np.sin(x @ w[:, [i]]) + 0.05 * s * rng.normal(size=(n, 1))).astype("float32")
         for i, (name, s) in enumerate(SCALES.items())}
    return x, y


def run(balancer):
    keras.utils.set_random_seed(0)
    encoder = keras.Sequential([keras.layers.Dense(64, activation="relu"), keras.layers.Dense(64, activation="relu")])
    model = keras_dbmtl.MultiTaskModel(encoder=encoder, heads={t: keras.layers.Dense(1) for t in SCALES})
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse", balancer=balancer)
    x, y = data(4096, 1)
    xv, yv = data(1024, 2)
    model.fit(x, y, batch_size=128, epochs=10, verbose=2, validation_data=(xv, yv))
    results = model.evaluate(xv, yv, verbose=0, return_dict=True)
    return {t: results[f"{t}_loss"] / float(np.var(yv[t])) for t in SCALES}


if __name__ == "__main__":
    table = {name: run(name) for name in ("ew", "dbmtl")}
    print(f"\nbackend: {keras.backend.backend()}; validation MSE / target variance (lower is better)")
    print("balancer  " + "  ".join(f"{t:>8}" for t in SCALES))
    for name, row in table.items():
        print(f"{name:<8}  " + "  ".join(f"{row[t]:8.4f}" for t in SCALES))
