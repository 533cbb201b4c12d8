import keras
import numpy as np
import pytest

from keras_dbmtl import architectures
from tests.architectures.helpers import (TASKS, assert_exact_split, assert_fits, assert_round_trip, count,
                                         dense_parameters, inputs, make_model)


@pytest.mark.parametrize("gate_bias", [False, True])
def test_parameter_count_closed_form(rng, gate_bias):
    d, n, units = 6, 4, (5, 3)
    encoder = architectures.MMoE(TASKS, num_experts=n, expert_units=units, gate_bias=gate_bias)
    model = make_model(encoder)
    model(inputs(rng, d=d))
    experts = n * ((d * 5 + 5) + (5 * 3 + 3))
    gates = len(TASKS) * (d * n + (n if gate_bias else 0))
    assert count(model.shared_variables()) == experts
    assert count(encoder.trainable_variables) == experts + gates
    assert count(model.task_variables()["a"]) == d * n + (n if gate_bias else 0) + dense_parameters(3, (1,))


def test_split_is_exact(rng):
    model = make_model(architectures.MMoE(TASKS, num_experts=3, expert_units=(4,)))
    assert_exact_split(model, inputs(rng), rng)


def test_gates_are_softmax_and_mix_the_experts(rng):
    x = inputs(rng)
    encoder = architectures.MMoE(TASKS, num_experts=3, expert_units=(4,))
    features = encoder(x)
    experts = np.stack([keras.ops.convert_to_numpy(e(x)) for e in encoder.experts], axis=1)      # (B, n, h)
    for t, g in encoder.gate_weights(x).items():
        g = keras.ops.convert_to_numpy(g).astype("float64")
        np.testing.assert_allclose(g.sum(axis=-1), 1.0, atol=1e-6)
        kernel = keras.ops.convert_to_numpy(encoder.gates[t].kernel).astype("float64")
        logits = x.astype("float64") @ kernel
        reference = np.exp(logits - logits.max(-1, keepdims=True))
        np.testing.assert_allclose(g, reference / reference.sum(-1, keepdims=True), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(features[t]), np.einsum("bn,bnh->bh", g, experts),
                                   rtol=1e-5, atol=1e-5)


def test_dbmtl_fit_and_round_trip(rng, tmp_path):
    x = inputs(rng, n=32)
    model = make_model(architectures.MMoE(TASKS, num_experts=3, expert_units=(8,)))
    assert_fits(model, x)
    assert_round_trip(model, x, tmp_path)


def test_heads_must_match_tasks():
    encoder = architectures.MMoE(["a", "b"], num_experts=2, expert_units=(4,))
    with pytest.raises(ValueError, match="differ from the encoder's tasks"):
        architectures.towers(encoder, {"a": keras.layers.Dense(1)})
