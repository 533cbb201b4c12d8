"""`keras_dbmtl.tensorflow.Balancer.gradients` in a plain `tf.GradientTape` loop against the independent float64
numpy replay of DB-MTL's Algorithm 1 (tests/reference.py; with a task left out of a step, `reference.dbmtl_replay_with_labels`,
which tests/doors/test_jax_door.py uses too) and of IMTL-G's closed form; heads, loss level, unusable steps, errors.

The model: tests/reference.py's linear trunk and heads as bare `tf.Variable`s, `keras.optimizers.SGD`, the data of
tests/test_training_matches_reference.py (losses spanning 10^4). Skipped unless Keras runs on TensorFlow.
"""

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="the TensorFlow backend only")

import keras_dbmtl
from tests import reference
from tests.doors.test_torch_door import _numpy_reference
from tests.test_training_matches_reference import BATCH, D_HID, D_IN, LR, batches, make_data

if keras.backend.backend() == "tensorflow":
    import tensorflow as tf


def make_variables(num_tasks=3, seed=1):
    rng = np.random.default_rng(seed)
    W = tf.Variable(rng.normal(size=(D_IN, D_HID)).astype("float32") * 0.5, name="W")
    b = tf.Variable(np.zeros(D_HID, "float32"), name="b")
    heads = [(tf.Variable(rng.normal(size=(D_HID, 1)).astype("float32") * 0.5, name=f"v{t}"),
              tf.Variable(np.zeros(1, "float32"), name=f"c{t}")) for t in range(num_tasks)]
    return W, b, heads


def as_numpy(W, b, heads):
    return (W.numpy().astype(np.float64), b.numpy().astype(np.float64),
            [(v.numpy().astype(np.float64), c.numpy().astype(np.float64)) for v, c in heads])


def forward(W, b, heads, x, ys):
    z = x @ W + b
    return {f"task{t}": tf.reduce_mean((z @ v + c - y) ** 2) for t, ((v, c), y) in enumerate(zip(heads, ys))}


def train(balancer, X, Y, variables, lr=LR, function=False):
    W, b, heads = variables
    optimizer = keras.optimizers.SGD(lr)

    def step(x, ys):
        with tf.GradientTape(persistent=True) as tape:
            losses = forward(W, b, heads, x, ys)
        optimizer.apply_gradients(balancer.gradients(tape, losses, [W, b]))

    if function:
        step = tf.function(step)
    for idx in batches():
        step(tf.constant(X[idx]), [tf.constant(y[idx]) for y in Y])


def assert_matches(variables, W, b, heads, rtol=2e-4, atol=2e-6):
    W_, b_, heads_ = as_numpy(*variables)
    np.testing.assert_allclose(W_, W, rtol=rtol, atol=atol)
    np.testing.assert_allclose(b_, b, rtol=rtol, atol=atol)
    for (v_, c_), (v, c) in zip(heads_, heads):
        np.testing.assert_allclose(v_, v, rtol=rtol, atol=atol)
        np.testing.assert_allclose(c_, c, rtol=rtol, atol=atol)


@pytest.mark.parametrize("vectorize, function", [(False, False), (True, True)])
def test_dbmtl_matches_algorithm_1(vectorize, function):
    X, Y = make_data()
    variables = make_variables()
    start = as_numpy(*variables)
    balancer = keras_dbmtl.tensorflow.Balancer("dbmtl", beta=0.5, beta_sigma=0.5, vectorize=vectorize)
    train(balancer, X, Y, variables, function=function)
    W, b, heads, ema, _ = reference.replay(X, Y, *start, batches(), LR, "dbmtl", beta=0.5, beta_sigma=0.5)
    assert_matches(variables, W, b, heads)
    np.testing.assert_allclose(balancer.balancer.ema_gradients.numpy(), ema, rtol=2e-4, atol=1e-7)


def test_imtl_g_matches_the_closed_form():
    imtl_g_numpy = _numpy_reference("test_imtl_g", "_imtl_g_numpy")
    X, Y = make_data()
    variables = make_variables()
    W, b, heads = as_numpy(*variables)
    train(keras_dbmtl.tensorflow.Balancer("imtl_g", loss_transform="log"), X, Y, variables)
    for idx in batches():
        _, G, head_grads = reference.linear_mtl_gradients(X[idx], [y[idx] for y in Y], W, b, heads, True)
        direction = G.T @ imtl_g_numpy(G)
        W, b = W - LR * direction[: W.size].reshape(W.shape), b - LR * direction[W.size:]
        heads = [(v - LR * gv, c - LR * gc) for (v, c), (gv, gc) in zip(heads, head_grads)]
    assert_matches(variables, W, b, heads, rtol=1e-3, atol=1e-5)


