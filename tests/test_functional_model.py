"""A functional multi-output model as a MultiTaskModel (`MultiTaskModel(inputs=..., outputs=...)`, `from_model`).

The shared/task split read from the graph (`keras_dbmtl.functional`) is checked against perturbation, which does
not read the graph: a variable is moved and the task outputs that change are the tasks that use it. Training
through the functional form is compared with the equivalent `encoder`/`heads` model (same weights, same data,
same balancer): the parameters must be the same within float32 round-off.
"""

import keras
import numpy as np
import pytest
from keras import layers, ops

import keras_dbmtl
from keras_dbmtl import functional

BACKEND = keras.backend.backend()
D_IN, N, BATCH = 6, 64, 16


def data(seed=0, tasks=("a", "b", "c")):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, D_IN)).astype("float32")
    W = rng.normal(size=(D_IN, 1))
    Y = {t: (s * (X @ W + 0.3 * rng.normal(size=(N, 1)))).astype("float32")
         for t, s in zip(tasks, (1.0, 30.0, 0.1))}
    return X, Y


def branching_layers():
    return {"trunk": layers.Dense(8, activation="tanh", name="trunk"),
            "tower": layers.Dense(8, activation="tanh", name="tower"),
            "a_head": layers.Dense(1, name="a_head"),
            "b_gate": layers.Dense(4, activation="tanh", name="b_gate"),
            "b_head": layers.Dense(1, name="b_head"),
            "concat": layers.Concatenate(name="skip"),
            "c_head": layers.Dense(1, name="c_head")}


def branching(L):
    """Branches twice (after the trunk; after the tower), a tower shared by a and b but not c, a task gate (b),
    and a skip connection from the input to c."""
    x = keras.Input((D_IN,), name="x")
    h = L["trunk"](x)
    t = L["tower"](h)
    outputs = {"a": L["a_head"](t), "b": L["b_head"](L["b_gate"](t)), "c": L["c_head"](L["concat"]([h, x]))}
    return x, outputs


class Head(keras.layers.Layer):
    """A head of the equivalent encoder/heads model: picks the encoder's output `index`, then its layers."""

    def __init__(self, index, stack, **kwargs):
        super().__init__(**kwargs)
        self.index, self.stack = index, list(stack)

    def call(self, features):
        y = features[self.index]
        for layer in self.stack:
            y = layer(y)
        return y


def branching_equivalent(L):
    """The same network as encoder/heads: the encoder (trunk, tower, skip) outputs [tower, concat(trunk, x)]."""
    x = keras.Input((D_IN,))
    h = L["trunk"](x)
    encoder = keras.Model(x, [L["tower"](h), L["concat"]([h, x])])
    heads = {"a": Head(0, [L["a_head"]]), "b": Head(0, [L["b_gate"], L["b_head"]]), "c": Head(1, [L["c_head"]])}
    model = keras_dbmtl.MultiTaskModel(encoder=encoder, heads=heads)
    model.build((None, D_IN))
    return model


def pair(make_layers, make_functional, make_equivalent):
    """A functional MultiTaskModel and its encoder/heads equivalent with the same weights."""
    keras.utils.set_random_seed(3)
    L1, L2 = make_layers(), make_layers()
    inputs, outputs = make_functional(L1)
    model = keras_dbmtl.MultiTaskModel(inputs=inputs, outputs=outputs)
    model.build((None, D_IN))
    equivalent = make_equivalent(L2)
    for name, layer in L1.items():
        L2[name].set_weights(layer.get_weights())
    return model, equivalent, L1, L2


def numpy(value):
    return keras.ops.convert_to_numpy(value)


def paths(variables):
    return [v.path for v in variables]


def perturbation_users(network, X):
    """dict variable path -> the tasks whose output changes when that variable moves (no graph walk)."""
    before = {t: numpy(v) for t, v in network(X).items()}
    rng = np.random.default_rng(1)
    users = {}
    for variable in network.trainable_variables:
        old = numpy(variable)
        variable.assign(old + rng.normal(size=old.shape).astype(old.dtype))
        after = network(X)
        users[variable.path] = sorted(t for t in before if np.abs(numpy(after[t]) - before[t]).max() > 1e-6)
        variable.assign(old)
    return users


