"""compile(task_gradients=..., task_gradients_every=k): the amortised and representation-level task gradients
against float64 numpy replays written from the paper's equations (tests/reference.py's linear model)."""

import keras
import numpy as np
import pytest

import keras_dbmtl
from tests import reference

N, D_IN, D_HID, BATCH, LR, EPOCHS, EPS = 48, 5, 4, 16, 0.05, 2, 1e-8
SCALES = (1.0, 10.0, 100.0)


def make_data(num_tasks=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, D_IN)).astype("float32")
    true_W = rng.normal(size=(D_IN, 1))
    Y = [(s * (X @ true_W + 0.3 * rng.normal(size=(N, 1)))).astype("float32") for s in SCALES[:num_tasks]]
    return X, Y


def make_model(num_tasks=3, seed=1):
    keras.utils.set_random_seed(seed)
    heads = {f"task{t}": keras.layers.Dense(1, name=f"head{t}") for t in range(num_tasks)}
    model = keras_dbmtl.MultiTaskModel(encoder=keras.layers.Dense(D_HID, name="encoder_dense"), heads=heads)
    model.build((None, D_IN))
    return model


def weights_of(model):
    W, b = [np.array(keras.ops.convert_to_numpy(v), np.float64) for v in model.encoder.weights]
    heads = [tuple(np.array(keras.ops.convert_to_numpy(v), np.float64) for v in model.heads[t].weights)
             for t in model.task_names]
    return W, b, heads


def fit(model, X, Y, balancer, batch_size=BATCH, **compile_kwargs):
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse", balancer=balancer, **compile_kwargs)
    targets = {t: y for t, y in zip(model.task_names, Y)}
    return model.fit(X, targets, batch_size=batch_size, epochs=EPOCHS, shuffle=False, verbose=0)


def assert_same_weights(got, expected, rtol, atol):
    (W, b, heads), (W_e, b_e, heads_e) = got, expected
    np.testing.assert_allclose(W, W_e, rtol=rtol, atol=atol)
    np.testing.assert_allclose(b, b_e, rtol=rtol, atol=atol)
    for (v, c), (v_e, c_e) in zip(heads, heads_e):
        np.testing.assert_allclose(v, v_e, rtol=rtol, atol=atol)
        np.testing.assert_allclose(c, c_e, rtol=rtol, atol=atol)


def test_every_step_is_todays_step():
    X, Y = make_data()
    exact, every_1 = make_model(), make_model()
    fit(exact, X, Y, keras_dbmtl.balancers.DBMTL())
    fit(every_1, X, Y, keras_dbmtl.balancers.DBMTL(), task_gradients_every=1, task_gradients="parameters")
    assert_same_weights(weights_of(every_1), weights_of(exact), rtol=1e-6, atol=1e-7)


def replay_amortised_dbmtl(X, Y, W, b, heads, batches, every, beta=0.9):
    """DB-MTL (Algorithm 1) with the per-task gradients every `every` steps: on a refresh step the EMA (Eq. 1),
    w_t = max_j ||ema_j|| / (||ema_t|| + eps) (Eq. 2) and d = sum_t w_t ema_t; in between d = sum_t w_t g_t with
    the last w (g_t: gradient of log(l_t + eps)); heads on their own log-loss."""
    ema, w, applied = np.zeros((len(heads), W.size + b.size)), None, []
    for step, idx in enumerate(batches):
        _, G, head_grads = reference.linear_mtl_gradients(X[idx], [y[idx] for y in Y], W, b, heads, True, EPS)
        if step % every == 0:
            ema = beta * ema + (1 - beta) * G
            norms = np.linalg.norm(ema, axis=1)
            w = norms.max() / (norms + EPS)
            direction = w @ ema
        else:
            direction = w @ G
        applied.append(w)
        W = W - LR * direction[: W.size].reshape(W.shape)
        b = b - LR * direction[W.size :]
        heads = [(v - LR * gv, c - LR * gc) for (v, c), (gv, gc) in zip(heads, head_grads)]
    return (W, b, heads), ema, np.array(applied)


@pytest.mark.parametrize("every", [2, 4])
def test_amortised_dbmtl_matches_replay(every):
    X, Y = make_data()
    model = make_model()
    initial = weights_of(model)
    history = fit(model, X, Y, keras_dbmtl.balancers.DBMTL(), task_gradients_every=every)
    batches = [np.arange(i, i + BATCH) for _ in range(EPOCHS) for i in range(0, N, BATCH)]
    expected, ema, applied = replay_amortised_dbmtl(X, Y, *initial, batches, every)
    assert_same_weights(weights_of(model), expected, rtol=2e-4, atol=2e-6)
    # State on refresh steps only: the EMA and the balancer's counter; the schedule counts every step.
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model.balancer.ema_gradients), ema, rtol=2e-4, atol=1e-7)
    refreshes = len(range(0, len(batches), every))
    assert int(keras.ops.convert_to_numpy(model.balancer.iterations)) == refreshes
    assert int(keras.ops.convert_to_numpy(model.task_gradient_schedule.step)) == len(batches)
    per_epoch = N // BATCH
    for t, name in enumerate(model.task_names):
        np.testing.assert_allclose(history.history[f"{name}_weight"][-1], applied[-per_epoch:, t].mean(), rtol=1e-3)


