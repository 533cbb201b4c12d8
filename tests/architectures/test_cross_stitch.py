import keras
import numpy as np

from keras_dbmtl import architectures
from tests.architectures.helpers import (TASKS, assert_exact_split, assert_fits, assert_round_trip, count,
                                         dense_parameters, inputs, make_model)


def stages():
    return [keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(4, activation="tanh"),
            keras.layers.Dense(3, activation="tanh")]


def test_unit_mixes_linearly(rng):
    unit = architectures.CrossStitch(3)
    maps = [rng.normal(size=(2, 4)).astype("float32") for _ in range(3)]
    mixed = unit(maps)
    alpha = np.full((3, 3), 0.1) + np.eye(3) * 0.8                          # paper init: 0.9 / 0.1
    np.testing.assert_allclose(keras.ops.convert_to_numpy(unit.alpha), alpha, atol=1e-7)
    for t in range(3):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(mixed[t]), sum(alpha[t, j] * maps[j] for j in range(3)),
                                   rtol=1e-5, atol=1e-6)


def test_parameter_count_and_split(rng):
    d = 6
    encoder = architectures.CrossStitchNetwork(TASKS, stages())
    model = make_model(encoder)
    x = inputs(rng, d=d)
    model(x)
    T, column = len(TASKS), dense_parameters(d, (5, 4, 3))
    assert count(encoder.trainable_variables) == T * column + 2 * T * T
    assert count(model.task_variables()["a"]) == dense_parameters(4, (3,)) + dense_parameters(3, (1,))
    assert encoder.task_layers()["c"] == [f"{encoder.name}_c_stage_2"]
    assert_exact_split(model, x, rng)


def test_columns_are_independent_copies(rng):
    encoder = architectures.CrossStitchNetwork(["a", "b"], stages(), self_weight=1.0, other_weight=0.0)
    x = inputs(rng)
    out = encoder(x)
    column = keras.ops.convert_to_numpy(x)
    for layer in encoder.columns["a"]:
        column = keras.ops.convert_to_numpy(layer(column))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out["a"]), column, rtol=1e-5, atol=1e-6)
    kernels = [keras.ops.convert_to_numpy(encoder.columns[t][0].kernel) for t in ("a", "b")]
    assert not np.allclose(kernels[0], kernels[1])


def test_dbmtl_fit_and_round_trip(rng, tmp_path):
    x = inputs(rng, n=32)
    model = make_model(architectures.CrossStitchNetwork(TASKS, stages()))
    assert_fits(model, x)
    assert_round_trip(model, x, tmp_path)