def check_split(model, X):
    users = perturbation_users(model.network, X)
    expected_shared = [p for p, tasks in users.items() if len(tasks) > 1]
    assert paths(model.shared_variables()) == expected_shared
    for task, variables in model.task_variables().items():
        assert paths(variables) == [p for p, tasks in users.items() if tasks == [task]]
    assert all(users.values())                      # every variable is used by some task


# ---------------------------------------------------------------- the split, by perturbation
def test_split_of_a_graph_that_branches_twice_matches_perturbation():
    X, _ = data()
    x, outputs = branching(branching_layers())
    model = keras_dbmtl.MultiTaskModel(inputs=x, outputs=outputs)
    check_split(model, X)
    assert paths(model.shared_variables()) == ["trunk/kernel", "trunk/bias", "tower/kernel", "tower/bias"]
    assert paths(model.task_variables()["b"]) == ["b_gate/kernel", "b_gate/bias", "b_head/kernel", "b_head/bias"]


def test_split_with_two_inputs_a_layer_called_twice_a_nested_tower_and_ops_matches_perturbation():
    user, item = keras.Input((4,), name="user"), keras.Input((4,), name="item")
    embed = layers.Dense(6, name="embed")                       # one layer called on both inputs
    eu, ei = embed(user), embed(item)
    cross = ops.multiply(eu, ei)                                 # a keras.ops call in the graph
    tower = keras.Sequential([layers.Dense(6, activation="relu"), layers.Dense(6)], name="tower_ab")
    outputs = {"a": layers.Dense(1, name="a")(tower(cross)),
               "b": layers.Dense(1, name="b")(tower(layers.Add()([cross, eu]))),   # the tower's second call
               "c": layers.Dense(1, name="c")(layers.Dense(3, name="c_gate")(ei))}
    model = keras_dbmtl.MultiTaskModel(inputs={"user": user, "item": item}, outputs=outputs)
    rng = np.random.default_rng(0)
    X = {k: rng.normal(size=(8, 4)).astype("float32") for k in ("user", "item")}
    check_split(model, X)
    assert [p.split("/")[0] for p in paths(model.shared_variables())] == ["embed"] * 2 + ["tower_ab"] * 4


