"""Door 2 (`keras_dbmtl.jax`: a balancer as a pure JAX transformation) against independent float64 numpy replays.

The model is tests/reference.py's: a linear trunk z = X W + b (shared) and linear heads pred_t = z v_t + c_t, MSE,
plain SGD, written in JAX; the data of tests/test_training_matches_reference.py (losses spanning 10^4). The
references are numpy only: `reference.replay` (DB-MTL's Algorithm 1), Algorithm 1 with a task left out of a step
(`dbmtl_replay_with_labels` of tests/reference.py), MGDA's min-norm point by enumerating the
supports (`_min_norm_exact`) and PCGrad's Algorithm 1 of tests/balancers/test_pcgrad.py. Then an MLP trained by the
door equals the same MLP trained by `MultiTaskModel.fit` (one core), with optax; unusable steps are not applied;
and the bad inputs. Skipped unless Keras runs on JAX.
"""

import importlib.util
import os
import sys

import keras
import numpy as np
import pytest

if keras.backend.backend() != "jax":
    pytest.skip("door 2: the JAX backend only", allow_module_level=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import keras_dbmtl  # noqa: E402
from tests import reference  # noqa: E402
from tests.test_training_matches_reference import BATCH, D_HID, D_IN, LR, N, SCALES, batches, make_data  # noqa: E402

BALANCER_TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "balancers")
TASKS = [f"task{t}" for t in range(len(SCALES))]


def _reference_module(module):
    """A numpy reference from tests/balancers (those modules import their helpers by file name)."""
    if BALANCER_TESTS not in sys.path:
        sys.path.insert(0, BALANCER_TESTS)
    path = os.path.join(BALANCER_TESTS, module + ".py")
    spec = importlib.util.spec_from_file_location(f"_jax_door_ref_{module}", path)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def _min_norm_exact(jacobian):
    """The simplex weights of the min-norm point of the rows' convex hull, float64: the KKT system of every support
    S (w_S = a G_SS^-1 1, zero elsewhere), the feasible one of least norm (exact for a few tasks; SLSQP returned
    its starting point on these gradient scales, 1 to 10^3)."""
    import itertools

    gram = jacobian @ jacobian.T
    best, best_value = None, np.inf
    for size in range(1, len(gram) + 1):
        for support in itertools.combinations(range(len(gram)), size):
            idx = list(support)
            solved = np.linalg.lstsq(gram[np.ix_(idx, idx)], np.ones(size), rcond=None)[0]
            if abs(solved.sum()) < 1e-300:
                continue
            w = np.zeros(len(gram))
            w[idx] = solved / solved.sum()
            value = w @ gram @ w
            if w.min() >= -1e-12 and value < best_value:
                best, best_value = w, value
    return best


# ---------------------------------------------------------------------- the linear model of tests/reference.py
def linear_init(head_scales=(1.0, 1.0, 1.0), seed=1):
    rng = np.random.default_rng(seed)
    W = (rng.normal(size=(D_IN, D_HID)) * 0.5).astype("float32")
    b = (0.1 * rng.normal(size=(D_HID,))).astype("float32")
    heads = [((s * rng.normal(size=(D_HID, 1))).astype("float32"), (0.1 * rng.normal(size=(1,))).astype("float32"))
             for s in head_scales]
    return W, b, heads


def linear_losses(shared, heads, x, ys):
    z = x @ shared["W"] + shared["b"]
    return jnp.stack([jnp.mean(jnp.square(z @ h["v"] + h["c"] - y)) for h, y in zip(heads, ys)])


def sgd(params, grads, lr):
    return jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)


def make_step(tx, loss_fn, lr):
    """One door step with plain SGD: the common case of the module docstring."""
    def step(shared, heads, state, x, ys, *extra):
        raw, jacobian, own = tx.task_jacobian(loss_fn, state, shared, heads, x, ys, *extra)
        update = tx.update_with_info(jacobian, state, raw)
        heads = sgd(heads, keras_dbmtl.jax.scale_task_gradients(own, update.head_weights), lr)
        return sgd(shared, update.direction, lr), heads, update
    return step