def test_heads_get_the_head_weight_and_loss_level_is_the_sum():
    X, Y = make_data()
    x, ys = tf.constant(X[:BATCH]), [tf.constant(y[:BATCH]) for y in Y]
    W, b, heads = make_variables()
    balancer = keras_dbmtl.tensorflow.Balancer("mgda", loss_transform="log")
    with tf.GradientTape(persistent=True) as tape:
        losses = forward(W, b, heads, x, ys)
    pairs = balancer.gradients(tape, losses, [W, b])
    assert [v.name.split(":")[0] for _, v in pairs] == ["W", "b", "v0", "c0", "v1", "c1", "v2", "c2"]
    _, G, head_grads = reference.linear_mtl_gradients(X[:BATCH], [y[:BATCH] for y in Y], *as_numpy(W, b, heads), True)
    h = balancer.last_head_weights.numpy()
    assert not np.allclose(h, 1.0)                            # MGDA scales the heads by its min-norm weights
    grads = [g.numpy() for g, _ in pairs]
    for t in range(3):
        np.testing.assert_allclose(grads[2 + 2 * t], h[t] * head_grads[t][0], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(grads[3 + 2 * t], h[t] * head_grads[t][1], rtol=1e-4, atol=1e-7)
    direction = np.concatenate([grads[0].ravel(), grads[1]])
    np.testing.assert_allclose(direction, balancer.last_task_weights.numpy() @ G, rtol=1e-4, atol=1e-6)
    # Loss level (EW): one gradient of the sum, a non-persistent tape is enough.
    with tf.GradientTape() as tape:
        losses = forward(W, b, heads, x, ys)
        total = tf.add_n(list(losses.values()))
    expected = tape.gradient(total, [W, b])
    with tf.GradientTape() as tape:
        losses = forward(W, b, heads, x, ys)
    pairs = keras_dbmtl.tensorflow.Balancer("ew").gradients(tape, losses, [W, b])
    for (g, _), e in zip(pairs, expected):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-6)


def _poisoned(x, poison):
    """x, with `poison` added to the gradient flowing back through it (a NaN / inf / huge gradient, finite loss)."""
    @tf.custom_gradient
    def identity(value):
        return tf.identity(value), lambda dy: dy + poison
    return identity(x)


def guarded_forward(W, b, heads, x, ys, gradient_poison=0.0, loss_poison=0.0, masks=None):
    """`forward` over the labelled samples of each task (mask 1; loss 0 for a task with none), `gradient_poison`
    added to task 1's gradient of z and `loss_poison` to task 0's loss."""
    z = x @ W + b
    losses = {}
    for t, ((v, c), y) in enumerate(zip(heads, ys)):
        mask = tf.ones_like(y) if masks is None else masks[t]
        pred = (_poisoned(z, gradient_poison) if t == 1 else z) @ v + c
        loss = tf.reduce_sum(mask * (pred - y) ** 2) / tf.maximum(tf.reduce_sum(mask), 1.0)
        losses[f"task{t}"] = loss + loss_poison if t == 0 else loss
    return losses


def guarded_step(balancer, optimizer, variables):
    """The module docstring's step: the optimizer runs only where `balancer.applied`."""
    W, b, heads = variables

    def step(x, ys, gradient_poison, loss_poison, masks=None):
        with tf.GradientTape(persistent=True) as tape:
            losses = guarded_forward(W, b, heads, x, ys, gradient_poison, loss_poison, masks)
        pairs = balancer.gradients(tape, losses, [W, b])
        if balancer.applied:
            optimizer.apply_gradients(pairs)
        return [g for g, _ in pairs], balancer.applied

    return step


@pytest.mark.parametrize("function", [False, True])
def test_unusable_step_applies_nothing(function):
    """A NaN or inf in task 1's gradient, a NaN raw loss, or finite gradients whose direction overflows float32:
    zero gradients, `applied` False, the balancer's state (EMA, step counter) and the weights and optimizer as
    before, eagerly (with a RuntimeWarning) and inside `tf.function`; the next step equals the float64 replay of
    Algorithm 1 without the bad step (k, in beta / k^0.5, did not count it)."""
    X, Y = make_data()
    variables = make_variables()
    start = as_numpy(*variables)
    balancer = keras_dbmtl.tensorflow.Balancer("dbmtl", beta=0.9, beta_sigma=0.5)
    optimizer = keras.optimizers.SGD(LR)
    step = guarded_step(balancer, optimizer, variables)
    if function:
        step = tf.function(step)
    order = batches()
    batch = lambda k: (tf.constant(X[order[k]]), [tf.constant(y[order[k]]) for y in Y])  # noqa: E731
    _, applied = step(*batch(0), tf.constant(0.0), tf.constant(0.0))
    assert bool(applied)
    traces = step.experimental_get_tracing_count() if function else None
    state = [v.numpy() for v in balancer.balancer.variables]
    weights = [v.numpy() for v in [variables[0], variables[1]] + [w for head in variables[2] for w in head]]
    for gradient_poison, loss_poison in [(np.nan, 0.0), (np.inf, 0.0), (0.0, np.nan), (1e36, 0.0)]:
        poison = (tf.constant(gradient_poison, "float32"), tf.constant(loss_poison, "float32"))
        if function:
            grads, applied = step(*batch(1), *poison)
        else:
            with pytest.warns(RuntimeWarning, match="Unusable step"):
                grads, applied = step(*batch(1), *poison)
        case = (gradient_poison, loss_poison)
        assert applied.dtype == tf.bool and not bool(applied) and not bool(balancer.applied), case
        assert len(grads) == 8 and all(np.all(g.numpy() == 0) for g in grads), case
        for variable, before in zip(balancer.balancer.variables, state):
            np.testing.assert_array_equal(variable.numpy(), before)
        now = [v.numpy() for v in [variables[0], variables[1]] + [w for head in variables[2] for w in head]]
        for got, before in zip(now, weights):
            np.testing.assert_array_equal(got, before)
        assert int(optimizer.iterations.numpy()) == 1, case
        if not function:                                  # (inside tf.function they are the trace's tensors)
            assert not np.any(balancer.last_task_weights.numpy()), case
    _, applied = step(*batch(2), tf.constant(0.0), tf.constant(0.0))
    assert bool(applied)
    if function:                                          # one program for the usable and the unusable steps
        assert step.experimental_get_tracing_count() == traces
    W, b, heads, ema, _ = reference.replay(X, Y, *start, [order[0], order[2]], LR, "dbmtl", beta=0.9,
                                           beta_sigma=0.5)
    assert_matches(variables, W, b, heads)
    np.testing.assert_allclose(balancer.balancer.ema_gradients.numpy(), ema, rtol=2e-4, atol=1e-7)
    assert int(balancer.balancer.iterations.numpy()) == 2


