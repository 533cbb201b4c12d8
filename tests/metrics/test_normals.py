"""Normal angle metrics against numpy (float64 arccos reference)."""

import numpy as np
import pytest

from metric_helpers import result, roundtrip, update
from keras_dbmtl.metrics import NormalAngleMean, NormalAngleMedian, NormalWithinAngle

THRESHOLDS = (11.25, 22.5, 30.0)


def ref_angles(gt, pred):
    gt = gt.reshape(-1, 3).astype(np.float64)
    pred = pred.reshape(-1, 3).astype(np.float64)
    valid = (gt ** 2).sum(-1) > 0
    g = gt[valid] / np.linalg.norm(gt[valid], axis=-1, keepdims=True)
    p = pred[valid] / np.linalg.norm(pred[valid], axis=-1, keepdims=True)
    return np.degrees(np.arccos(np.clip((g * p).sum(-1), -1.0, 1.0)))


def _batch(rng, n, noise):
    gt = rng.normal(size=(n, 4, 5, 3))
    gt /= np.linalg.norm(gt, axis=-1, keepdims=True)
    pred = gt + rng.normal(scale=noise, size=gt.shape)  # not unit length
    gt[:, 0, :2] = 0.0  # invalid pixels
    return gt.astype("float32"), pred.astype("float32")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(8)
    a, b = _batch(rng, 3, 0.4), _batch(rng, 2, 0.8)  # 60 + 40 pixels, 10 invalid
    angles = np.concatenate([ref_angles(*a), ref_angles(*b)])
    # keep the thresholds and the coarse bin edges away from float32 noise
    for edge in THRESHOLDS + tuple(range(0, 181, 10)):
        assert np.min(np.abs(angles - edge)) > 1e-3
    return a, b, angles


def test_mean_within_and_fine_median(data):
    (ga, pa), (gb, pb), angles = data
    metrics = [NormalAngleMean(), NormalAngleMedian()] + [NormalWithinAngle(t) for t in THRESHOLDS]
    assert [m.name for m in metrics[2:]] == ["within_11_25", "within_22_5", "within_30"]
    for m in metrics:
        update(m, ga, pa)
        update(m, gb, pb)
    assert angles.size == 90 and np.median(angles) > 5  # even count
    np.testing.assert_allclose(result(metrics[0]), angles.mean(), atol=1e-4)
    bound = metrics[1].error_bound
    assert bound == pytest.approx(0.0025)
    assert abs(result(metrics[1]) - np.median(angles)) <= bound + 1e-4
    for m, t in zip(metrics[2:], THRESHOLDS):
        np.testing.assert_allclose(result(m), 100.0 * np.mean(angles < t), rtol=1e-6)
    for m in metrics:
        m.reset_state()
        assert result(m) == 0.0
        update(m, gb, pb)
    angles_b = ref_angles(gb, pb)
    np.testing.assert_allclose(result(metrics[0]), angles_b.mean(), atol=1e-4)
    assert abs(result(metrics[1]) - np.median(angles_b)) <= bound + 1e-4


@pytest.mark.parametrize("odd", [False, True])
def test_coarse_median_is_bin_midpoint_rule(data, odd):
    # 10-degree bins: the result is the midpoint rule computed here in numpy,
    # and within the bound (5 deg) of the exact median.
    (ga, pa), (gb, pb), angles = data
    m = NormalAngleMedian(num_bins=18)
    update(m, ga, pa)
    if odd:  # drop one valid pixel of the second batch -> odd count
        gb = gb.copy()
        gb[0, 3, 4] = 0.0
        angles = np.concatenate([ref_angles(ga, pa), ref_angles(gb, pb)])
    update(m, gb, pb)
    s = np.sort(angles)
    n = s.size
    assert (n % 2 == 1) == odd
    mids = (np.floor(s / 10.0) + 0.5) * 10.0
    expected = 0.5 * (mids[(n - 1) // 2] + mids[n // 2])
    np.testing.assert_allclose(result(m), expected, atol=1e-4)
    assert abs(result(m) - np.median(angles)) <= m.error_bound + 1e-6


def test_sample_weight_and_degenerate_inputs():
    rng = np.random.default_rng(9)
    gt, pred = _batch(rng, 2, 0.5)
    m = NormalAngleMean()
    update(m, gt, pred, sample_weight=np.array([0.0, 1.0], "float32"))
    np.testing.assert_allclose(result(m), ref_angles(gt[1:], pred[1:]).mean(), atol=1e-4)
    # exact matches and opposite vectors: 0 and 180 degrees
    g = np.tile(np.array([[0.0, 0.0, 1.0]], "float32"), (4, 1)).reshape(1, 2, 2, 3)
    p = g * np.array([1, 2, -1, -3], "float32").reshape(1, 2, 2, 1)
    mean, med = NormalAngleMean(), NormalAngleMedian()
    for x in (mean, med):
        update(x, g, p)
    np.testing.assert_allclose(result(mean), 90.0, atol=1e-4)
    np.testing.assert_allclose(result(med), 90.0, atol=1e-6)  # (0.0025 + 179.9975) / 2


def test_serialization():
    roundtrip(NormalAngleMean())
    assert roundtrip(NormalAngleMedian(num_bins=1800)).num_bins == 1800
    assert roundtrip(NormalWithinAngle(22.5)).name == "within_22_5"