def as_pytrees(W, b, heads):
    return ({"W": jnp.asarray(W), "b": jnp.asarray(b)},
            [{"v": jnp.asarray(v), "c": jnp.asarray(c)} for v, c in heads])


def assert_matches_replay(shared, heads, W, b, ref_heads, rtol=2e-4, atol=2e-6):
    np.testing.assert_allclose(np.asarray(shared["W"]), W, rtol=rtol, atol=atol)
    np.testing.assert_allclose(np.asarray(shared["b"]), b, rtol=rtol, atol=atol)
    for head, (v, c) in zip(heads, ref_heads):
        np.testing.assert_allclose(np.asarray(head["v"]), v, rtol=rtol, atol=atol)
        np.testing.assert_allclose(np.asarray(head["c"]), c, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def data():
    X, Y = make_data()
    return X, Y


@pytest.mark.parametrize("log_transform, head_scales, lr", [(True, (1.0, 1.0, 1.0), LR),
                                                             (False, (1.0, 10.0, 100.0), 2e-7)])
def test_dbmtl_matches_algorithm_1_in_jit_and_scan(data, log_transform, head_scales, lr):
    """Six steps of Algorithm 1, in a jitted step and in one `lax.scan`: weights, EMA buffers, step counter and
    task weights equal the float64 numpy replay. Losses span 5e3 (both cases); the task gradients' norms span
    1e2 under the log transform and 5.6e3 without it (gradient balancing only, heads scaled 1, 10, 100)."""
    X, Y = data
    W0, b0, heads0 = linear_init(head_scales)
    order = batches()
    losses, G, _ = reference.linear_mtl_gradients(X[order[0]], [y[order[0]] for y in Y], W0.astype("float64"),
                                                  b0.astype("float64"), heads0, log_transform)
    raw_losses, _, _ = reference.linear_mtl_gradients(X[order[0]], [y[order[0]] for y in Y], W0.astype("float64"),
                                                      b0.astype("float64"), heads0, False)
    norms = np.linalg.norm(G, axis=1)
    assert raw_losses.max() / raw_losses.min() > 1e3
    assert norms.max() / norms.min() > (1e2 if log_transform else 5e3), norms
    W, b, ref_heads, ema, step_weights = reference.replay(
        X, Y, W0, b0, heads0, order, lr, "dbmtl", log_transform=log_transform)
    assert np.abs(W - W0).max() > 1e-2 * np.abs(W0).max()               # the steps move the weights

    tx = keras_dbmtl.jax.balancer("dbmtl", loss_transform="log" if log_transform else None)
    shared, heads = as_pytrees(W0, b0, heads0)
    state = tx.init(shared, task_names=TASKS)
    step = make_step(tx, linear_losses, lr)

    jitted = jax.jit(step)
    s, h, st = shared, heads, state
    weights = []
    for idx in order:
        s, h, update = jitted(s, h, st, X[idx], [y[idx] for y in Y])
        st = update.state
        weights.append(np.asarray(update.task_weights))
    assert_matches_replay(s, h, W, b, ref_heads)
    np.testing.assert_allclose(np.asarray(st.variables["ema_gradients"]), ema, rtol=2e-4, atol=1e-7)
    assert int(st.variables["iterations"]) == len(order)
    np.testing.assert_allclose(np.array(weights), step_weights, rtol=1e-3)

    xs = jnp.asarray(np.stack([X[idx] for idx in order]))
    ys = [jnp.asarray(np.stack([y[idx] for idx in order])) for y in Y]

    def body(carry, batch):
        s, h, st = carry
        s, h, update = step(s, h, st, batch[0], batch[1])
        return (s, h, update.state), update.task_weights

    (s, h, st), scanned = jax.jit(lambda c, b: jax.lax.scan(body, c, b))((shared, heads, state), (xs, ys))
    assert_matches_replay(s, h, W, b, ref_heads)
    np.testing.assert_allclose(np.asarray(st.variables["ema_gradients"]), ema, rtol=2e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(scanned), step_weights, rtol=1e-3)
    # The door never writes the Keras balancer's variables: its state lives in `state` only.
    assert int(np.asarray(tx.balancer.iterations.value)) == 0


def test_mgda_matches_the_min_norm_point():
    """Gramian level: MGDA's weights give the float64 min-norm point (`_min_norm_exact`), on a Jacobian split over
    two leaves, and the heads get the same weights."""
    rng = np.random.default_rng(1)
    jacobian = rng.normal(size=(4, 7))
    jacobian[1] = -0.7 * jacobian[0] + 0.3 * rng.normal(size=7)
    jacobian *= np.array([1.0, 10.0, 100.0, 1000.0])[:, None]          # gradient norms spanning 10^3
    tx = keras_dbmtl.jax.balancer("mgda", normalization="none")
    state = tx.init({"a": jnp.zeros((3,)), "b": jnp.zeros((2, 2))}, num_tasks=4)
    blocks = {"a": jnp.asarray(jacobian[:, :3], "float32"),
              "b": jnp.asarray(jacobian[:, 3:].reshape(4, 2, 2), "float32")}
    update = jax.jit(tx.update_with_info)(blocks, state, jnp.ones(4))
    direction = np.concatenate([np.asarray(update.direction["a"]), np.asarray(update.direction["b"]).ravel()])
    expected = _min_norm_exact(jacobian) @ jacobian
    np.testing.assert_allclose(direction, expected, atol=1e-4 * np.abs(jacobian).max())
    np.testing.assert_allclose(np.asarray(update.task_weights) @ jacobian, expected, atol=1e-4 * np.abs(jacobian).max())
    np.testing.assert_allclose(np.asarray(update.head_weights), np.asarray(update.task_weights))
    assert bool(update.applied) and bool(update.usable)           # usable: the name in 0.1.0


def test_pcgrad_follows_algorithm_1_and_threads_its_random_state():
    """Gradient level with random draws: every step's direction is PCGrad's Algorithm 1 (float64 numpy, test_pcgrad)
    for one of the task orders; the seed state moves on inside `jit`, and the directions are those of the Keras
    balancer run statefully with the same seed."""
    import itertools

    ref = _reference_module("test_pcgrad")
    rng = np.random.default_rng(2)
    jacobian = rng.normal(size=(3, 4))
    jacobian[1] = -0.7 * jacobian[0] + 0.3 * rng.normal(size=4)
    jacobian[2] = -0.6 * jacobian[1] + 0.3 * rng.normal(size=4)
    per_task = [[[j for j in p if j != i] for p in itertools.permutations(range(3))] for i in range(3)]
    candidates = []
    for orders in itertools.product(*[[o for k, o in enumerate(opts) if o not in opts[:k]] for opts in per_task]):
        candidates.append(ref._pcgrad_numpy(jacobian, [o + [i] for i, o in enumerate(orders)]).sum(0))

    tx = keras_dbmtl.jax.balancer(keras_dbmtl.balancers.PCGrad(seed=5))
    state = tx.init(jnp.zeros((4,)), num_tasks=3)
    update = jax.jit(tx.update)
    eager = keras_dbmtl.balancers.PCGrad(seed=5)
    eager.build(3, 4)
    seeds, directions = [np.asarray(state.variables["seed_generator_state"])], []
    for _ in range(6):
        direction, state = update(jnp.asarray(jacobian, "float32"), state, jnp.ones(3))
        directions.append(np.asarray(direction))
        seeds.append(np.asarray(state.variables["seed_generator_state"]))
        assert min(np.abs(directions[-1] - c).max() for c in candidates) < 1e-4
        losses = eager.task_losses(jnp.ones(3))
        result = keras_dbmtl.balancing.balance(eager, losses, [jnp.asarray(jacobian, "float32")])
        np.testing.assert_allclose(directions[-1], np.asarray(result.shared[0]), rtol=1e-5, atol=1e-6)
    assert len({tuple(s) for s in seeds}) == len(seeds)                 # a new draw every step
    assert len({tuple(np.round(d, 4)) for d in directions}) > 1          # ... and more than one task order


def test_loss_level_direction_is_the_gradient_of_the_combined_loss(data):
    """Loss level: `update` forms sum_t w_t J_t with w = dL/dl~ through the balancer's combine; for GLS (a
    nonlinear combination) that is the gradient of (prod_t l_t)^(1/T) itself, written here in JAX."""
    X, Y = data
    shared, heads = as_pytrees(*linear_init())
    x, ys = X[:BATCH], [y[:BATCH] for y in Y]
    tx = keras_dbmtl.jax.balancer("gls")
    state = tx.init(shared, num_tasks=3)
    @jax.jit
    def door(shared, heads, state):
        raw, jacobian, own = tx.task_jacobian(linear_losses, state, shared, heads, x, ys)
        return tx.update_with_info(jacobian, state, raw), own

    update, own = door(shared, heads, state)
    geometric = lambda s, h: jnp.exp(jnp.mean(jnp.log(linear_losses(s, h, x, ys))))  # noqa: E731
    expected_shared, expected_heads = jax.grad(geometric, argnums=(0, 1))(shared, heads)
    for key in ("W", "b"):
        np.testing.assert_allclose(update.direction[key], expected_shared[key], rtol=2e-5, atol=1e-7)
    scaled = keras_dbmtl.jax.scale_task_gradients(own, update.head_weights)
    for got, expected in zip(scaled, expected_heads):
        for key in ("v", "c"):
            np.testing.assert_allclose(got[key], expected[key], rtol=2e-5, atol=1e-7)


# ---------------------------------------------------------------------- one core: the door equals `fit`
HIDDEN = 8


def _mlp_model(seed=3):
    keras.utils.set_random_seed(seed)
    encoder = keras.layers.Dense(HIDDEN, activation="relu", name="trunk")
    heads = {t: keras.layers.Dense(1, name=f"head_{t}") for t in TASKS}
    model = keras_dbmtl.MultiTaskModel(encoder=encoder, heads=heads)
    model.build((None, D_IN))
    return model


def _mlp_losses(shared, heads, x, ys):
    kernel, bias = shared
    z = jax.nn.relu(x @ kernel + bias)
    return jnp.stack([jnp.mean(jnp.square(z @ h["kernel"] + h["bias"] - y)) for h, y in zip(heads, ys)])


@pytest.mark.parametrize("name", ["dbmtl", "mgda", "uw", "gradnorm", "imtl", "famo"])
def test_mlp_trained_by_the_door_equals_fit(data, name):
    """The same MLP, init, batches and SGD: `MultiTaskModel.fit` and the door (plain JAX forward, optax.sgd)
    reach the same parameters, balancer state included: DB-MTL (Jacobian level), MGDA (head weights), UW (loss
    level, learned log-variances optimised through `balancer_params`), GradNorm (head weights and learned logits),
    IMTL (a loss transform with learned scales), FAMO (`after_step` with the losses after the update)."""
    optax = pytest.importorskip("optax")
    X, Y = data
    model = _mlp_model()
    copy = lambda variable: jnp.asarray(np.array(variable.value))  # noqa: E731  (fit donates the buffers)
    # A tuple, in the model's order of the shared variables (DB-MTL's EMA buffers are flat in that order).
    shared = (copy(model.encoder.kernel), copy(model.encoder.bias))
    heads = [{"kernel": copy(model.heads[t].kernel), "bias": copy(model.heads[t].bias)} for t in TASKS]
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse", balancer=name)
    model.fit(X, dict(zip(TASKS, Y)), batch_size=BATCH, epochs=1, shuffle=False, verbose=0)

    tx = keras_dbmtl.jax.balancer(name)
    state = tx.init(shared, task_names=TASKS)
    params = {"shared": shared, "heads": heads, "balancer": tx.balancer_params(state)}
    optimizer = optax.sgd(LR)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, state, x, ys):
        state = tx.replace_balancer_params(state, params["balancer"])
        raw, jacobian, own = tx.task_jacobian(_mlp_losses, state, params["shared"], params["heads"], x, ys)
        update = tx.update_with_info(jacobian, state, raw)
        grads = {"shared": update.direction, "heads": keras_dbmtl.jax.scale_task_gradients(own, update.head_weights),
                 "balancer": update.balancer_gradients}
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        state = update.state
        if tx.needs_after_step:                                      # FAMO: the same batch, after the update
            state = tx.after_step(state, raw, _mlp_losses(params["shared"], params["heads"], x, ys))
        return params, opt_state, state

    for start in range(0, N, BATCH):
        params, opt_state, state = step(params, opt_state, state, X[start:start + BATCH],
                                        [y[start:start + BATCH] for y in Y])
    tolerance = dict(rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(params["shared"][0], model.encoder.kernel.value, **tolerance)
    np.testing.assert_allclose(params["shared"][1], model.encoder.bias.value, **tolerance)
    for t, task in enumerate(TASKS):
        np.testing.assert_allclose(params["heads"][t]["kernel"], model.heads[task].kernel.value, **tolerance)
        np.testing.assert_allclose(params["heads"][t]["bias"], model.heads[task].bias.value, **tolerance)
    state = tx.replace_balancer_params(state, params["balancer"])
    by_name = {v.name: v for v in model.balancer.variables}
    for key, value in state.variables.items():
        np.testing.assert_allclose(value, by_name[key].value, **tolerance)


# ---------------------------------------------------------------------- every balancer, fixed state
def test_every_registered_balancer_runs_pure_with_a_fixed_state():
    """Every registered name traces as two updates in one `lax.scan` (so the state keeps its structure, shapes and
    dtypes) with a direction of the parameters' structure (`jax.eval_shape`: traced, not compiled); a few, one
    of each kind, also run jitted to finite directions."""
    rng = np.random.default_rng(0)
    jacobian = {"w": jnp.asarray(rng.normal(size=(3, 2, 2)), "float32"), "b": jnp.asarray(rng.normal(size=(3, 2)),
                                                                                              "float32")}
    losses = jnp.asarray([0.5, 2.0, 8.0], "float32")
    for name in keras_dbmtl.balancers.names():
        tx = keras_dbmtl.jax.balancer(name)
        state = tx.init({"w": jnp.zeros((2, 2)), "b": jnp.zeros((2,))}, task_names=["a", "b", "c"])

        def body(state, _):
            update = tx.update_with_info(jacobian, state, losses)
            return update.state, (update.direction, update.head_weights)

        def two_steps(state):
            return jax.lax.scan(body, state, None, length=2)

        final, (directions, head_weights) = jax.eval_shape(two_steps, state)
        assert jax.tree_util.tree_structure(final) == jax.tree_util.tree_structure(state), name
        assert [(v.shape, v.dtype) for v in jax.tree_util.tree_leaves(final)] == [
            (v.shape, v.dtype) for v in jax.tree_util.tree_leaves(state)], name
        assert directions["w"].shape == (2, 2, 2) and head_weights.shape == (2, 3), name
        if name in ("ew", "rlw", "nash_mtl", "upgrad", "gradnorm"):
            _, (directions, _) = jax.jit(two_steps)(state)
            assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree_util.tree_leaves(directions)), name


