import keras
import numpy as np
from balancer_helpers import built, combine, tiny_model
from keras import ops

from keras_dbmtl.balancers import STL


def test_weight_one_on_the_chosen_task():
    loss, weights = combine(built(STL(task="b"), 3, task_names=["a", "b", "c"]), [2.0, 0.5, 9.0])
    np.testing.assert_allclose([loss], [0.5])
    np.testing.assert_array_equal(weights, [0.0, 1.0, 0.0])
    loss, weights = combine(built(STL(task=2), 3), [2.0, 0.5, 9.0])
    np.testing.assert_allclose([loss], [9.0])


def test_default_is_first_task_and_ignores_other_losses():
    loss, _ = combine(built(STL(), 2), [2.0, np.inf])
    np.testing.assert_allclose([loss], [2.0])


def test_only_the_chosen_task_trains(tiny_data):
    x, y = tiny_data
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse", balancer=STL(task="b"))
    model(x[:2])
    before = {t: [ops.convert_to_numpy(v) for v in model.heads[t].weights] for t in "abc"}
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    for task in "ac":
        for old, new in zip(before[task], model.heads[task].weights):
            np.testing.assert_array_equal(old, ops.convert_to_numpy(new))
    assert not np.allclose(before["b"][0], ops.convert_to_numpy(model.heads["b"].weights[0]))
    assert history.history["b_loss"][-1] < history.history["b_loss"][0]
    np.testing.assert_allclose(history.history["b_weight"], 1.0)