# ---------------------------------------------------------------- training equals the encoder/heads model
@pytest.mark.parametrize("every", [1, 2])
def test_training_equals_the_encoder_heads_model(every):
    X, Y = data()
    model, equivalent, L1, L2 = pair(branching_layers, branching, branching_equivalent)
    assert len(model.shared_variables()) == len(equivalent.shared_variables()) == 4
    for m in (model, equivalent):
        m.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", task_gradients_every=every,
                  balancer=keras_dbmtl.balancers.DBMTL(beta=0.5, beta_sigma=0.5))
        m.fit(X, Y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    for name, layer in L1.items():
        for a, b in zip(layer.get_weights(), L2[name].get_weights()):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(numpy(model.balancer.ema_gradients), numpy(equivalent.balancer.ema_gradients),
                               rtol=1e-5, atol=1e-7)
    assert float(np.abs(L1["tower"].get_weights()[0] - L2["tower"].get_weights()[0]).max()) < 1e-5


# ---------------------------------------------------------------- representation level
def trunk_layers():
    return {"trunk": layers.Dense(8, activation="tanh", name="trunk"),
            "z": layers.Dense(8, activation="tanh", name="z"),
            "a_head": layers.Dense(1, name="a_head"),
            "b_hidden": layers.Dense(4, activation="tanh", name="b_hidden"),
            "b_head": layers.Dense(1, name="b_head")}


def trunk_functional(L):
    x = keras.Input((D_IN,), name="x")
    z = L["z"](L["trunk"](x))
    return x, {"a": L["a_head"](z), "b": L["b_head"](L["b_hidden"](z))}


def trunk_equivalent(L):
    model = keras_dbmtl.MultiTaskModel(encoder=keras.Sequential([L["trunk"], L["z"]]),
                                       heads={"a": L["a_head"], "b": keras.Sequential([L["b_hidden"], L["b_head"]])})
    model.build((None, D_IN))
    return model


def test_representation_level_equals_the_encoder_heads_model():
    X, Y = data(tasks=("a", "b"))
    model, equivalent, L1, L2 = pair(trunk_layers, trunk_functional, trunk_equivalent)
    z = functional.shared_representation(model.network, model.shared_variables())
    assert z._keras_history.operation.name == "z"            # the deepest tensor every task shares
    for m in (model, equivalent):
        m.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", balancer="mgda", task_gradients="representation")
        m.fit(X, Y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    for name, layer in L1.items():
        for a, b in zip(layer.get_weights(), L2[name].get_weights()):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_representation_with_an_input_that_bypasses_it():
    x, position = keras.Input((D_IN,), name="x"), keras.Input((2,), name="position")
    z = layers.Dense(8, activation="tanh", name="z")(layers.Dense(8, name="trunk")(x))
    outputs = {"a": layers.Dense(1, name="a")(layers.Concatenate()([z, position])), "b": layers.Dense(1, name="b")(z)}
    model = keras_dbmtl.MultiTaskModel(inputs={"x": x, "position": position}, outputs=outputs, representation="z")
    X, Y = data(tasks=("a", "b"))
    inputs = {"x": X, "position": np.random.default_rng(0).normal(size=(N, 2)).astype("float32")}
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", balancer="upgrad",
                  task_gradients="representation")
    decoded = model._decode(model._encode(inputs), inputs)            # decode(encode(x), bypass) == the network
    for task, value in model(inputs).items():
        np.testing.assert_allclose(numpy(decoded[task]), numpy(value), rtol=1e-6, atol=1e-6)
    before = [numpy(v) for v in model.shared_variables()]
    history = model.fit(inputs, Y, batch_size=BATCH, epochs=1, verbose=0).history
    assert np.isfinite(history["loss"][0])
    assert all(np.abs(numpy(v) - b).max() > 0 for v, b in zip(model.shared_variables(), before))


def test_representation_level_needs_a_tensor_every_shared_variable_passes():
    # A skip connection around the trunk's last layer: no tensor carries every trunk variable to task c.
    x = keras.Input((D_IN,), name="x")
    first = layers.Dense(8, activation="tanh", name="trunk")(x)
    last = layers.Dense(8, activation="tanh", name="last")(first)
    outputs = {"a": layers.Dense(1, name="a")(last),
               "c": layers.Dense(1, name="c")(layers.Concatenate(name="around")([first, last]))}
    model = keras_dbmtl.MultiTaskModel(inputs=x, outputs=outputs)
    with pytest.raises(ValueError, match="no single tensor through which every shared variable"):
        model.compile(loss="mse", balancer="mgda", task_gradients="representation")
    with pytest.raises(ValueError, match="representation='trunk' is not a tensor"):
        keras_dbmtl.MultiTaskModel(inputs=x, outputs=outputs, representation="trunk")
    with pytest.raises(ValueError, match="names no layer"):
        keras_dbmtl.MultiTaskModel(inputs=x, outputs=outputs, representation="nope")


def _min_norm_weights(gram):
    from scipy.optimize import minimize

    num = len(gram)
    result = minimize(lambda w: w @ gram @ w, np.full(num, 1.0 / num), jac=lambda w: 2 * gram @ w, method="SLSQP",
                      bounds=[(0.0, 1.0)] * num, constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0}],
                      options={"ftol": 1e-15, "maxiter": 500})
    return result.x