def test_learned_parameters_transform_and_epoch_hooks():
    """IMTL's transform reads its learned scales (state required); DWA's epoch hook runs eagerly; FAMO's after_step
    moves its logits."""
    tx = keras_dbmtl.jax.balancer("imtl")
    state = tx.init(jnp.zeros((2,)), num_tasks=2)
    params = {"scales": jnp.asarray([0.5, -1.0])}
    state = tx.replace_balancer_params(state, params)
    np.testing.assert_allclose(tx.transform_losses(jnp.asarray([2.0, 3.0]), state),
                               np.exp([0.5, -1.0]) * [2.0, 3.0] - [0.5, -1.0], rtol=1e-6)
    update = jax.jit(tx.update_with_info)(jnp.asarray([[1.0, 0.0], [0.0, 1.0]]), state, jnp.asarray([2.0, 3.0]))
    np.testing.assert_allclose(update.balancer_gradients["scales"], np.exp([0.5, -1.0]) * [2.0, 3.0] - 1.0, rtol=1e-6)

    tx = keras_dbmtl.jax.balancer("dwa")
    assert tx.needs_epoch_end and not tx.needs_after_step
    state = tx.init(jnp.zeros((2,)), task_names=["a", "b"])
    step = jax.jit(tx.update)
    for epoch, losses in enumerate([[1.0, 1.0], [1.0, 4.0], [1.0, 1.0]]):
        _, state = step(jnp.ones((2, 2)), state, {"a": losses[0], "b": losses[1]})
        state = tx.on_epoch_end(state, epoch)
    rate = np.array([1.0, 1.0]) / np.array([1.0, 4.0])
    np.testing.assert_allclose(state.variables["current_weights"], 2 * np.exp(rate / 2) / np.exp(rate / 2).sum(),
                               rtol=1e-5)

    tx = keras_dbmtl.jax.balancer("famo")
    assert tx.needs_after_step
    state = tx.init(jnp.zeros((2,)), num_tasks=2)
    moved = jax.jit(tx.after_step)(state, jnp.asarray([1.0, 1.0]), jnp.asarray([0.5, 1.0]))
    assert not np.allclose(moved.variables["logits"], state.variables["logits"])


