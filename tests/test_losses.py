"""keras_dbmtl.losses against float64 numpy references (values and gradients)."""

import numpy as np
import pytest

import keras
from keras import ops

from keras_dbmtl import losses

RNG = np.random.default_rng(0)


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x), dtype=np.float64)


def _value_and_grad(loss_fn, y_true, y_pred):
    """Loss value and d loss / d y_pred on the running backend."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.Variable(y_pred)
        with tf.GradientTape() as tape:
            value = loss_fn(y_true, x)
        grad = tape.gradient(value, x)
    elif backend == "torch":
        import torch

        x = torch.tensor(y_pred, requires_grad=True)
        value = loss_fn(y_true, x)
        value.backward()
        grad = x.grad
    elif backend == "jax":
        import jax

        value, grad = jax.jit(jax.value_and_grad(
            lambda p: loss_fn(y_true, p)))(ops.convert_to_tensor(y_pred))
    else:  # pragma: no cover
        pytest.skip(f"no gradient helper for {backend}")
    return float(_np(value)), _np(grad)


def _eval(loss_fn, y_true, y_pred, sample_weight=None):
    """loss_fn(y_true, y_pred, sample_weight) as float64 numpy (jitted on JAX)."""
    if keras.backend.backend() == "jax":
        import jax

        return _np(jax.jit(loss_fn)(y_true, y_pred, sample_weight))
    return _np(loss_fn(y_true, y_pred, sample_weight))


# ----------------------------------------------------------------- references
def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def ref_ce(labels, logits, ignore=-1):
    labels = labels.reshape(logits.shape[:-1]).astype(np.int64)
    c = logits.shape[-1]
    valid = (labels != ignore) & (labels >= 0) & (labels < c)
    p = _softmax(logits.astype(np.float64))
    n = valid.sum()
    safe = np.where(valid, labels, 0)
    logp = np.log(np.take_along_axis(p, safe[..., None], -1)[..., 0])
    value = -(logp * valid).sum() / max(n, 1)
    onehot = np.eye(c)[safe]
    grad = (p - onehot) * valid[..., None] / max(n, 1)
    return value, grad


def ref_l1(gt, pred):
    gt = gt.reshape(pred.shape).astype(np.float64)
    valid = gt != 0
    n = valid.sum()
    value = (np.abs(pred - gt) * valid).sum() / max(n, 1)
    grad = np.sign(pred - gt) * valid / max(n, 1)
    return value, grad


def ref_cosine(gt, pred):
    gt = gt.astype(np.float64)
    pred = pred.astype(np.float64)
    valid = (gt ** 2).sum(-1) > 0
    n = valid.sum()
    pn = np.linalg.norm(pred, axis=-1, keepdims=True)
    ph = pred / pn
    gh = gt / np.maximum(np.linalg.norm(gt, axis=-1, keepdims=True), 1e-300)
    cos = (ph * gh).sum(-1)
    value = ((1 - cos) * valid).sum() / max(n, 1)
    # d(1 - p.g/|p|)/dp = -(g_hat - cos p_hat) / |p|
    grad = -(gh - cos[..., None] * ph) / pn * valid[..., None] / max(n, 1)
    return value, grad


# ---------------------------------------------------------------------- tests
def _seg_batch():
    logits = RNG.normal(size=(3, 4, 5, 4)).astype("float32")
    labels = RNG.integers(0, 4, size=(3, 4, 5)).astype("int32")
    labels[0, :3] = -1          # image 0: mostly ignored
    labels[1, 0, 0] = -1
    labels[2] = -1              # image 2: nothing valid
    labels[2, 1, 1] = 3
    return labels, logits


@pytest.mark.parametrize("label_form", ["int_bhw", "float_bhw1"])
def test_segmentation_ce_value_and_grad(label_form):
    labels, logits = _seg_batch()
    y_true = labels if label_form == "int_bhw" else labels[..., None].astype("float32")
    loss = losses.SegmentationCrossEntropy(ignore_index=-1)
    value, grad = _value_and_grad(loss, y_true, logits)
    ref_value, ref_grad = ref_ce(labels, logits)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-6)
    # Pixel mean of the batch, not the mean of per-image means.
    valid = labels >= 0
    nll = -np.log(np.take_along_axis(_softmax(logits.astype(np.float64)),
                                     np.where(valid, labels, 0)[..., None], -1)[..., 0])
    per_image = [(nll[i] * valid[i]).sum() / valid[i].sum() for i in range(3)]
    assert abs(np.mean(per_image) - ref_value) > 1e-2
    assert abs(value - np.mean(per_image)) > 1e-2


def test_segmentation_ce_out_of_range_and_other_ignore_label():
    labels, logits = _seg_batch()
    labels = np.where(labels == -1, 255, labels)
    labels[1, 2, 2] = 7  # out of range: ignored too
    loss = losses.SegmentationCrossEntropy(ignore_index=255)
    ref_labels = np.where((labels == 255) | (labels >= 4), -1, labels)
    value = float(_eval(loss, labels, logits))
    np.testing.assert_allclose(value, ref_ce(ref_labels, logits)[0], rtol=1e-5)


def test_depth_l1_value_and_grad_and_shapes():
    gt = RNG.uniform(0.5, 5.0, size=(3, 4, 5, 1)).astype("float32")
    gt[0, :2] = 0.0
    gt[1, 1, 1] = 0.0
    pred = RNG.uniform(0.5, 5.0, size=(3, 4, 5, 1)).astype("float32")
    loss = losses.DepthL1Loss()
    value, grad = _value_and_grad(loss, gt, pred)
    ref_value, ref_grad = ref_l1(gt, pred)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-7)
    # (B, H, W) ground truth with a (B, H, W, 1) prediction and vice versa.
    np.testing.assert_allclose(float(_eval(loss, gt[..., 0], pred)), ref_value, rtol=1e-5)
    np.testing.assert_allclose(float(_eval(loss, gt, pred[..., 0])), ref_value, rtol=1e-5)


def test_normal_cosine_value_and_grad():
    gt = RNG.normal(size=(2, 3, 4, 3)).astype("float32")
    gt /= np.linalg.norm(gt, axis=-1, keepdims=True)
    gt[0, 0] = 0.0
    gt[1, 2, 3] = 0.0
    pred = RNG.normal(size=(2, 3, 4, 3)).astype("float32") * 3.0  # not unit
    loss = losses.NormalCosineLoss()
    value, grad = _value_and_grad(loss, gt, pred)
    ref_value, ref_grad = ref_cosine(gt, pred)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-6)


@pytest.mark.parametrize("name", ["seg", "depth", "normal", "cls"])
def test_no_valid_pixel_gives_zero_and_finite_grad(name):
    if name == "seg":
        fn, y_true = losses.SegmentationCrossEntropy(), -np.ones((2, 3, 3), "float32")
        y_pred = RNG.normal(size=(2, 3, 3, 4)).astype("float32")
    elif name == "depth":
        fn, y_true = losses.DepthL1Loss(), np.zeros((2, 3, 3, 1), "float32")
        y_pred = RNG.normal(size=(2, 3, 3, 1)).astype("float32")
    elif name == "normal":
        fn, y_true = losses.NormalCosineLoss(), np.zeros((2, 3, 3, 3), "float32")
        y_pred = np.zeros((2, 3, 3, 3), "float32")  # zero predictions too
    else:
        fn, y_true = losses.ClassificationCrossEntropy(ignore_index=-1), -np.ones((4,), "float32")
        y_pred = RNG.normal(size=(4, 5)).astype("float32")
    value, grad = _value_and_grad(fn, y_true, y_pred)
    assert value == 0.0
    assert np.all(np.isfinite(grad)) and np.all(grad == 0.0)


def test_mse_value_and_grad():
    y = RNG.normal(size=(6,)).astype("float32")
    p = RNG.normal(size=(6, 1)).astype("float32")
    value, grad = _value_and_grad(losses.MSELoss(), y, p)
    d = p[:, 0].astype(np.float64) - y
    np.testing.assert_allclose(value, np.mean(d ** 2), rtol=1e-6)
    np.testing.assert_allclose(grad[:, 0], 2 * d / 6, atol=1e-7)


def test_classification_ce_sparse_and_onehot():
    logits = RNG.normal(size=(5, 7)).astype("float32")
    labels = RNG.integers(0, 7, size=(5,))
    loss = losses.ClassificationCrossEntropy()
    value, grad = _value_and_grad(loss, labels[:, None].astype("float32"), logits)
    ref_value, ref_grad = ref_ce(labels, logits)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-6)
    onehot = np.eye(7, dtype="float32")[labels]
    np.testing.assert_allclose(float(_eval(loss, onehot, logits)), ref_value, rtol=1e-5)


def test_sample_weight_and_reduction_semantics():
    gt = RNG.uniform(1, 2, size=(2, 3, 3, 1)).astype("float32")
    gt[0, 0] = 0.0
    pred = RNG.uniform(1, 2, size=(2, 3, 3, 1)).astype("float32")
    err = np.abs(pred.astype(np.float64) - gt) * (gt != 0)
    n = (gt != 0).sum()
    w = np.array([2.0, 0.5], "float32")
    value = float(_eval(losses.DepthL1Loss(), gt, pred, w))
    expected = (w[0] * err[0].sum() + w[1] * err[1].sum()) / n
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    per_sample = _eval(losses.DepthL1Loss(reduction=None), gt, pred)
    np.testing.assert_allclose(per_sample.mean(), err.sum() / n, rtol=1e-5)


@pytest.mark.parametrize("cls,kwargs", [
    (losses.SegmentationCrossEntropy, {"ignore_index": 255}),
    (losses.DepthL1Loss, {}),
    (losses.NormalCosineLoss, {}),
    (losses.MSELoss, {}),
    (losses.ClassificationCrossEntropy, {"ignore_index": -1}),
])
def test_serialization_round_trip(cls, kwargs):
    obj = cls(**kwargs)
    clone = keras.losses.deserialize(keras.losses.serialize(obj))
    assert type(clone) is cls
    assert clone.get_config() == obj.get_config()
