import keras
import numpy as np
import pytest

from keras_dbmtl import architectures
from tests.architectures.helpers import (TASKS, assert_exact_split, assert_fits, assert_round_trip, count,
                                         dense_parameters, inputs, make_model)


def stages():
    return [keras.layers.Dense(5, activation="relu"),
            [keras.layers.Dense(4, activation="relu"), keras.layers.Dense(3, activation="relu")]]


def test_parameter_count_closed_form(rng):
    d, hidden = 6, 2
    encoder = architectures.MTAN(TASKS, stages(), attention_units=hidden)
    model = make_model(encoder)
    model(inputs(rng, d=d))
    backbone = dense_parameters(d, (5,)) + dense_parameters(5, (4, 3))
    transfer = dense_parameters(5, (3,))                           # f_1: stage 1's output -> stage 2's width
    # attention on stage 1: input u_1 (5) -> 2 -> 5; on stage 2: concat(u_2 (4), f_1 (3)) -> 2 -> 3
    attention = dense_parameters(5, (hidden, 5)) + dense_parameters(4 + 3, (hidden, 3))
    assert count(model.shared_variables()) == backbone + transfer
    assert count(encoder.trainable_variables) == backbone + transfer + len(TASKS) * attention
    assert count(model.task_variables()["a"]) == attention + dense_parameters(3, (1,))


def test_output_is_the_mask_times_the_last_stage(rng):
    x = inputs(rng)
    encoder = architectures.MTAN(["a", "b"], stages())
    out = encoder(x)
    u1 = encoder.stages[0][0](x)
    u2 = encoder.stages[1][0](u1)
    p2 = keras.ops.convert_to_numpy(encoder.stages[1][1](u2))
    a1 = encoder.attention["a"][0](u1) * u1
    mask = encoder.attention["a"][1](keras.ops.concatenate([u2, encoder.transfers[0](a1)], axis=-1))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out["a"]), keras.ops.convert_to_numpy(mask) * p2,
                               rtol=1e-5, atol=1e-6)


def test_split_is_exact(rng):
    model = make_model(architectures.MTAN(TASKS, stages(), attention_units=3))
    assert_exact_split(model, inputs(rng), rng)


def test_dbmtl_fit_and_round_trip(rng, tmp_path):
    x = inputs(rng, n=32)
    model = make_model(architectures.MTAN(TASKS, stages()))
    assert_fits(model, x)
    assert_round_trip(model, x, tmp_path)


def test_transfers_must_sit_between_stages():
    with pytest.raises(ValueError, match="one transfer layer between each pair"):
        architectures.MTAN(TASKS, stages(), transfers=[])