# ---------------------------------------------------------------------- unusable steps, tasks without labels
def _kept_where(applied, new, old):
    """The module docstring's select: `new` where the update was applied, `old` elsewhere."""
    return jax.tree_util.tree_map(lambda n, o: jnp.where(applied, n, o), new, old)


def test_unusable_step_is_not_applied_under_jit(data):
    """A NaN or inf in one task's gradient, a NaN or inf raw loss, or finite inputs whose direction overflows
    float32: under `jax.jit`, a zero direction (every leaf), the state given (every leaf identical), zero weights
    and `applied` False; `update` alone (jitted) too. The next finite step equals the float64 replay of Algorithm 1
    without the bad step (k, in beta / k^0.5, did not count it)."""
    X, Y = data
    W0, b0, heads0 = linear_init()
    order = batches()
    tx = keras_dbmtl.jax.balancer("dbmtl", beta=0.9, beta_sigma=0.5)
    shared, heads = as_pytrees(W0, b0, heads0)
    state = tx.init(shared, task_names=TASKS)

    @jax.jit
    def step(shared, heads, state, x, ys, gradient_poison, loss_poison):
        raw, jacobian, own = tx.task_jacobian(linear_losses, state, shared, heads, x, ys)
        jacobian = {**jacobian, "W": jacobian["W"].at[1, 0, 0].add(gradient_poison)}   # task 1's gradient
        raw = raw.at[0].add(loss_poison)                                                  # task 0's loss
        update = tx.update_with_info(jacobian, state, raw)
        new_heads = sgd(heads, keras_dbmtl.jax.scale_task_gradients(own, update.head_weights), LR)
        return (_kept_where(update.applied, sgd(shared, update.direction, LR), shared),
                _kept_where(update.applied, new_heads, heads), update, (jacobian, raw))

    batch = lambda k: (X[order[k]], [y[order[k]] for y in Y])  # noqa: E731
    update_only = jax.jit(tx.update)
    shared, heads, update, _ = step(shared, heads, state, *batch(0), 0.0, 0.0)
    assert bool(update.applied)
    state = update.state
    before = jax.tree_util.tree_map(np.asarray, (shared, heads, state))
    for gradient_poison, loss_poison in [(np.nan, 0.0), (np.inf, 0.0), (0.0, np.nan), (0.0, -np.inf), (1e38, 0.0)]:
        s, h, update, (jacobian, raw) = step(shared, heads, state, *batch(1), gradient_poison, loss_poison)
        case = (gradient_poison, loss_poison)
        assert update.applied.dtype == jnp.bool_ and update.applied.shape == () and not bool(update.applied), case
        assert all(np.all(np.asarray(leaf) == 0) for leaf in jax.tree_util.tree_leaves(update.direction)), case
        assert not np.any(np.asarray(update.task_weights)) and not np.any(np.asarray(update.head_weights)), case
        for got, expected in zip(jax.tree_util.tree_leaves((s, h, update.state)), jax.tree_util.tree_leaves(before)):
            np.testing.assert_array_equal(np.asarray(got), expected)
        direction, next_state = update_only(jacobian, state, raw)
        assert all(np.all(np.asarray(leaf) == 0) for leaf in jax.tree_util.tree_leaves(direction)), case
        for got, expected in zip(jax.tree_util.tree_leaves(next_state), jax.tree_util.tree_leaves(state)):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    shared, heads, update, _ = step(shared, heads, state, *batch(2), 0.0, 0.0)
    assert bool(update.applied)
    W, b, ref_heads, ema, weights = reference.replay(X, Y, W0, b0, heads0, [order[0], order[2]], LR, "dbmtl",
                                                     beta=0.9, beta_sigma=0.5)
    assert_matches_replay(shared, heads, W, b, ref_heads)
    np.testing.assert_allclose(np.asarray(update.state.variables["ema_gradients"]), ema, rtol=2e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(update.task_weights), weights[-1], rtol=1e-3)
    assert int(update.state.variables["iterations"]) == 2


