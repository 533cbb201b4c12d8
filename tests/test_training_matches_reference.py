"""Weights after `fit` match the independent float64 replay of Algorithm 1 (tests/reference.py), on every backend."""

import keras
import numpy as np
import pytest

import keras_dbmtl
from tests import reference

N, D_IN, D_HID, BATCH, LR, EPOCHS = 48, 5, 4, 16, 0.05, 2
SCALES = (1.0, 10.0, 100.0)  # losses differ in scale by 10^4


def make_data(seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, D_IN)).astype("float32")
    true_W = rng.normal(size=(D_IN, 1))
    Y = [(s * (X @ true_W + 0.3 * rng.normal(size=(N, 1)))).astype("float32") for s in SCALES]
    return X, Y


def make_model(l2=0.0, seed=1):
    keras.utils.set_random_seed(seed)
    regularizer = keras.regularizers.L2(l2) if l2 else None
    encoder = keras.layers.Dense(D_HID, kernel_regularizer=regularizer, name="encoder_dense")
    heads = {f"task{t}": keras.layers.Dense(1, name=f"head{t}") for t in range(len(SCALES))}
    model = keras_dbmtl.MultiTaskModel(encoder=encoder, heads=heads)
    model.build((None, D_IN))
    return model


def initial_weights(model):
    W, b = [np.array(v) for v in model.encoder.weights]
    heads = [tuple(np.array(v) for v in model.heads[t].weights) for t in model.task_names]
    return W, b, heads


def batches():
    return [np.arange(i, i + BATCH) for _ in range(EPOCHS) for i in range(0, N, BATCH)]


def fit(model, X, Y, balancer, lr=LR, **compile_kwargs):
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse", balancer=balancer, **compile_kwargs)
    targets = {t: y for t, y in zip(model.task_names, Y)}
    return model.fit(X, targets, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0)


def assert_weights_match(model, W, b, heads, rtol=2e-4, atol=2e-6):
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model.encoder.weights[0]), W, rtol=rtol, atol=atol)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model.encoder.weights[1]), b, rtol=rtol, atol=atol)
    for t, (v, c) in zip(model.task_names, heads):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(model.heads[t].weights[0]), v, rtol=rtol, atol=atol)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(model.heads[t].weights[1]), c, rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "beta, beta_sigma, scaling",
    [(0.9, 0.0, "max"), (0.5, 0.5, "max"), (0.0, 0.0, "max"), (0.9, 0.0, "median"), (0.5, 0.0, 2.0)],
)
def test_dbmtl_matches_algorithm_1(beta, beta_sigma, scaling):
    X, Y = make_data()
    model = make_model()
    W0, b0, heads0 = initial_weights(model)
    balancer = keras_dbmtl.balancers.DBMTL(beta=beta, beta_sigma=beta_sigma, scaling=scaling)
    history = fit(model, X, Y, balancer)
    W, b, heads, ema, step_weights = reference.replay(
        X, Y, W0, b0, heads0, batches(), LR, "dbmtl", beta=beta, beta_sigma=beta_sigma, scaling=scaling
    )
    assert_weights_match(model, W, b, heads)
    # The EMA buffers (balancer state) and the step counter.
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model.balancer.ema_gradients), ema, rtol=2e-4, atol=1e-7)
    assert int(keras.ops.convert_to_numpy(model.balancer.iterations)) == len(batches())
    # Logged task weights: the epoch mean of alpha_k / (||ema_t|| + eps) (Keras averages logs over the epoch).
    steps_per_epoch = N // BATCH
    for t, name in enumerate(model.task_names):
        expected = step_weights[-steps_per_epoch:, t].mean()
        np.testing.assert_allclose(history.history[f"{name}_weight"][-1], expected, rtol=1e-3)


def test_dbmtl_ablations_and_regularization():
    X, Y = make_data(seed=3)
    # Gradient balancing only (no log transform), with an L2 penalty that must stay outside the balancing.
    # Without the log transform the raw gradients are ~10^4 times larger: a smaller learning rate.
    lr = 1e-5
    model = make_model(l2=10.0)
    W0, b0, heads0 = initial_weights(model)
    fit(model, X, Y, keras_dbmtl.balancers.DBMTL(loss_transform=None), lr=lr)
    W, b, heads, _, _ = reference.replay(X, Y, W0, b0, heads0, batches(), lr, "dbmtl", log_transform=False, l2=10.0)
    assert np.abs(W - W0).max() > 1e-4  # the steps moved the weights
    assert_weights_match(model, W, b, heads)

    # Log transform only == EW on log(loss + eps): replay with no EMA/normalisation.
    model = make_model()
    W0, b0, heads0 = initial_weights(model)
    fit(model, X, Y, keras_dbmtl.balancers.DBMTL(gradient_balancing=False))
    W, b, heads = _replay_log_ew(X, Y, W0, b0, heads0)
    assert_weights_match(model, W, b, heads)


def _replay_log_ew(X, Y, W, b, heads):
    W, b = W.astype(np.float64), b.astype(np.float64)
    heads = [(v.astype(np.float64), c.astype(np.float64)) for v, c in heads]
    for idx in batches():
        _, G, head_grads = reference.linear_mtl_gradients(X[idx], [y[idx] for y in Y], W, b, heads, True)
        direction = G.sum(axis=0)
        W = W - LR * direction[: W.size].reshape(W.shape)
        b = b - LR * direction[W.size:]
        heads = [(v - LR * gv, c - LR * gc) for (v, c), (gv, gc) in zip(heads, head_grads)]
    return W, b, heads


@pytest.mark.parametrize("vectorize", [False, True])
def test_looped_and_vectorised_jacobian_agree(vectorize):
    X, Y = make_data(seed=5)
    model = make_model()
    W0, b0, heads0 = initial_weights(model)
    fit(model, X, Y, "dbmtl", vectorize_jacobian=vectorize)
    W, b, heads, _, _ = reference.replay(X, Y, W0, b0, heads0, batches(), LR, "dbmtl")
    assert_weights_match(model, W, b, heads)


def test_ew_trains_exactly_like_plain_keras():
    X, Y = make_data(seed=7)
    model = make_model(l2=0.02)
    W0, b0, heads0 = initial_weights(model)
    loss_weights = {"task0": 2.0, "task1": 0.5, "task2": 0.01}
    history = fit(model, X, Y, "ew", loss_weights=loss_weights)

    # The same network as a plain functional Keras model, same initial weights, same losses and weights.
    keras.utils.set_random_seed(99)
    inputs = keras.Input((D_IN,))
    features = keras.layers.Dense(D_HID, kernel_regularizer=keras.regularizers.L2(0.02))(inputs)
    outputs = {f"task{t}": keras.layers.Dense(1, name=f"task{t}")(features) for t in range(3)}
    plain = keras.Model(inputs, outputs)
    plain.layers[1].set_weights([W0, b0])
    for t, (v, c) in enumerate(heads0):
        plain.get_layer(f"task{t}").set_weights([v, c])
    plain.compile(optimizer=keras.optimizers.SGD(LR), loss={t: "mse" for t in loss_weights}, loss_weights=loss_weights)
    plain_history = plain.fit(
        X, {f"task{t}": y for t, y in enumerate(Y)}, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0
    )
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model.encoder.weights[0]), keras.ops.convert_to_numpy(plain.layers[1].weights[0]),
                               rtol=1e-5, atol=1e-6)
    for t in range(3):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(model.heads[f"task{t}"].weights[0]),
                                   keras.ops.convert_to_numpy(plain.get_layer(f"task{t}").weights[0]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(history.history["loss"], plain_history.history["loss"], rtol=1e-5)
