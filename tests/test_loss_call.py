"""keras_dbmtl._loss_call.task_loss: the direct call on torch gives exactly `Loss.__call__`'s value."""

import keras
import numpy as np
import pytest
from keras.src.losses.losses import LossFunctionWrapper

from keras_dbmtl._loss_call import task_loss

CASES = [  # (loss name, class name, y_true maker, y_pred shape)
    ("mse", "MeanSquaredError", lambda rng: rng.normal(size=(64, 1)) * 1e3, (64, 1)),
    ("mae", "MeanAbsoluteError", lambda rng: rng.normal(size=(64,)), (64, 1)),
    ("huber", "Huber", lambda rng: rng.normal(size=(8, 3)) * 1e-4, (8, 3)),
    ("binary_crossentropy", "BinaryCrossentropy", lambda rng: rng.integers(0, 2, size=(16, 1)), (16, 1)),
    ("sparse_categorical_crossentropy", "SparseCategoricalCrossentropy",
     lambda rng: rng.integers(0, 5, size=(16, 1)).astype("int32"), (16, 5)),
    ("categorical_crossentropy", "CategoricalCrossentropy", lambda rng: np.eye(5)[rng.integers(0, 5, size=16)],
     (16, 5)),
]


@pytest.mark.parametrize("name, class_name, make_y, pred_shape", CASES)
def test_same_value_as_keras(name, class_name, make_y, pred_shape):
    rng = np.random.default_rng(0)
    y = make_y(rng)
    y = y if y.dtype == np.int32 else y.astype("float32")
    y_pred = keras.ops.convert_to_tensor(rng.uniform(0.05, 0.95, size=pred_shape).astype("float32"))
    y_true = keras.ops.convert_to_tensor(y)
    for loss in (LossFunctionWrapper(keras.losses.get(name)),
                 keras.losses.get({"class_name": class_name, "config": {}})):
        expected = float(keras.ops.convert_to_numpy(loss(y_true, y_pred)))
        assert float(keras.ops.convert_to_numpy(task_loss(loss, y_true, y_pred))) == expected
    # With sample weights (the Keras path): still the same value.
    weights = keras.ops.convert_to_tensor(rng.uniform(size=(pred_shape[0],)).astype("float32"))
    loss = LossFunctionWrapper(keras.losses.get(name))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(task_loss(loss, y_true, y_pred, weights)),
                               keras.ops.convert_to_numpy(loss(y_true, y_pred, sample_weight=weights)), rtol=0)
