"""examples/jax_optax_loop.py in its quick mode: DB-MTL through door 2 (keras_dbmtl.jax) with optax and lax.scan."""

import keras
import numpy as np
import pytest

from tests.examples import load_example

pytestmark = pytest.mark.skipif(keras.backend.backend() != "jax", reason="door 2: the JAX backend only")


def test_quick_run_trains_both_tasks():
    pytest.importorskip("optax")
    example = load_example("jax_optax_loop")
    result = example.main(["--quick"])["dbmtl"]
    losses = np.array(result["history"]["loss"])                     # (epochs, tasks)
    weights = np.array(result["history"]["weights"])
    assert losses.shape == (2, 2) and weights.shape == (2, 2)
    assert np.all(np.isfinite(losses)) and np.all(losses[-1] < losses[0])   # both tasks learn
    assert losses[0, 0] / losses[0, 1] > 1e4                         # dollars squared vs. a cross-entropy
    assert np.all(weights > 0) and result["test"]["spend_mae"] < 1000.0
