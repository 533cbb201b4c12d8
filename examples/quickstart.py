"""Quick start: equal weighting starves the task with the small loss; DB-MTL trains both.

    python examples/quickstart.py                    # any backend: KERAS_BACKEND=jax|torch|tensorflow
    python examples/quickstart.py --write-results    # also benchmarks/results/quickstart/<backend>.json + figure

Two regression tasks read different halves of the input: `large` = 10 (tanh(2 x[:, :8] u) + noise) and
`small` = 0.1 (tanh(2 x[:, 8:] v) + noise), 5 % noise, so their MSE losses differ by 10^4. Both must pass through a shared trunk that ends in a 2-unit
bottleneck: the trunk cannot serve both tasks fully, and what it serves is decided by the balancer.

- Equal weighting (EW) follows the sum of the losses, which is the large task's loss: the bottleneck learns the
  large task, and the small task ends near predicting its mean (validation MSE / variance ~1).
- DB-MTL (`balancer="dbmtl"`) trains on log(loss) (scale-free) and gives every task's shared gradient the same
  norm: the small task is learned as well.

Printed: each task's validation MSE divided by its target variance (1.0 = predicting the mean; lower is better),
mean ± sample standard deviation over 3 seeds, for EW and DB-MTL, after 30 epochs (both methods' curves have settled
by then: the figure). 20-50 s on 2 CPU cores.
"""

import argparse
import json
import os
import time

import numpy as np
import keras

import keras_dbmtl

SCALES = {"large": 10.0, "small": 0.1}
METHODS = ("ew", "dbmtl")
SEEDS = (0, 1, 2)
EPOCHS = int(os.environ.get("QUICKSTART_EPOCHS", 30))
METRIC = "validation MSE / target variance (1.0 = predicting the mean)"


def make_data(n, seed):
    """x (n, 16); each task a scaled tanh of a random projection of its own half of x, plus 5 % noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 16)).astype("float32")
    projections = np.random.default_rng(1234).normal(size=(2, 8)) / np.sqrt(8.0)
    y = {}
    for i, (task, scale) in enumerate(SCALES.items()):
        signal = np.tanh(2.0 * x[:, 8 * i : 8 * (i + 1)] @ projections[i])
        y[task] = (scale * (signal + 0.05 * rng.normal(size=n)))[:, None].astype("float32")
    return x, y


def build_model():
    trunk = keras.Sequential([keras.layers.Dense(32, activation="relu"), keras.layers.Dense(2)])   # the bottleneck
    heads = {task: keras.Sequential([keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)])
             for task in SCALES}
    return keras_dbmtl.MultiTaskModel(encoder=trunk, heads=heads)


def run(balancer, seed, epochs=EPOCHS):
    """Trains one model; returns {task: per-epoch validation MSE / target variance}."""
    keras.utils.set_random_seed(seed)
    x, y = make_data(2048, seed)
    x_val, y_val = make_data(1024, 100 + seed)
    model = build_model()
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse", balancer=balancer)
    history = model.fit(x, y, batch_size=64, epochs=epochs, validation_data=(x_val, y_val), verbose=0)
    return {task: [loss / float(np.var(y_val[task])) for loss in history.history[f"val_{task}_loss"]]
            for task in SCALES}


def _std(values):
    """The sample standard deviation over seeds (0 for one seed)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def main(write_results=False, seeds=SEEDS, epochs=EPOCHS):
    begin = time.time()
    curves = {method: [run(method, seed, epochs) for seed in seeds] for method in METHODS}
    seconds = time.time() - begin
    final = {method: {task: [runs[task][-1] for runs in curves[method]] for task in SCALES} for method in METHODS}
    print(f"\nbackend {keras.backend.backend()}, {len(seeds)} seeds, {epochs} epochs, {seconds:.0f} s")
    print(f"{METRIC}; mean ± sample std over seeds (lower is better)")
    print("balancer  " + "".join(f"{task:>18}" for task in SCALES))
    for method in METHODS:
        cells = [f"{np.mean(final[method][t]):.3f} ± {_std(final[method][t]):.3f}" for t in SCALES]
        print(f"{method:<8}  " + "".join(f"{cell:>18}" for cell in cells))
    if write_results:
        write(final, curves, seeds, epochs, seconds)
    return final


def write(final, curves, seeds, epochs, seconds):
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "results", "quickstart")
    os.makedirs(folder, exist_ok=True)
    mean_curves = {method: {task: np.mean([runs[task] for runs in curves[method]], axis=0).tolist()
                            for task in SCALES} for method in METHODS}
    record = {"backend": keras.backend.backend(), "seeds": list(seeds), "epochs": epochs,
              "seconds": round(seconds, 1), "metric": METRIC, "tasks": list(SCALES), "final": final,
              "curves": mean_curves, "command": "python examples/quickstart.py --write-results"}
    with open(os.path.join(folder, f"{keras.backend.backend()}.json"), "w") as file:
        json.dump(record, file, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, len(SCALES), figsize=(8, 3.2), sharey=True)
    for axis, task in zip(axes, SCALES):
        for method, style in zip(METHODS, ("--", "-")):
            runs = np.array([r[task] for r in curves[method]])
            epochs_axis = np.arange(1, runs.shape[1] + 1)
            axis.plot(epochs_axis, runs.mean(axis=0), style, label=method.upper() if method == "ew" else "DB-MTL")
            axis.fill_between(epochs_axis, runs.min(axis=0), runs.max(axis=0), alpha=0.2)
        axis.set_title(f"task '{task}' (target scale {SCALES[task]:g})")
        axis.set_xlabel("epoch")
        axis.axhline(1.0, color="grey", lw=0.8)
    axes[0].set_ylabel("val MSE / variance")
    axes[0].legend()
    figure.suptitle(f"examples/quickstart.py, {keras.backend.backend()}: mean and range over {len(seeds)} seeds")
    figure.tight_layout()
    figure.savefig(os.path.join(folder, "quickstart.png"), dpi=110)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-results", action="store_true",
                        help="write benchmarks/results/quickstart/<backend>.json and quickstart.png (matplotlib)")
    main(parser.parse_args().write_results)