def test_representation_level_with_a_tower_after_the_branch_against_numpy():
    """The branching graph's representation is the trunk's output h (every task passes through it); the tower
    that a and b share lies after it. MGDA-UB (no normalisation), one SGD step, against float64 numpy backprop
    written from the network's equations: the weights w = min-norm point of the Gramian of dl_t/dh (SLSQP), the
    trunk gets the pull-back of sum_t w_t dl_t/dh, the tower sum_t w_t dl_t/dtower (MGDA's head weights are its
    weights), each head w_t dl_t/dhead. Losses about 1e4 apart."""
    keras.utils.set_random_seed(5)
    x = keras.Input((D_IN,), name="x")
    trunk, tower = layers.Dense(8, activation="tanh", name="trunk"), layers.Dense(6, activation="tanh", name="tower")
    heads = {"a": layers.Dense(1, name="a"), "b": layers.Dense(1, name="b"), "c": layers.Dense(1, name="c")}
    h = trunk(x)
    t = tower(h)
    outputs = {"a": heads["a"](t), "b": heads["b"](t), "c": heads["c"](layers.Concatenate(name="skip")([h, x]))}
    model = keras_dbmtl.MultiTaskModel(inputs=x, outputs=outputs)
    lr = 0.01
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse",
                  balancer=keras_dbmtl.balancers.MGDA(normalization="none"), task_gradients="representation")
    assert model._functional_parts()[0].output._keras_history.operation.name == "trunk"
    assert [v.path for v in model.unowned_variables()] == [v.path for v in tower.trainable_variables]
    X, Y = data(tasks=("a", "b", "c"))
    X, Y = X[:BATCH].astype(np.float64), {k: v[:BATCH].astype(np.float64) for k, v in Y.items()}
    (W1, b1), (W2, b2) = [np.asarray(w, np.float64) for w in trunk.get_weights()], \
        [np.asarray(w, np.float64) for w in tower.get_weights()]
    head_w = {k: [np.asarray(w, np.float64) for w in layer.get_weights()] for k, layer in heads.items()}

    hv = np.tanh(X @ W1 + b1)
    tv = np.tanh(hv @ W2 + b2)
    inputs_of = {"a": tv, "b": tv, "c": np.concatenate([hv, X], axis=1)}
    residual = {k: inputs_of[k] @ head_w[k][0] + head_w[k][1] - Y[k] for k in heads}
    losses = {k: float(np.mean(residual[k] ** 2)) for k in heads}
    assert max(losses.values()) / min(losses.values()) > 1e3
    d_out = {k: 2.0 * residual[k] / BATCH for k in heads}                  # dl_k/d(output_k), (B, 1)
    d_t = {k: d_out[k] @ head_w[k][0].T for k in ("a", "b")}               # dl_k/dt
    d_pre_t = {k: d_t[k] * (1.0 - tv ** 2) for k in ("a", "b")}
    d_h = {k: d_pre_t[k] @ W2.T for k in ("a", "b")}
    d_h["c"] = d_out["c"] @ head_w["c"][0][:8].T
    jacobian = np.stack([d_h[k].ravel() for k in ("a", "b", "c")])
    w = _min_norm_weights(jacobian @ jacobian.T)
    direction = sum(w[i] * d_h[k] for i, k in enumerate(("a", "b", "c")))
    d_pre_h = direction * (1.0 - hv ** 2)
    expected = {
        "trunk": [W1 - lr * X.T @ d_pre_h, b1 - lr * d_pre_h.sum(0)],
        "tower": [W2 - lr * sum(w[i] * hv.T @ d_pre_t[k] for i, k in enumerate(("a", "b"))),
                  b2 - lr * sum(w[i] * d_pre_t[k].sum(0) for i, k in enumerate(("a", "b")))],
    }
    for i, k in enumerate(("a", "b", "c")):
        expected[k] = [head_w[k][0] - lr * w[i] * inputs_of[k].T @ d_out[k],
                       head_w[k][1] - lr * w[i] * d_out[k].sum(0)]
    model.train_on_batch(X[:BATCH].astype("float32"), {k: v.astype("float32") for k, v in Y.items()})
    for name, layer in [("trunk", trunk), ("tower", tower)] + list(heads.items()):
        for got, want, before in zip(layer.get_weights(), expected[name], layer_weights_before(name, W1, b1, W2, b2,
                                                                                            head_w)):
            step = np.abs(want - before).max()
            assert step > 0 or name in ("a", "b", "c")
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(step, 1e-12) + 1e-7,
                                       err_msg=f"{name}: weights after the step")


