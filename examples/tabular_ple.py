"""Tabular multi-task learning: PLE + DB-MTL on a regression and a classification target, with the monitor.

    python examples/tabular_ple.py                     # any backend: KERAS_BACKEND=jax|torch|tensorflow
    python examples/tabular_ple.py --compare-ew        # also train with equal weights, for the table
    python examples/tabular_ple.py --quick             # a few seconds (what the test runs)

The data is generated here: customers with 12 numeric features; "spend" is a yearly amount in dollars (a
regression whose MSE is around 1e5) and "churn" a yes/no label (a binary cross-entropy around 0.7), both driven
by the same latent factors plus a factor of their own. A PLE with two extraction levels (one expert per task,
two shared, per level) feeds one tower per task; DB-MTL balances the two losses, and a TaskBalanceMonitor logs
the task weights, gradient norms and the cosine of the two task gradients. The figures go to `--out`
(learning curves, task weights, gradient norms, cosine heat map); with `--tensorboard DIR` (needs tensorflow and
tensorboard) the same scalars also go to TensorBoard.
"""

import argparse
import os
import time

import keras
import numpy as np

import keras_dbmtl
from keras_dbmtl import architectures, plotting
from keras_dbmtl.callbacks import TaskBalanceMonitor

TASKS = ("spend", "churn")


def make_data(n, seed):
    """x (n, 12); spend in dollars (mean ~1000, sd ~300); churn in {0, 1} (about 40 % ones)."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(0).normal(size=(4, 12))          # fixed: the same task for every split
    latent = rng.normal(size=(n, 4))                                # 2 shared factors, 1 per task
    x = (latent @ mixing + 0.3 * rng.normal(size=(n, 12))).astype("float32")
    shared = np.tanh(latent[:, 0]) + 0.5 * latent[:, 1] ** 2
    spend = 1000.0 + 250.0 * shared + 120.0 * latent[:, 2] + 30.0 * rng.normal(size=n)
    churn_logit = -1.5 * shared + 1.2 * np.sin(2.0 * latent[:, 3]) + 0.8
    churn = (rng.random(n) < 1.0 / (1.0 + np.exp(-churn_logit))).astype("float32")
    return x, {"spend": spend[:, None].astype("float32"), "churn": churn[:, None]}


def build_model(spend_mean, levels=2):
    encoder = architectures.PLE(list(TASKS), num_levels=levels, task_experts=1, shared_experts=2,
                                expert_units=(32,))
    # the spend tower starts at the mean spend (its residuals, not its mean, are what is learnt)
    start = {"spend": keras.initializers.Constant(spend_mean), "churn": "zeros"}
    towers = {t: keras.Sequential([keras.layers.Dense(16, activation="relu"),
                                   keras.layers.Dense(1, bias_initializer=start[t])], name=f"{t}_mlp")
              for t in TASKS}
    return keras_dbmtl.MultiTaskModel(encoder=encoder, heads=architectures.towers(encoder, towers),
                                      task_layers=encoder.task_layers(), name="tabular_ple")


def train(balancer, x, y, validation, epochs, batch_size, callbacks=()):
    keras.utils.set_random_seed(0)
    model = build_model(float(np.mean(y["spend"])))
    model.compile(optimizer=keras.optimizers.Adam(3e-3), balancer=balancer,
                  loss={"spend": "mse", "churn": keras.losses.BinaryCrossentropy(from_logits=True)},
                  metrics={"spend": [keras.metrics.MeanAbsoluteError(name="mae")],
                           "churn": [keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy")]})
    history = model.fit(x, y, validation_data=validation, epochs=epochs, batch_size=batch_size, verbose=0,
                        callbacks=list(callbacks))
    return model, history


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tabular_ple_output", help="directory of the figures")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="512 samples, 2 epochs (the test)")
    parser.add_argument("--compare-ew", action="store_true", help="also train with equal weights (EW)")
    parser.add_argument("--tensorboard", default=None, help="TensorBoard log directory")
    args = parser.parse_args(argv)
    samples, epochs = (512, 2) if args.quick else (args.samples, args.epochs)
    x, y = make_data(samples, seed=1)
    validation = make_data(max(samples // 4, 128), seed=2)
    start = time.perf_counter()
    callbacks = []
    tensorboard = None
    if args.tensorboard:
        tensorboard = keras.callbacks.TensorBoard(log_dir=args.tensorboard)
        callbacks.append(tensorboard)
    monitor = TaskBalanceMonitor(every_n_steps=20, tensorboard=tensorboard)
    model, history = train("dbmtl", x, y, validation, epochs, args.batch_size, callbacks + [monitor])
    figures = plotting.plot_task_balance(history, args.out, monitor=monitor)
    rows = {"dbmtl": model.evaluate(*validation, verbose=0, return_dict=True)}
    if args.compare_ew:
        ew_model, _ = train("ew", x, y, validation, epochs, args.batch_size)
        rows["ew"] = ew_model.evaluate(*validation, verbose=0, return_dict=True)
    elapsed = time.perf_counter() - start
    h = history.history
    print(f"backend {keras.backend.backend()}, {samples} samples, {epochs} epochs, {elapsed:.1f} s")
    print(f"last epoch: weights spend {h['spend_weight'][-1]:.3g}, churn {h['churn_weight'][-1]:.3g}; "
          f"gradient norms {h['spend_gradient_norm'][-1]:.3g}, {h['churn_gradient_norm'][-1]:.3g}; "
          f"cosine {h['cosine_spend_churn'][-1]:+.3f}")
    print("validation   spend MAE ($)   churn accuracy")
    for name, r in rows.items():
        print(f"{name:<10} {r['spend_mae']:>15.1f} {r['churn_accuracy']:>16.3f}")
    print("figures: " + ", ".join(os.path.relpath(p) for p in figures.values()))
    return {"history": h, "figures": figures, "results": rows, "seconds": elapsed, "monitor": monitor}


if __name__ == "__main__":
    main()
