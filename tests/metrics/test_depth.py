"""DepthAbsError / DepthRelError against numpy (float64)."""

import numpy as np

from metric_helpers import result, roundtrip, update
from keras_dbmtl.metrics import DepthAbsError, DepthRelError


def _batch(rng, n, invalid_rows):
    gt = rng.uniform(0.5, 8.0, size=(n, 5, 6, 1)).astype("float32")
    gt[:, :invalid_rows] = 0.0  # no measurement
    pred = (gt + rng.normal(scale=0.7, size=gt.shape)).astype("float32")
    return gt, pred


def _ref(gts, preds):
    gt = np.concatenate([g.reshape(-1) for g in gts]).astype(np.float64)
    pred = np.concatenate([p.reshape(-1) for p in preds]).astype(np.float64)
    v = gt != 0
    return np.abs(pred - gt)[v].sum() / v.sum(), (np.abs(pred - gt)[v] / gt[v]).sum() / v.sum()


def test_pixel_weighted_over_batches_and_reset():
    rng = np.random.default_rng(2)
    (ga, pa), (gb, pb) = _batch(rng, 3, 1), _batch(rng, 2, 4)  # unequal valid counts
    ae, re_ = DepthAbsError(), DepthRelError()
    for m in (ae, re_):
        update(m, ga, pa)
        update(m, gb[..., 0], pb)  # (B,H,W) ground truth, (B,H,W,1) prediction
    ref_abs, ref_rel = _ref([ga, gb], [pa, pb])
    np.testing.assert_allclose(result(ae), ref_abs, rtol=1e-6)
    np.testing.assert_allclose(result(re_), ref_rel, rtol=1e-6)
    # pixel-weighted, not the mean of the two batch means
    batch_means = [_ref([ga], [pa])[0], _ref([gb], [pb])[0]]
    assert abs(np.mean(batch_means) - ref_abs) > 1e-3
    for m in (ae, re_):
        m.reset_state()
        assert result(m) == 0.0
        update(m, gb, pb)
    np.testing.assert_allclose(result(ae), _ref([gb], [pb])[0], rtol=1e-6)
    np.testing.assert_allclose(result(re_), _ref([gb], [pb])[1], rtol=1e-6)


def test_all_invalid_batch_and_sample_weight():
    rng = np.random.default_rng(3)
    ga, pa = _batch(rng, 3, 0)
    m = DepthAbsError()
    update(m, np.zeros_like(ga), pa)  # nothing valid: result stays 0, no NaN
    assert result(m) == 0.0
    update(m, ga, pa, sample_weight=np.array([0.0, 1.0, 1.0], "float32"))
    np.testing.assert_allclose(result(m), _ref([ga[1:]], [pa[1:]])[0], rtol=1e-6)


def test_serialization():
    roundtrip(DepthAbsError(name="ae"))
    roundtrip(DepthRelError())
