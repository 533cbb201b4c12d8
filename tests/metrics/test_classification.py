"""ClassificationAccuracy against numpy."""

import numpy as np

from metric_helpers import result, roundtrip, update
from keras_dbmtl.metrics import ClassificationAccuracy


def test_accuracy_batches_reset_and_label_forms():
    rng = np.random.default_rng(5)
    xa, xb = rng.normal(size=(7, 4)).astype("float32"), rng.normal(size=(5, 4)).astype("float32")
    ya, yb = rng.integers(0, 4, 7), rng.integers(0, 4, 5)
    m = ClassificationAccuracy()
    update(m, ya, xa)
    update(m, np.eye(4, dtype="float32")[yb], xb)  # one-hot labels
    ref = 100.0 * np.mean(np.concatenate([xa.argmax(1) == ya, xb.argmax(1) == yb]))
    np.testing.assert_allclose(result(m), ref, rtol=1e-6)
    m.reset_state()
    update(m, yb[:, None].astype("float32"), xb, sample_weight=np.array([1, 1, 0, 1, 1], "float32"))
    keep = np.array([0, 1, 3, 4])
    np.testing.assert_allclose(result(m), 100.0 * np.mean(xb.argmax(1)[keep] == yb[keep]), rtol=1e-6)
    roundtrip(ClassificationAccuracy(percent=False))
