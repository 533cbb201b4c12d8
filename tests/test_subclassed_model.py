"""A subclassed multi-output model as a MultiTaskModel (`MultiTaskModel.from_model(model, shared_variables=...)`).

No graph says which task uses a non-shared variable, so each gets sum_t h_t grad l_t from the task Jacobian's own
rows. Training is compared with the equivalent `encoder`/`heads` model, whose heads are known to be the tasks'
own (same weights, same data): the parameters must agree within float32 round-off for DB-MTL (head weights 1) and
for MGDA (head weights != 1: the head of task t must get only its own row, times h_t), with losses 1e4 apart.
"""

import keras
import numpy as np
import pytest
from keras import layers

import keras_dbmtl
from tests.test_functional_model import Head

D_IN, N, BATCH = 5, 48, 16
TASKS = ("a", "b", "c")


@keras.saving.register_keras_serializable(package="test_subclassed")
class ThreeTaskNet(keras.Model):
    """A trunk, a tower that a and b use and c does not (shared, in shared_variables), one head per task."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.trunk = layers.Dense(8, activation="tanh", name="trunk")
        self.tower = layers.Dense(6, activation="tanh", name="tower")
        self.heads = {t: layers.Dense(1, name=f"{t}_head") for t in TASKS}

    def call(self, x, training=None):
        h = self.trunk(x)
        t = self.tower(h)
        return {"a": self.heads["a"](t), "b": self.heads["b"](t), "c": self.heads["c"](h)}


def data(seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, D_IN)).astype("float32")
    W = rng.normal(size=(D_IN, 1))
    Y = {t: (s * (X @ W + 0.3 * rng.normal(size=(N, 1)))).astype("float32") for t, s in zip(TASKS, (1.0, 100.0, 0.01))}
    return X, Y


def subclassed_and_equivalent():
    keras.utils.set_random_seed(1)
    net = ThreeTaskNet()
    net(np.zeros((2, D_IN), "float32"))
    model = keras_dbmtl.MultiTaskModel.from_model(
        net, shared_variables=net.trunk.trainable_variables + net.tower.trainable_variables)
    trunk, tower = layers.Dense(8, activation="tanh"), layers.Dense(6, activation="tanh")
    heads = {t: layers.Dense(1) for t in TASKS}
    x = keras.Input((D_IN,))
    h = trunk(x)
    encoder = keras.Model(x, [tower(h), h])
    equivalent = keras_dbmtl.MultiTaskModel(
        encoder=encoder, heads={"a": Head(0, [heads["a"]]), "b": Head(0, [heads["b"]]), "c": Head(1, [heads["c"]])})
    equivalent.build((None, D_IN))
    for source, target in [(net.trunk, trunk), (net.tower, tower)] + [(net.heads[t], heads[t]) for t in TASKS]:
        target.set_weights(source.get_weights())
    return model, equivalent, net, (trunk, tower, heads)


@pytest.mark.parametrize("balancer", ["dbmtl", "mgda"])
def test_training_equals_the_encoder_heads_model(balancer):
    model, equivalent, net, (trunk, tower, heads) = subclassed_and_equivalent()
    assert model.task_names == list(TASKS)
    assert [v.path for v in model.shared_variables()] == [v.path for v in net.trunk.trainable_variables
                                                          + net.tower.trainable_variables]
    assert len(model.unowned_variables()) == 6
    X, Y = data()
    for m in (model, equivalent):
        m.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", balancer=balancer)
        history = m.fit(X, Y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0).history
    if balancer == "mgda":       # MGDA's head weights are its task weights, here far from 1 for task a
        assert history["a_weight"][-1] < 0.5, history
    pairs = [(net.trunk, trunk), (net.tower, tower)] + [(net.heads[t], heads[t]) for t in TASKS]
    moved = 0.0
    for source, target in pairs:
        for a, b in zip(source.get_weights(), target.get_weights()):
            # MGDA's min-norm solve amplifies float32 round-off (TensorFlow: 5e-5 after 6 steps).
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-4)
    for t in TASKS:      # the heads moved (the comparison is not of two untrained models)
        moved = max(moved, float(np.abs(net.heads[t].get_weights()[0]).max()))
    assert moved > 0


def test_save_and_load_round_trip(tmp_path):
    model, _, net, _ = subclassed_and_equivalent()
    X, Y = data()
    model.compile(optimizer="adam", loss="mse", balancer="dbmtl")
    model.fit(X, Y, batch_size=BATCH, epochs=1, verbose=0)
    path = str(tmp_path / "subclassed.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    assert restored.task_names == list(TASKS)
    assert [v.shape for v in restored.shared_variables()] == [v.shape for v in model.shared_variables()]
    restored_trunk = restored.network.trunk.trainable_variables + restored.network.tower.trainable_variables
    assert [id(v) for v in restored.shared_variables()] == [id(v) for v in restored_trunk]
    for a, b in zip(model.predict(X, verbose=0).values(), restored.predict(X, verbose=0).values()):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model.balancer.variables[0]),
                               keras.ops.convert_to_numpy(restored.balancer.variables[0]))
    first = restored.fit(X, Y, batch_size=BATCH, epochs=1, verbose=0).history["loss"][0]
    assert np.isfinite(first)


def test_bad_input_names_the_fix():
    net = ThreeTaskNet()
    with pytest.raises(ValueError, match="not been called yet"):
        keras_dbmtl.MultiTaskModel.from_model(net, shared_variables=[])
    net(np.zeros((2, D_IN), "float32"))
    with pytest.raises(ValueError, match=r"shared_variables=model\.trunk"):
        keras_dbmtl.MultiTaskModel.from_model(net)
    with pytest.raises(ValueError, match="not trainable variables"):
        keras_dbmtl.MultiTaskModel.from_model(net, shared_variables=[keras.Variable(np.zeros(3))])
    model = keras_dbmtl.MultiTaskModel.from_model(net, shared_variables=net.trunk.trainable_variables)
    with pytest.raises(ValueError, match="task_gradients='parameters' with task_gradients_every=1 only"):
        model.compile(optimizer="sgd", loss="mse", balancer="dbmtl", task_gradients_every=2)
    with pytest.raises(ValueError, match="task_gradients='parameters' with task_gradients_every=1 only"):
        model.compile(optimizer="sgd", loss="mse", balancer="mgda", task_gradients="representation")
    with pytest.raises(ValueError, match="representation= needs a functional graph"):
        keras_dbmtl.MultiTaskModel.from_model(net, shared_variables=net.trunk.trainable_variables,
                                              representation="trunk")