def _masked_losses(shared, heads, x, ys, masks):
    """`linear_losses` over the labelled samples of each task (mask 1), 0 for a task with none in the batch."""
    z = x @ shared["W"] + shared["b"]
    return jnp.stack([jnp.sum(m * jnp.square(z @ h["v"] + h["c"] - y)) / jnp.maximum(jnp.sum(m), 1.0)
                      for h, y, m in zip(heads, ys, masks)])


def test_task_without_labels_takes_no_part(data):
    """DB-MTL over 3 steps, task 1 without labels at step 2 (loss and Jacobian rows exactly 0): the step is applied
    (log(0 + eps) is no reason to skip), that task's EMA stays, its weight is 0, and weights, EMA and task weights
    equal the float64 replay. A batch where no task has labels is not applied (nothing to learn)."""
    X, Y = data
    W0, b0, heads0 = linear_init()
    order = batches()[:3]
    labelled = [[True, True, True], [True, False, True], [True, True, True]]
    tx = keras_dbmtl.jax.balancer("dbmtl", beta=0.9, beta_sigma=0.5)
    shared, heads = as_pytrees(W0, b0, heads0)
    state = tx.init(shared, task_names=TASKS)
    step = jax.jit(make_step(tx, _masked_losses, LR))
    masks_of = lambda flags: [jnp.full((BATCH, 1), float(f)) for f in flags]  # noqa: E731
    emas, weights = [], []
    for idx, flags in zip(order, labelled):
        shared, heads, update = step(shared, heads, state, X[idx], [y[idx] for y in Y], masks_of(flags))
        assert bool(update.applied)
        state = update.state
        emas.append(np.asarray(state.variables["ema_gradients"]))
        weights.append(np.asarray(update.task_weights))
    W, b, ref_heads, ema, ref_weights = reference.dbmtl_replay_with_labels(X, Y, W0, b0, heads0, order, labelled, LR, 0.9, 0.5)
    assert_matches_replay(shared, heads, W, b, ref_heads)
    np.testing.assert_allclose(emas[-1], ema, rtol=2e-4, atol=1e-7)
    np.testing.assert_array_equal(emas[1][1], emas[0][1])             # task 1's EMA kept at step 2
    assert weights[1][1] == 0.0
    np.testing.assert_allclose(np.array(weights), ref_weights, rtol=1e-3)
    _, _, update = step(shared, heads, state, X[order[0]], [y[order[0]] for y in Y], masks_of([False] * 3))
    assert not bool(update.applied)
    np.testing.assert_array_equal(np.asarray(update.state.variables["iterations"]), 3)