def layer_weights_before(name, W1, b1, W2, b2, head_w):
    return {"trunk": [W1, b1], "tower": [W2, b2]}.get(name) or head_w[name]


# ---------------------------------------------------------------- from_model
def test_from_model_with_list_outputs_trains_the_models_own_weights():
    x = keras.Input((D_IN,))
    h = layers.Dense(8, activation="relu", name="shared")(x)
    base = keras.Model(x, [layers.Dense(1, name="ctr")(h), layers.Dense(1, name="cvr")(h)])
    model = keras_dbmtl.MultiTaskModel.from_model(base)
    assert model.task_names == ["ctr", "cvr"]
    assert paths(model.shared_variables()) == ["shared/kernel", "shared/bias"]
    X, Y = data(tasks=("ctr", "cvr"))
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", balancer="dbmtl")
    model.fit(X, Y, batch_size=BATCH, epochs=1, verbose=0)
    ours, theirs = model(X[:4]), base(X[:4])
    for t, task in enumerate(model.task_names):              # one set of weights
        np.testing.assert_array_equal(numpy(ours[task]), numpy(theirs[t]))


def test_from_model_with_dict_outputs_gives_the_constructors_split():
    x, outputs = branching(branching_layers())
    model = keras_dbmtl.MultiTaskModel.from_model(keras.Model(x, outputs))
    assert model.task_names == ["a", "b", "c"]
    assert paths(model.shared_variables()) == ["trunk/kernel", "trunk/bias", "tower/kernel", "tower/bias"]
    assert paths(model.task_variables()["c"]) == ["c_head/kernel", "c_head/bias"]