def replay_representation_mgda(X, Y, W, b, heads, steps):
    """MGDA-UB (Sener & Koltun), T = 2, no normaliser: g_t = dl_t/dz for z = X W + b (the whole batch),
    w = (gamma, 1 - gamma) with gamma = clip(<g_2 - g_1, g_2> / ||g_1 - g_2||^2, 0, 1) (min-norm point of the
    segment); theta gets the backward of the cotangent sum_t w_t g_t through the encoder, heads w_t grad l_t."""
    for _ in range(steps):
        z = X @ W + b
        rep_grads, head_grads = [], []
        for (v, c), y in zip(heads, Y):
            diff = z @ v + c - y
            d_pred = 2.0 * diff / diff.size
            rep_grads.append(d_pred @ v.T)
            head_grads.append((z.T @ d_pred, d_pred.sum(axis=0)))
        g1, g2 = (g.ravel() for g in rep_grads)
        gamma = np.clip((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2)), 0.0, 1.0)
        w = np.array([gamma, 1.0 - gamma])
        cotangent = w[0] * rep_grads[0] + w[1] * rep_grads[1]
        W, b = W - LR * X.T @ cotangent, b - LR * cotangent.sum(axis=0)
        heads = [(v - LR * wt * gv, c - LR * wt * gc) for (v, c), (gv, gc), wt in zip(heads, head_grads, w)]
    return W, b, heads


def test_representation_mgda_matches_numpy():
    X, Y = make_data(num_tasks=2)
    model = make_model(num_tasks=2)
    initial = weights_of(model)
    fit(model, X, Y, keras_dbmtl.balancers.MGDA(normalization="none"), batch_size=N,
        task_gradients="representation")
    expected = replay_representation_mgda(X.astype(np.float64), [y.astype(np.float64) for y in Y], *initial, EPOCHS)
    assert_same_weights(weights_of(model), expected, rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize(
    "balancer, kwargs, message",
    [
        ("dbmtl", {"task_gradients": "representation"}, "not available for balancer 'dbmtl'"),
        ("graddrop", {"task_gradients_every": 3}, "element-wise"),
        ("ew", {"task_gradients_every": 2}, "loss-level"),
        ("mgda", {"task_gradients_every": 0}, "positive integer"),
        ("mgda", {"task_gradients": "rep"}, "must be one of"),
    ],
)
def test_unavailable_choices_raise(balancer, kwargs, message):
    model = make_model()
    with pytest.raises(ValueError, match=message):
        model.compile(optimizer="sgd", loss="mse", balancer=balancer, **kwargs)


def test_schedule_state_is_saved(tmp_path):
    X, Y = make_data(num_tasks=2)
    model = make_model(num_tasks=2)
    fit(model, X, Y, "dbmtl", task_gradients_every=4)        # 6 steps: refreshes at 0 and 4
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    schedule = restored.task_gradient_schedule
    assert schedule.every == 4 and int(keras.ops.convert_to_numpy(schedule.step)) == 6
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(schedule.weights_applied),
                                  keras.ops.convert_to_numpy(model.task_gradient_schedule.weights_applied))


def test_an_undeclared_gramian_balancer_gets_what_its_kind_allows():
    """A user's Gramian balancer that declares nothing: the representation level and amortisation are open to it
    without learned variables and closed with one (the rule the registered classes' declarations replace)."""
    from keras_dbmtl import task_gradients as modes
    from keras_dbmtl.balancers import Aggregation, GramianBalancer

    class Plain(GramianBalancer):
        def aggregate(self, losses, task_jacobian):
            return Aggregation(task_weights=keras.ops.ones((self.num_tasks,)))

    class Learned(Plain):
        def build(self, num_tasks, num_shared_parameters, task_names=None, shared_shapes=None):
            super().build(num_tasks, num_shared_parameters, task_names, shared_shapes)
            self.scales = self.add_weight(shape=(num_tasks,), initializer="zeros", trainable=True, name="scales")

    plain, learned = Plain(), Learned()
    for balancer in (plain, learned):
        balancer.build(2, 3)
    modes.check(plain, "representation", 1)
    modes.check(plain, "parameters", 3)
    for mode, every in (("representation", 1), ("parameters", 3)):
        with pytest.raises(ValueError, match="not a Gramian balancer without learned variables"):
            modes.check(learned, mode, every)
