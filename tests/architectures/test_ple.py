import keras
import numpy as np
import pytest

from keras_dbmtl import architectures
from tests.architectures.helpers import (TASKS, assert_exact_split, assert_fits, assert_round_trip, count,
                                         dense_parameters, inputs, make_model)


def ple_parameters(T, d, levels, m_t, m_s, units):
    """sum_l [(T m_t + m_s) P(d_l, u) + T d_l (m_t + m_s) + [l < L] d_l (T m_t + m_s)], d_1 = d, d_l = u_k."""
    total = 0
    for level in range(levels):
        d_l = d if level == 0 else units[-1]
        total += (T * m_t + m_s) * dense_parameters(d_l, units) + T * d_l * (m_t + m_s)
        if level < levels - 1:
            total += d_l * (T * m_t + m_s)
    return total


@pytest.mark.parametrize("levels,m_t,m_s", [(1, 2, 1), (2, 1, 2), (3, 2, 2)])
def test_parameter_count_closed_form(rng, levels, m_t, m_s):
    d, units = 6, (5, 4)
    encoder = architectures.PLE(TASKS, num_levels=levels, task_experts=m_t, shared_experts=m_s, expert_units=units)
    make_model(encoder)(inputs(rng, d=d))
    assert count(encoder.trainable_variables) == ple_parameters(len(TASKS), d, levels, m_t, m_s, units)


def test_cgc_is_one_level_and_owns_its_experts(rng):
    d, units = 6, (4,)
    encoder = architectures.CGC(TASKS, task_experts=2, shared_experts=1, expert_units=units)
    model = make_model(encoder)
    model(inputs(rng, d=d))
    assert encoder.num_levels == 1 and "num_levels" not in encoder.get_config()
    # shared: only the shared expert; task a: its 2 experts, its gate over 3 experts, its head
    assert count(model.shared_variables()) == dense_parameters(d, units)
    assert count(model.task_variables()["a"]) == 2 * dense_parameters(d, units) + d * 3 + dense_parameters(4, (1,))


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_split_is_exact(rng, levels):
    model = make_model(architectures.PLE(TASKS, num_levels=levels, task_experts=1, shared_experts=1,
                                         expert_units=(4,)))
    assert_exact_split(model, inputs(rng), rng)


def test_gates_sum_to_one(rng):
    x = inputs(rng)
    encoder = architectures.PLE(TASKS, num_levels=3, task_experts=2, shared_experts=1, expert_units=(4,))
    encoder(x)
    gates = encoder.gate_weights(x)
    assert len(gates) == 3 and None in gates[0] and None in gates[1] and None not in gates[2]
    for level in gates:
        for key, g in level.items():
            g = keras.ops.convert_to_numpy(g)
            assert g.shape[-1] == (3 if key is not None else len(TASKS) * 2 + 1)
            assert np.all(g > 0)
            np.testing.assert_allclose(g.sum(axis=-1), 1.0, atol=1e-6)


def test_dbmtl_fit_and_round_trip(rng, tmp_path):
    x = inputs(rng, n=32)
    model = make_model(architectures.PLE(TASKS, num_levels=2, task_experts=1, shared_experts=1, expert_units=(8,)))
    assert_fits(model, x)
    assert_round_trip(model, x, tmp_path)


def test_cgc_round_trip(rng, tmp_path):
    x = inputs(rng)
    model = make_model(architectures.CGC(TASKS, task_experts=1, shared_experts=2, expert_units=(4,)))
    model(x)
    assert isinstance(assert_round_trip(model, x, tmp_path).encoder, architectures.CGC)


def test_invalid_expert_counts():
    with pytest.raises(ValueError, match="at least one expert"):
        architectures.PLE(TASKS, task_experts=0, shared_experts=0)
