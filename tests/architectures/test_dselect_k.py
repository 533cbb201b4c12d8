import keras
import numpy as np
import pytest

from keras_dbmtl import architectures
from tests.architectures.helpers import (TASKS, assert_exact_split, assert_fits, assert_round_trip, count,
                                         dense_parameters, inputs, make_model)


def smooth_step_reference(t, gamma):
    t = np.asarray(t, "float64")
    middle = -2.0 / gamma ** 3 * t ** 3 + 3.0 / (2.0 * gamma) * t + 0.5
    return np.where(t <= -gamma / 2, 0.0, np.where(t >= gamma / 2, 1.0, middle))


def test_smooth_step_matches_the_paper():
    t = np.array([-3.0, -0.5, -0.3, -0.01, 0.0, 0.2, 0.5, 0.7, 10.0], "float32")
    for gamma in (1.0, 0.4):
        got = keras.ops.convert_to_numpy(architectures.smooth_step(keras.ops.convert_to_tensor(t), gamma))
        np.testing.assert_allclose(got, smooth_step_reference(t, gamma), atol=1e-6)
    assert smooth_step_reference(0.0, 1.0) == 0.5


@pytest.mark.parametrize("per_example", [False, True])
def test_parameter_count_closed_form(rng, per_example):
    d, n, k, units = 6, 5, 2, (4,)
    m = 3                                                        # ceil(log2 5)
    encoder = architectures.DSelectK(TASKS, num_experts=n, k=k, expert_units=units, per_example=per_example)
    model = make_model(encoder)
    model(inputs(rng, d=d))
    gate = d * (k * m + k) if per_example else k * m + k
    assert count(model.shared_variables()) == n * dense_parameters(d, units)
    assert count(encoder.trainable_variables) == n * dense_parameters(d, units) + len(TASKS) * gate
    assert count(model.task_variables()["b"]) == gate + dense_parameters(4, (1,))


def test_split_is_exact(rng):
    model = make_model(architectures.DSelectK(TASKS, num_experts=4, k=2, expert_units=(4,)))
    assert_exact_split(model, inputs(rng), rng)


def test_static_gate_matches_numpy_and_folds_unused_codes():
    gate = architectures.DSelectKGate(num_experts=3, k=2, gamma=1.0)
    gate.build((None, 4))
    z = np.array([[0.1, -0.2], [0.3, 0.05]], "float32")         # k = 2 selectors, m = 2 bits
    w = np.array([0.4, -0.1], "float32")
    gate.z.assign(z)
    gate.w.assign(w)
    s = smooth_step_reference(z, 1.0)
    codes = np.array([[(j >> l) & 1 for l in range(2)] for j in range(4)])
    r = np.prod(np.where(codes[None], s[:, None, :], 1 - s[:, None, :]), axis=-1)          # (k, 4)
    folded = np.stack([r[:, 0] + r[:, 3], r[:, 1], r[:, 2]], axis=1)                          # code 3 -> expert 0
    softmax = np.exp(w) / np.exp(w).sum()
    alpha = keras.ops.convert_to_numpy(gate(np.zeros((2, 4), "float32")))
    np.testing.assert_allclose(alpha, softmax @ folded, atol=1e-6)
    np.testing.assert_allclose(alpha.sum(), 1.0, atol=1e-6)


def test_anneal_selects_exactly_k_experts(rng):
    n, k = 8, 3
    gate = architectures.DSelectKGate(num_experts=n, k=k, anneal_rate=0.5, min_temperature=1e-6)
    x = np.zeros((1, 4), "float32")
    gate(x)
    # selectors on distinct codes 1, 6, 4 (bits little-endian), bits well inside the smooth region at tau = 1
    z = np.array([[0.2, -0.2, -0.2], [-0.2, 0.2, 0.2], [-0.1, -0.3, 0.1]], "float32")
    gate.z.assign(z)
    before = keras.ops.convert_to_numpy(gate(x))
    assert (before > 1e-3).sum() > k                              # smooth: more than k experts in use
    for _ in range(25):                                           # tau = 0.5^25 < 1e-7 -> clipped at 1e-6
        gate(x, training=True)
    assert abs(float(keras.ops.convert_to_numpy(gate.temperature)) - 1e-6) < 1e-12
    after = keras.ops.convert_to_numpy(gate(x))
    assert set(np.flatnonzero(after)) == {1, 6, 4}
    np.testing.assert_allclose(after.sum(), 1.0, atol=1e-6)
    selectors = keras.ops.convert_to_numpy(gate.selectors(x))
    assert np.all((selectors == 0.0) | (selectors == 1.0))       # each selector is exactly one-hot


def test_per_example_gates_use_at_most_k_after_anneal(rng):
    x = inputs(rng, n=64)
    encoder = architectures.DSelectK(TASKS, num_experts=6, k=2, expert_units=(4,), anneal_rate=0.1,
                                     min_temperature=1e-7)
    for _ in range(8):
        encoder(x, training=True)
    for alpha in encoder.gate_weights(x).values():
        alpha = keras.ops.convert_to_numpy(alpha)
        assert np.all((alpha > 0).sum(axis=-1) <= 2)
        np.testing.assert_allclose(alpha.sum(axis=-1), 1.0, atol=1e-5)


def test_entropy_regularization_is_a_model_loss(rng):
    x = inputs(rng)
    encoder = architectures.DSelectK(["a", "b"], num_experts=4, k=2, expert_units=(4,), per_example=False,
                                     entropy_regularization=0.5)
    encoder(x)
    selectors = keras.ops.convert_to_numpy(encoder.gates["a"].selectors(x)).astype("float64")
    entropy_a = -(selectors * np.log(selectors + 1e-12)).sum()
    selectors = keras.ops.convert_to_numpy(encoder.gates["b"].selectors(x)).astype("float64")
    entropy_b = -(selectors * np.log(selectors + 1e-12)).sum()
    total = sum(float(keras.ops.convert_to_numpy(v)) for v in encoder.losses)
    np.testing.assert_allclose(total, 0.5 * (entropy_a + entropy_b), rtol=1e-5)


def test_dbmtl_fit_and_round_trip(rng, tmp_path):
    x = inputs(rng, n=32)
    model = make_model(architectures.DSelectK(TASKS, num_experts=4, k=2, expert_units=(8,), anneal_rate=0.99))
    assert_fits(model, x)
    loaded = assert_round_trip(model, x, tmp_path)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded.encoder.gates["a"].temperature),
                               keras.ops.convert_to_numpy(model.encoder.gates["a"].temperature))


def test_k_larger_than_experts_is_refused():
    with pytest.raises(ValueError, match="k <= num_experts"):
        architectures.DSelectK(TASKS, num_experts=2, k=3)