# ---------------------------------------------------------------------- bad input
def test_bad_input_errors(monkeypatch):
    tx = keras_dbmtl.jax.balancer("dbmtl")
    with pytest.raises(ValueError, match="init"):
        tx.update(jnp.zeros((2, 3)), None, jnp.ones(2))
    with pytest.raises(ValueError, match="number of tasks"):
        tx.init({"w": jnp.zeros((3,))})
    with pytest.raises(ValueError, match="shared_params has no arrays"):         # no shared parameters
        tx.init({}, num_tasks=2)
    state = tx.init({"w": jnp.zeros((3,)), "b": jnp.zeros(())}, task_names=["a", "b"])
    good = {"w": jnp.ones((2, 3)), "b": jnp.ones((2,))}
    with pytest.raises(ValueError, match="structure"):
        tx.update({"w": jnp.ones((2, 3))}, state, jnp.ones(2))
    with pytest.raises(ValueError, match=r"task_gradients\['w'\] has shape \(3, 3\), expected \(2, 3\)"):
        tx.update({"w": jnp.ones((3, 3)), "b": jnp.ones((2,))}, state, jnp.ones(2))
    with pytest.raises(ValueError, match=r"losses has shape \(3,\)"):
        tx.update(good, state, jnp.ones(3))
    with pytest.raises(ValueError, match="losses has tasks"):
        tx.update(good, state, {"a": 1.0, "c": 1.0})
    with pytest.raises(ValueError, match="must be a scalar"):
        tx.update(good, state, {"a": jnp.ones(4), "b": 1.0})
    with pytest.raises(ValueError, match=r"losses has shape \(2, 4\): pass the 2 raw task losses, each a scalar"):
        tx.update(good, state, [jnp.ones(4), jnp.ones(4)])
    with pytest.raises(ValueError, match=r"losses has shape \(2, 1\)"):
        jax.jit(tx.update)(good, state, jnp.ones((2, 1)))
    with pytest.raises(TypeError, match="BalancerState"):
        tx.update(good, {"ema_gradients": 0}, jnp.ones(2))
    other = keras_dbmtl.jax.balancer("uw").init({"w": jnp.zeros((3,))}, num_tasks=2)
    with pytest.raises(ValueError, match="pass the state this transformation's init returned"):
        tx.update(good, other, jnp.ones(2))
    resized = keras_dbmtl.jax.balancer("dbmtl").init({"w": jnp.zeros((5,))}, num_tasks=2)   # same names, P = 5
    with pytest.raises(ValueError, match=r"state.variables\['ema_gradients'\] has shape \(2, 5\), expected \(2, 4\)"):
        tx.update(good, resized, jnp.ones(2))
    with pytest.raises(ValueError, match="task_params has keys"):
        tx.task_jacobian(lambda s, h: jnp.ones(2), state, {"w": jnp.zeros((3,)), "b": jnp.zeros(())},
                         {"a": {}, "c": {}})
    with pytest.raises(ValueError, match="initialised for 2 tasks"):
        tx.init({"w": jnp.zeros((4,))}, num_tasks=2)
    with pytest.raises(TypeError, match="float arrays"):
        keras_dbmtl.jax.balancer("ew").init({"w": jnp.zeros((3,), "int32")}, num_tasks=2)
    built = keras_dbmtl.balancers.DBMTL()
    built.build(3, 4)
    with pytest.raises(ValueError, match="built for 3 tasks"):
        keras_dbmtl.jax.balancer(built).init(jnp.zeros((4,)), num_tasks=2)
    with pytest.raises(TypeError, match="pass the state"):
        imtl = keras_dbmtl.jax.balancer("imtl")
        imtl.init(jnp.zeros((3,)), num_tasks=2)
        imtl.transform_losses(jnp.ones(2))
    with pytest.raises(TypeError, match="Hyperparameters"):
        keras_dbmtl.jax.balancer(keras_dbmtl.balancers.DBMTL(), beta=0.5)
    with pytest.raises(ValueError, match="unknown|Unknown"):
        keras_dbmtl.jax.balancer("no_such_balancer")
    monkeypatch.setattr(keras.backend, "backend", lambda: "torch")
    with pytest.raises(RuntimeError, match="KERAS_BACKEND=jax"):
        keras_dbmtl.jax.balancer("dbmtl")
    with pytest.raises(RuntimeError, match="KERAS_BACKEND=jax"):
        keras_dbmtl.jax.BalancerTransformation(keras_dbmtl.balancers.DBMTL())
