"""Mixed precision: DB-MTL under `mixed_bfloat16` tracks the float32 run; a LossScaleOptimizer's scale never
reaches the balancer (gradients are unscaled first), and its overflowing steps are skipped while its scale shrinks.

The `mixed_float16` + LossScaleOptimizer combination is the GPU recipe; here the loss-scaling path is tested under
the float32 policy (a power-of-two scale is exact there, so the run must match the unscaled one) and under
`mixed_float16` on the CPU.
"""

import keras
import numpy as np
import pytest

import keras_dbmtl
from tests.test_training_matches_reference import BATCH, LR, make_data, make_model

# Measured on the small model of the core tests (2 epochs, SGD(0.05), DB-MTL), mixed_bfloat16 against float32:
# the largest weight deviation relative to the largest float32 weight is 2.9e-4 (TensorFlow), 4.1e-4 (torch),
# 5.1e-4 (JAX); logged task weights and losses differ by at most 2.8e-3 (relative), DB-MTL's EMA by 2.7e-3 of its
# largest entry (bfloat16 keeps 8 significant bits: ~4e-3 per rounding). mixed_float16 with loss scaling: 4.7e-5
# to 8.4e-5. The tolerances leave a factor of about 4-6.
BFLOAT16_TOLERANCE = 2e-3
BFLOAT16_LOGS_TOLERANCE = 1e-2
FLOAT16_TOLERANCE = 5e-4


@pytest.fixture
def policy():
    yield keras.mixed_precision.set_global_policy
    keras.mixed_precision.set_global_policy("float32")


def train(X, Y, optimizer, epochs=2, balancer=None, callbacks=None):
    model = make_model(seed=2)
    model.compile(optimizer=optimizer, loss="mse", balancer=balancer or keras_dbmtl.balancers.DBMTL())
    history = model.fit(X, {t: y for t, y in zip(model.task_names, Y)}, batch_size=BATCH, epochs=epochs,
                        shuffle=False, verbose=0, callbacks=callbacks)
    return model, history


def weights(model):
    return [keras.ops.convert_to_numpy(v).astype("float64") for v in model.trainable_variables]


def relative_deviation(model, reference):
    scale = max(np.abs(w).max() for w in weights(reference))
    return max(np.abs(a - b).max() for a, b in zip(weights(model), weights(reference))) / scale


def test_dbmtl_under_mixed_bfloat16_tracks_float32(policy):
    X, Y = make_data(seed=7)
    reference, reference_history = train(X, Y, keras.optimizers.SGD(LR))
    policy("mixed_bfloat16")
    model, history = train(X, Y, keras.optimizers.SGD(LR))
    assert model.encoder.compute_dtype == "bfloat16" and model.heads["task0"].compute_dtype == "bfloat16"
    assert all(v.dtype == "float32" for v in model.trainable_variables)
    assert model.balancer.ema_gradients.dtype == "float32"
    assert history.history["skipped_steps"] == [0.0, 0.0]
    deviation = relative_deviation(model, reference)
    print(f"mixed_bfloat16 vs float32: relative weight deviation {deviation:.2e}")
    assert 0.0 < deviation < BFLOAT16_TOLERANCE
    for key in reference_history.history:
        if key.endswith("_weight") or key.endswith("loss"):
            np.testing.assert_allclose(history.history[key], reference_history.history[key],
                                       rtol=BFLOAT16_LOGS_TOLERANCE, err_msg=key)
    ema = keras.ops.convert_to_numpy(model.balancer.ema_gradients)
    reference_ema = keras.ops.convert_to_numpy(reference.balancer.ema_gradients)
    assert np.abs(ema - reference_ema).max() < BFLOAT16_LOGS_TOLERANCE * np.abs(reference_ema).max()


