"""DenormalizedMAE against numpy (Table 3 units)."""

import numpy as np

from metric_helpers import result, roundtrip, update
from keras_dbmtl.metrics import DenormalizedMAE


def test_denormalised_mae_in_mev_over_batches():
    rng = np.random.default_rng(6)
    mean, std = -6.5, 0.6  # eV
    ya, yb = rng.normal(size=(9, 1)).astype("float32"), rng.normal(size=(4,)).astype("float32")
    pa, pb = rng.normal(size=(9, 1)).astype("float32"), rng.normal(size=(4, 1)).astype("float32")
    m = DenormalizedMAE(mean=mean, std=std, unit_scale=1000.0)
    update(m, ya, pa)
    update(m, yb, pb)
    y = np.concatenate([ya[:, 0], yb]).astype(np.float64) * std + mean
    p = np.concatenate([pa[:, 0], pb[:, 0]]).astype(np.float64) * std + mean
    np.testing.assert_allclose(result(m), 1000.0 * np.mean(np.abs(p - y)), rtol=1e-5)
    m.reset_state()
    assert result(m) == 0.0
    update(m, yb, pb)
    np.testing.assert_allclose(result(m), 1000.0 * std * np.mean(np.abs(pb[:, 0] - yb)), rtol=1e-5)


def test_per_column_std():
    rng = np.random.default_rng(7)
    y, p = rng.normal(size=(6, 3)).astype("float32"), rng.normal(size=(6, 3)).astype("float32")
    std = np.array([0.5, 2.0, 10.0])
    m = DenormalizedMAE(std=std)
    update(m, y, p)
    np.testing.assert_allclose(result(m), np.mean(np.abs(p - y) * std), rtol=1e-5)
    clone = roundtrip(m)
    assert clone.std == [0.5, 2.0, 10.0]
