"""Checks every architecture test uses: the exact task/shared split (by perturbing variables and watching which
tasks' outputs move), a short DB-MTL fit, and a .keras round trip."""

import os

import keras
import numpy as np

import keras_dbmtl
from keras_dbmtl import architectures

TASKS = ["a", "b", "c"]


def inputs(rng, n=16, d=6):
    return rng.normal(size=(n, d)).astype("float32")


def make_model(encoder, tasks=TASKS):
    heads = architectures.towers(encoder, {t: keras.layers.Dense(1, name=f"{t}_head") for t in tasks})
    return keras_dbmtl.MultiTaskModel(encoder=encoder, heads=heads, task_layers=encoder.task_layers())


def outputs(model, x):
    return {t: keras.ops.convert_to_numpy(v).astype("float64") for t, v in model(x).items()}


def tasks_reached(model, x, variable, rng):
    """The tasks whose outputs change when `variable` is perturbed (forward passes only)."""
    before = outputs(model, x)
    old = keras.ops.convert_to_numpy(variable)
    variable.assign(old + rng.normal(scale=0.5, size=old.shape).astype(old.dtype))
    after = outputs(model, x)
    variable.assign(old)
    return {t for t in before if np.max(np.abs(after[t] - before[t])) > 1e-6}


def assert_exact_split(model, x, rng):
    """Each task variable reaches only its own task; each shared variable reaches at least two tasks (so no
    variable is left shared that a single task could own, and none is owned that another task needs)."""
    model(x)
    owned = model.task_variables()
    for task, variables in owned.items():
        for v in variables:
            assert tasks_reached(model, x, v, rng) == {task}, (task, v.path)
    for v in model.shared_variables():
        assert len(tasks_reached(model, x, v, rng)) >= 2, v.path


def count(variables):
    return sum(int(np.prod(v.shape)) for v in variables)


def fit_dbmtl(model, x, epochs=8):
    """A short DB-MTL fit on targets with loss scales 1e-2 .. 1e2; returns the History's total losses."""
    scales = [0.1, 1.0, 10.0][: len(model.task_names)]
    y = {t: (s * np.tanh(x[:, i : i + 1] + x[:, i + 1 : i + 2])).astype("float32")
         for i, (t, s) in enumerate(zip(model.task_names, scales))}
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", balancer="dbmtl")
    history = model.fit(x, y, batch_size=8, epochs=epochs, verbose=0)
    return history.history["loss"]


def assert_fits(model, x):
    losses = fit_dbmtl(model, x)
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0]


def assert_round_trip(model, x, tmp_path):
    """Same outputs after model.save / keras.saving.load_model, and the same task/shared split."""
    path = os.path.join(str(tmp_path), "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    expected, got = outputs(model, x), outputs(loaded, x)
    for t in expected:
        np.testing.assert_array_equal(got[t], expected[t])
    def paths(m, variables):            # layer and variable names (a loaded model's paths lack the outer scopes)
        return ["/".join(v.path.split("/")[-2:]) for v in variables]

    assert paths(loaded, loaded.shared_variables()) == paths(model, model.shared_variables())
    for t in model.task_names:
        assert paths(loaded, loaded.task_variables()[t]) == paths(model, model.task_variables()[t])
    return loaded


def dense_parameters(input_dim, units, bias=True):
    total, previous = 0, input_dim
    for u in units:
        total += previous * u + (u if bias else 0)
        previous = u
    return total
