"""A batch in which a task has no labels (every sample_weight 0 for it: loss exactly 0, gradients exactly 0)
keeps the other tasks' update: that task takes no part in the shared direction, its DB-MTL EMA stays as it was
and its head gets no update. Checked against float64 numpy (tests/reference.py's linear model)."""

import keras
import numpy as np
import pytest

from keras_dbmtl.balancers import DBMTL, MGDA
from tests.reference import linear_mtl_gradients
from tests.test_training_matches_reference import make_data, make_model

LR = 0.05


def _numpy(variables):
    return [np.asarray(keras.ops.convert_to_numpy(v), dtype=np.float64) for v in variables]


def _one_step(balancer, unlabelled=2, steps=1):
    X, Y = make_data(seed=3)
    model = make_model(seed=4)
    W0, b0 = _numpy(model.encoder.weights)
    heads0 = [tuple(_numpy(model.heads[t].weights)) for t in model.task_names]
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse", balancer=balancer)
    weights = {t: np.ones(len(X), "float32") for t in model.task_names}
    weights[model.task_names[unlabelled]] = np.zeros(len(X), "float32")
    y = dict(zip(model.task_names, Y))
    history = model.fit(X, y, sample_weight=weights, batch_size=len(X), epochs=steps, verbose=0, shuffle=False)
    return model, history, (X, Y, W0, b0, heads0)


def _check_heads_and_shared(model, data, direction, head_grads, unlabelled, head_weights=None):
    X, Y, W0, b0, heads0 = data
    W, b = _numpy(model.encoder.weights)
    np.testing.assert_allclose(np.concatenate([W.ravel(), b]), np.concatenate([W0.ravel(), b0]) - LR * direction,
                               rtol=1e-4, atol=1e-6)
    for t, task in enumerate(model.task_names):
        v, c = _numpy(model.heads[task].weights)
        scale = 1.0 if head_weights is None else head_weights[t]
        if t == unlabelled:                                   # no label: the head is left exactly as it was
            np.testing.assert_array_equal(v, heads0[t][0])
            np.testing.assert_array_equal(c, heads0[t][1])
        else:
            np.testing.assert_allclose(v, heads0[t][0] - LR * scale * head_grads[t][0], rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(c, heads0[t][1] - LR * scale * head_grads[t][1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scaling", ["max", "mean"])
def test_dbmtl_step_without_one_task_labels(scaling):
    unlabelled = 2
    model, history, data = _one_step(DBMTL(beta=0.5, scaling=scaling), unlabelled)
    X, Y, W0, b0, heads0 = data
    assert history.history["skipped_steps"] == [0.0]
    _, G, head_grads = linear_mtl_gradients(X, Y, W0, b0, heads0, log_transform=True)
    labelled = [t for t in range(len(Y)) if t != unlabelled]
    ema = np.zeros_like(G)
    ema[labelled] = 0.5 * G[labelled]                          # Eq. (1) for the labelled tasks only
    norms = np.linalg.norm(ema, axis=1)
    alpha = norms[labelled].max() if scaling == "max" else norms[labelled].mean()
    direction = sum(alpha / (norms[t] + 1e-8) * ema[t] for t in labelled)
    np.testing.assert_allclose(_numpy([model.balancer.ema_gradients])[0], ema, rtol=1e-4, atol=1e-7)
    assert not np.any(_numpy([model.balancer.ema_gradients])[0][unlabelled])
    _check_heads_and_shared(model, data, direction, head_grads, unlabelled)
    assert history.history[f"task{unlabelled}_weight"] == [0.0]


def test_mgda_step_without_one_task_labels():
    """MGDA (the min-norm point of the labelled tasks' hull; a zero row would otherwise be the min-norm point and
    stop every task): two labelled tasks, closed form on the normalised gradients g_t / (l_t ||g_t||)."""
    unlabelled = 0
    model, history, data = _one_step(MGDA(), unlabelled)
    X, Y, W0, b0, heads0 = data
    assert history.history["skipped_steps"] == [0.0]
    losses, G, head_grads = linear_mtl_gradients(X, Y, W0, b0, heads0, log_transform=False)
    u, v = [G[t] / (losses[t] * np.linalg.norm(G[t]) + 1e-8) for t in (1, 2)]
    gamma = np.clip(np.dot(v - u, v) / np.dot(u - v, u - v), 0.0, 1.0)   # argmin ||gamma u + (1 - gamma) v||
    weights = np.array([0.0, gamma, 1.0 - gamma])
    direction = weights @ G
    _check_heads_and_shared(model, data, direction, head_grads, unlabelled, head_weights=weights)
    np.testing.assert_allclose([history.history[f"task{t}_weight"][0] for t in range(3)], weights, atol=2e-4)


def test_no_task_labelled_is_skipped():
    X, Y = make_data(seed=3)
    model = make_model(seed=4)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse", balancer=DBMTL())
    before = _numpy(model.trainable_variables)
    zeros = {t: np.zeros(len(X), "float32") for t in model.task_names}
    with pytest.warns(RuntimeWarning, match="skipped"):
        history = model.fit(X, dict(zip(model.task_names, Y)), sample_weight=zeros, batch_size=len(X), epochs=1,
                            verbose=0)
    assert history.history["skipped_steps"] == [1.0]
    for a, b in zip(_numpy(model.trainable_variables), before):
        np.testing.assert_array_equal(a, b)