def test_task_without_labels_takes_no_part():
    """DB-MTL over 3 steps, task 1 without labels at step 2 (its loss and gradients exactly 0): the step is applied,
    task 1's EMA stays and its weight is 0, and the weights and EMA equal the float64 replay. No task labelled:
    not applied."""
    X, Y = make_data()
    variables = make_variables()
    start = as_numpy(*variables)
    balancer = keras_dbmtl.tensorflow.Balancer("dbmtl", beta=0.9, beta_sigma=0.5)
    step = guarded_step(balancer, keras.optimizers.SGD(LR), variables)
    order = batches()[:3]
    labelled = [[True, True, True], [True, False, True], [True, True, True]]
    emas = []
    for idx, flags in zip(order, labelled):
        masks = [tf.fill((BATCH, 1), float(flag)) for flag in flags]
        _, applied = step(tf.constant(X[idx]), [tf.constant(y[idx]) for y in Y], 0.0, 0.0, masks)
        assert bool(applied)
        emas.append(balancer.balancer.ema_gradients.numpy())
        if flags[1] is False:
            assert balancer.last_task_weights.numpy()[1] == 0.0
    W, b, heads, ema, _ = reference.dbmtl_replay_with_labels(X, Y, *start, order, labelled, LR, 0.9, 0.5)
    assert_matches(variables, W, b, heads)
    np.testing.assert_allclose(emas[-1], ema, rtol=2e-4, atol=1e-7)
    np.testing.assert_array_equal(emas[1][1], emas[0][1])
    with pytest.warns(RuntimeWarning, match="Unusable step"):
        _, applied = step(tf.constant(X[order[0]]), [tf.constant(y[order[0]]) for y in Y], 0.0, 0.0,
                          [tf.zeros((BATCH, 1))] * 3)
    assert not bool(applied) and int(balancer.balancer.iterations.numpy()) == 3


def test_bad_input_names_the_fix(monkeypatch):
    X, Y = make_data()
    x, ys = tf.constant(X[:BATCH]), [tf.constant(y[:BATCH]) for y in Y]
    W, b, heads = make_variables()
    balancer = keras_dbmtl.tensorflow.Balancer("dbmtl")
    with tf.GradientTape() as tape:
        losses = forward(W, b, heads, x, ys)
    with pytest.raises(ValueError, match="persistent=True"):
        balancer.gradients(tape, losses, [W, b])
    with tf.GradientTape(persistent=True) as tape:
        losses = forward(W, b, heads, x, ys)
        vector = {"a": tf.reduce_mean((x @ W) ** 2, axis=0)}
    with pytest.raises(ValueError, match="not a scalar"):
        balancer.gradients(tape, vector, [W, b])
    with pytest.raises(ValueError, match="No shared variables"):
        balancer.gradients(tape, losses, [])
    with pytest.raises(ValueError, match="not reached by any loss"):
        keras_dbmtl.tensorflow.Balancer("dbmtl").gradients(tape, losses, [W, b, tf.Variable(1.0)])
    balancer.gradients(tape, losses, [W, b])
    with pytest.raises(ValueError, match="task names changed"):
        balancer.gradients(tape, {"x" + k: v for k, v in losses.items()}, [W, b])
    monkeypatch.setattr(keras.backend, "backend", lambda: "torch")
    with pytest.raises(RuntimeError, match="KERAS_BACKEND=tensorflow"):
        keras_dbmtl.tensorflow.Balancer("dbmtl")
