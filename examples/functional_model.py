"""A CTR/CVR-style functional Keras model trained with DB-MTL, as it is written: no encoder/heads rewrite.

    python examples/functional_model.py                  # any backend: KERAS_BACKEND=jax|torch|tensorflow
    python examples/functional_model.py --compare-ew     # also train with equal weights, for the table
    python examples/functional_model.py --quick          # a few seconds (what the test runs)

An ordinary `keras.Model(inputs, {task: output})` for a recommender: user and item features go through a shared
trunk; "click" (a click-through logit) has its own tower and also reads the display position (a bias feature
that goes around the trunk); "convert" (a conversion logit) and "dwell" (the seconds spent on the page, a
regression whose MSE is around 1e3, next to cross-entropies around 0.6) share an "engagement" tower, then each
has its own output layer. `keras_dbmtl.MultiTaskModel.from_model(model)` reads from the graph which variables
two tasks or more use (the trunk: all three; the engagement tower: convert and dwell) and which belong to one
task (the towers and output layers); DB-MTL balances the three losses on the shared ones. The data is generated
here.
"""

import argparse
import time

import keras
import numpy as np
from keras import layers

import keras_dbmtl

TASKS = ("click", "convert", "dwell")


def make_data(n, seed):
    """Features {"user": (n, 8), "item": (n, 8), "position": (n, 1)} and targets: click and convert in {0, 1},
    dwell in seconds (mean ~60, sd ~30)."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(0).normal(size=(2, 4, 8))           # fixed: the same task for every split
    taste, appeal = rng.normal(size=(n, 4)), rng.normal(size=(n, 4))
    user = (taste @ mixing[0] + 0.3 * rng.normal(size=(n, 8))).astype("float32")
    item = (appeal @ mixing[1] + 0.3 * rng.normal(size=(n, 8))).astype("float32")
    position = rng.integers(0, 5, size=(n, 1)).astype("float32")
    match = np.sum(taste[:, :2] * appeal[:, :2], axis=1)                 # shared by every task
    engagement = np.tanh(taste[:, 2] + appeal[:, 2]) + 0.5 * taste[:, 3]  # shared by convert and dwell
    click = rng.random(n) < 1.0 / (1.0 + np.exp(-(match - 0.4 * position[:, 0] + 0.5)))
    convert = rng.random(n) < 1.0 / (1.0 + np.exp(-(0.8 * match + 1.5 * engagement - 1.0)))
    dwell = 60.0 + 12.0 * match + 25.0 * engagement + 8.0 * rng.normal(size=n)
    features = {"user": user, "item": item, "position": position}
    targets = {"click": click[:, None].astype("float32"), "convert": convert[:, None].astype("float32"),
               "dwell": dwell[:, None].astype("float32")}
    return features, targets


def build_model(dwell_mean):
    """The recommender as a user writes it: a plain functional Keras model with dict outputs."""
    user = keras.Input((8,), name="user")
    item = keras.Input((8,), name="item")
    position = keras.Input((1,), name="position")
    x = layers.Concatenate(name="features")([user, item])
    trunk = layers.Dense(64, activation="relu", name="trunk_1")(x)
    trunk = layers.Dense(32, activation="relu", name="trunk_2")(trunk)
    click_tower = layers.Dense(16, activation="relu", name="click_tower")(trunk)
    click = layers.Dense(1, name="click")(layers.Concatenate(name="with_position")([click_tower, position]))
    engagement = layers.Dense(16, activation="relu", name="engagement_tower")(trunk)
    convert = layers.Dense(1, name="convert")(layers.Dense(8, activation="relu", name="convert_tower")(engagement))
    dwell = layers.Dense(1, name="dwell", bias_initializer=keras.initializers.Constant(dwell_mean))(engagement)
    return keras.Model({"user": user, "item": item, "position": position},
                       {"click": click, "convert": convert, "dwell": dwell}, name="recommender")


def owners(model):
    """Which layers' variables are shared and which belong to one task, as `MultiTaskModel` reads the graph."""
    def layer_names(variables):
        return sorted({v.path.split("/")[-2] for v in variables})

    rows = {"shared": layer_names(model.shared_variables())}
    rows.update({task: layer_names(variables) for task, variables in model.task_variables().items()})
    return rows


def train(balancer, x, y, validation, epochs, batch_size):
    keras.utils.set_random_seed(0)
    model = keras_dbmtl.MultiTaskModel.from_model(build_model(float(np.mean(y["dwell"]))), name="recommender_mtl")
    logits = keras.losses.BinaryCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), balancer=balancer,
                  loss={"click": logits, "convert": logits, "dwell": "mse"},
                  metrics={"click": [keras.metrics.AUC(from_logits=True, name="auc")],
                           "convert": [keras.metrics.AUC(from_logits=True, name="auc")],
                           "dwell": [keras.metrics.MeanAbsoluteError(name="mae")]})
    history = model.fit(x, y, validation_data=validation, epochs=epochs, batch_size=batch_size, verbose=0)
    return model, history


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--samples", type=int, default=16384)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="1024 samples, 2 epochs (the test)")
    parser.add_argument("--compare-ew", action="store_true", help="also train with equal weights (EW)")
    args = parser.parse_args(argv)
    samples, epochs = (1024, 2) if args.quick else (args.samples, args.epochs)
    x, y = make_data(samples, seed=1)
    validation = make_data(max(samples // 4, 256), seed=2)
    start = time.perf_counter()
    model, history = train("dbmtl", x, y, validation, epochs, args.batch_size)
    rows = {"dbmtl": model.evaluate(*validation, verbose=0, return_dict=True)}
    if args.compare_ew:
        rows["ew"] = train("ew", x, y, validation, epochs, args.batch_size)[0].evaluate(
            *validation, verbose=0, return_dict=True)
    elapsed = time.perf_counter() - start
    split = owners(model)
    h = history.history
    print(f"backend {keras.backend.backend()}, {samples} samples, {epochs} epochs, {elapsed:.1f} s")
    for group, names in split.items():
        print(f"  {group:<8} {', '.join(names)}")
    print("last epoch task weights: " + ", ".join(f"{t} {h[f'{t}_weight'][-1]:.3g}" for t in TASKS))
    print("validation   click AUC   convert AUC   dwell MAE (s)")
    for name, r in rows.items():
        print(f"{name:<10} {r['click_auc']:>11.3f} {r['convert_auc']:>13.3f} {r['dwell_mae']:>15.2f}")
    return {"history": h, "results": rows, "split": split, "seconds": elapsed, "model": model}


if __name__ == "__main__":
    main()