@pytest.mark.parametrize("balancer", ["dbmtl", "ew", "uw"])
def test_loss_scale_never_reaches_the_balancer(balancer):
    def make_balancer():
        return keras_dbmtl.balancers.get(balancer, **({} if balancer == "dbmtl" else {"loss_transform": "log"}))

    # float32 policy: scaling by 2**15 and unscaling is exact, so the run must match the plain optimizer's, and the
    # balancer (DB-MTL's EMA, the logged gradient norms) must see the unscaled task gradients.
    X, Y = make_data(seed=7)
    reference, reference_history = train(X, Y, keras.optimizers.SGD(LR), balancer=make_balancer())
    model, history = train(X, Y, keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(LR)),
                           balancer=make_balancer())
    assert float(keras.ops.convert_to_numpy(model.optimizer.dynamic_scale)) == 2.0**15
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 6
    for a, b in zip(weights(model), weights(reference)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    for key in reference_history.history:
        np.testing.assert_allclose(history.history[key], reference_history.history[key], rtol=1e-5, err_msg=key)
    if balancer == "dbmtl":
        np.testing.assert_allclose(keras.ops.convert_to_numpy(model.balancer.ema_gradients),
                                   keras.ops.convert_to_numpy(reference.balancer.ema_gradients), rtol=1e-5)


def test_loss_scale_overflow_skips_the_step_and_halves_the_scale():
    # A scale so large that the scaled gradients overflow (DB-MTL without the log transform: raw gradients of
    # ~1e2): the LossScaleOptimizer's usual start. Those steps are skipped (and counted) while the scale halves;
    # the batches log their finite losses, so TerminateOnNaN lets the run go on.
    X, Y = make_data(seed=7)
    X, Y = np.concatenate([X] * 4), [np.concatenate([y] * 4) for y in Y]   # 12 batches

    def balancer():
        return keras_dbmtl.balancers.DBMTL(loss_transform=None)

    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(1e-5), initial_scale=2.0**127)
    with pytest.warns(RuntimeWarning, match="overflowed"):
        model, history = train(X, Y, optimizer, epochs=1, balancer=balancer(),
                               callbacks=[keras.callbacks.TerminateOnNaN()])
    skipped = int(history.history["skipped_steps"][0])
    assert 1 <= skipped < 12
    assert np.isfinite(history.history["loss"][0])
    assert float(keras.ops.convert_to_numpy(model.optimizer.dynamic_scale)) == 2.0 ** (127 - skipped)
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 12 - skipped
    # Only the batches after the overflows were applied: the same state as the plain run on them.
    reference, _ = train(X[skipped * BATCH:], [y[skipped * BATCH:] for y in Y], keras.optimizers.SGD(1e-5),
                         epochs=1, balancer=balancer())
    for a, b in zip(weights(model), weights(reference)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model.balancer.ema_gradients),
                               keras.ops.convert_to_numpy(reference.balancer.ema_gradients), rtol=1e-5)


def test_loss_scale_grows_like_keras():
    # dynamic_growth_steps=2: the scale doubles after every 2 applied steps (6 steps: 1 -> 8), as in Keras.
    X, Y = make_data(seed=7)
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(LR), initial_scale=1.0,
                                                    dynamic_growth_steps=2)
    model, _ = train(X, Y, optimizer)
    assert float(keras.ops.convert_to_numpy(model.optimizer.dynamic_scale)) == 8.0
    assert int(keras.ops.convert_to_numpy(model.optimizer.step_counter)) == 0


def test_dbmtl_under_mixed_float16_with_loss_scaling_tracks_float32(policy):
    X, Y = make_data(seed=7)
    reference, _ = train(X, Y, keras.optimizers.SGD(LR))
    policy("mixed_float16")
    model, history = train(X, Y, keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(LR)))
    assert model.encoder.compute_dtype == "float16"
    deviation = relative_deviation(model, reference)
    print(f"mixed_float16 + LossScaleOptimizer vs float32: relative weight deviation {deviation:.2e}, "
          f"skipped {history.history['skipped_steps']}")
    assert deviation < FLOAT16_TOLERANCE
