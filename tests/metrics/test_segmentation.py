"""SegmentationMIoU / SegmentationPixelAccuracy against numpy (float64)."""

import numpy as np
import pytest

import keras

from metric_helpers import result, roundtrip, update
from keras_dbmtl.metrics import SegmentationMIoU, SegmentationPixelAccuracy

C = 5


def _batch(rng, n):
    logits = rng.normal(size=(n, 4, 6, C)).astype("float32")
    logits[..., 4] = -50.0                      # class 4 never predicted...
    labels = rng.integers(0, 3, size=(n, 4, 6))  # ...nor labelled; class 3
    labels[:, 0, :2] = -1                       # only ever predicted
    logits[:, 1, 1, 3] = 50.0
    return labels, logits


def ref_conf(labels, logits, ignore=-1):
    lab = np.asarray(labels).reshape(-1).astype(np.int64)
    pred = np.asarray(logits).reshape(-1, C).argmax(-1)
    valid = (lab >= 0) & (lab < C) & (lab != ignore)
    return np.bincount(C * lab[valid] + pred[valid], minlength=C * C).reshape(C, C).astype(np.float64)


def ref_miou(conf):
    inter = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - inter
    present = union > 0
    return 100.0 * np.mean(inter[present] / union[present])


def ref_pacc(conf):
    return 100.0 * np.trace(conf) / conf.sum()


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    a = _batch(rng, 3)
    b = _batch(rng, 2)
    return a, b


def test_miou_and_pacc_accumulate_over_batches_and_reset(data):
    (la, xa), (lb, xb) = data
    conf_all = ref_conf(np.concatenate([la, lb]), np.concatenate([xa, xb]))
    # the data really has an absent class (4) and a predicted-only class (3)
    union = conf_all.sum(0) + conf_all.sum(1) - np.diag(conf_all)
    assert union[4] == 0 and union[3] > 0 and conf_all[3, 3] == 0
    miou, pacc = SegmentationMIoU(C), SegmentationPixelAccuracy(C)
    for m in (miou, pacc):
        update(m, la, xa)
        update(m, lb[..., None].astype("float32"), xb)  # (B,H,W,1) float labels
    np.testing.assert_allclose(result(miou), ref_miou(conf_all), rtol=1e-6)
    np.testing.assert_allclose(result(pacc), ref_pacc(conf_all), rtol=1e-6)
    # absent class excluded: averaging over all 5 classes would differ
    iou_all = np.diag(conf_all) / np.maximum(union, 1)
    assert abs(result(miou) - 100 * iou_all.mean()) > 1.0
    # reset between epochs
    for m in (miou, pacc):
        m.reset_state()
        assert result(m) == 0.0
        update(m, lb, xb)
    conf_b = ref_conf(lb, xb)
    np.testing.assert_allclose(result(miou), ref_miou(conf_b), rtol=1e-6)
    np.testing.assert_allclose(result(pacc), ref_pacc(conf_b), rtol=1e-6)


def test_confusion_matrix_exact_and_ignore_label(data):
    (la, xa), _ = data
    la = np.where(la == -1, 255, la)
    la[0, 3, 3] = 9  # out of range: ignored as well
    m = SegmentationMIoU(C, ignore_index=255, percent=False)
    update(m, la, xa)
    ref = ref_conf(np.where(la >= C, -1, la), xa)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(m.confusion), ref)
    np.testing.assert_allclose(result(m), ref_miou(ref) / 100.0, rtol=1e-6)


def test_sample_weight_masks_images(data):
    (la, xa), _ = data
    m = SegmentationPixelAccuracy(C)
    update(m, la, xa, sample_weight=np.array([1.0, 0.0, 1.0], "float32"))
    ref = ref_conf(la[[0, 2]], xa[[0, 2]])
    np.testing.assert_allclose(result(m), ref_pacc(ref), rtol=1e-6)


def test_serialization():
    clone = roundtrip(SegmentationMIoU(13, ignore_index=-1, name="m"))
    assert clone.num_classes == 13 and clone.name == "m"
    roundtrip(SegmentationPixelAccuracy(7, ignore_index=None, percent=False))