def test_the_monitor_logs_the_cosines_of_a_functional_model():
    X, Y = data()
    x, outputs = branching(branching_layers())
    model = keras_dbmtl.MultiTaskModel(inputs=x, outputs=outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", balancer="upgrad")
    monitor = keras_dbmtl.callbacks.TaskBalanceMonitor()
    history = model.fit(X, Y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[monitor]).history
    for pair in ("a_b", "a_c", "b_c"):
        assert -1.0 <= history[f"cosine_{pair}"][0] <= 1.0
    assert monitor.gramians[-1].shape == (3, 3)


# ---------------------------------------------------------------- save, load, export, mixed precision
def test_save_load_round_trip_keeps_the_split_and_the_balancer_state(tmp_path):
    X, Y = data()
    L = branching_layers()
    x, outputs = branching(L)
    shared = L["trunk"].trainable_variables + L["tower"].trainable_variables + L["c_head"].trainable_variables
    model = keras_dbmtl.MultiTaskModel(inputs=x, outputs=outputs, shared_variables=shared)
    assert model.task_variables()["c"] == []
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse",
                  balancer=keras_dbmtl.balancers.DBMTL(beta=0.5, beta_sigma=0.5))
    model.fit(X, Y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    path = str(tmp_path / "functional.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    assert paths(reloaded.shared_variables()) == paths(model.shared_variables())
    assert {t: paths(v) for t, v in reloaded.task_variables().items()} == {
        t: paths(v) for t, v in model.task_variables().items()}
    np.testing.assert_array_equal(numpy(reloaded.balancer.ema_gradients), numpy(model.balancer.ema_gradients))
    for m in (model, reloaded):
        m.fit(X, Y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(reloaded.trainable_variables, model.trainable_variables):
        np.testing.assert_allclose(numpy(a), numpy(b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(numpy(reloaded.balancer.ema_gradients), numpy(model.balancer.ema_gradients),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(BACKEND == "torch", reason="Keras cannot export a SavedModel from torch")
def test_export_tf_saved_model(tmp_path):
    import tensorflow as tf

    X, Y = data()
    x, outputs = branching(branching_layers())
    model = keras_dbmtl.MultiTaskModel(inputs=x, outputs=outputs)
    model.compile(optimizer="sgd", loss="mse", balancer="dbmtl")
    model.fit(X, Y, batch_size=BATCH, epochs=1, verbose=0)
    expected = {t: numpy(v) for t, v in model(X[:4]).items()}
    model.export(str(tmp_path / "served"), format="tf_saved_model", verbose=False)
    served = tf.saved_model.load(str(tmp_path / "served"))        # kept: its variables live as long as it
    outputs = served.serve(tf.constant(X[:4]))
    for task in model.task_names:
        np.testing.assert_allclose(outputs[task].numpy(), expected[task], rtol=1e-5, atol=1e-6)


def test_mixed_bfloat16_tracks_float32():
    X, Y = data(tasks=("a", "b"))
    trained = []
    for policy in ("float32", "mixed_bfloat16"):
        keras.mixed_precision.set_global_policy(policy)
        try:
            keras.utils.set_random_seed(5)
            inputs, outputs = trunk_functional(trunk_layers())
            model = keras_dbmtl.MultiTaskModel(inputs=inputs, outputs=outputs)
            model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", balancer="dbmtl")
            model.fit(X, Y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        finally:
            keras.mixed_precision.set_global_policy("float32")
        trained.append([numpy(v).astype("float64") for v in model.trainable_variables])
    scale = max(np.abs(w).max() for w in trained[0])
    assert max(np.abs(a - b).max() for a, b in zip(*trained)) / scale < 1e-2


# ---------------------------------------------------------------- errors that name the fix
class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.trunk, self.a, self.b = layers.Dense(4), layers.Dense(1), layers.Dense(1)

    def call(self, x):
        h = self.trunk(x)
        return {"a": self.a(h), "b": self.b(h)}


def test_a_subclassed_model_gets_an_error_naming_the_ways_out():
    with pytest.raises(ValueError, match=r"no functional graph.*encoder=\.\.\., heads=\.\.\."):
        keras_dbmtl.MultiTaskModel.from_model(Subclassed())


def test_bad_outputs_and_shared_variables_get_errors_naming_the_fix():
    x = keras.Input((D_IN,))
    h = layers.Dense(4, name="h")(x)
    with pytest.raises(ValueError, match="outputs must be a dict"):
        keras_dbmtl.MultiTaskModel(inputs=x, outputs=layers.Dense(1)(h))
    with pytest.raises(ValueError, match="single output"):
        keras_dbmtl.MultiTaskModel.from_model(keras.Model(x, layers.Dense(1)(h)))
    same = layers.Dense(1, name="same")
    with pytest.raises(ValueError, match="without one distinct name per output"):
        keras_dbmtl.MultiTaskModel(inputs=x, outputs=[same(h), same(h)])
    with pytest.raises(ValueError, match="fully separate"):
        keras_dbmtl.MultiTaskModel(inputs=x, outputs={"a": layers.Dense(1)(x), "b": layers.Dense(1)(x)})
    with pytest.raises(ValueError, match="either encoder=/heads= or inputs=/outputs="):
        keras_dbmtl.MultiTaskModel(encoder=layers.Dense(2), inputs=x, outputs={"a": h, "b": h})

    L = branching_layers()
    inputs, outputs = branching(L)
    with pytest.raises(ValueError, match="not trainable variables of model"):
        keras_dbmtl.MultiTaskModel(inputs=inputs, outputs=outputs, shared_variables=[keras.Variable(np.zeros(2))])
    with pytest.raises(ValueError, match=r"\['tower/kernel', 'tower/bias'\] are used by several tasks"):
        keras_dbmtl.MultiTaskModel(inputs=inputs, outputs=outputs, shared_variables=L["trunk"].trainable_variables)


def test_check_shared_names_a_variable_no_output_reaches():
    L = branching_layers()
    inputs, outputs = branching(L)
    network = keras.Model(inputs, outputs)
    split = functional.split_variables(network)
    unreached = keras.Variable(np.zeros(2), name="unreached")
    with pytest.raises(ValueError, match="No task output depends on the shared_variables"):
        functional._check_shared(type("M", (), {"name": "m", "trainable_variables": network.trainable_variables
                                               + [unreached]})(), split.shared + [unreached], split.users)
