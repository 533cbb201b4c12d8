"""Task losses of the DB-MTL paper's experiments (Section 4), backend-neutral.

Every loss here is a ``keras.losses.Loss`` usable in ``compile(loss=...)`` on
TensorFlow, PyTorch and JAX, and works under ``jit``.

Masked losses (``SegmentationCrossEntropy``, ``DepthL1Loss``,
``NormalCosineLoss``) return, with the default ``"sum_over_batch_size"``
reduction, exactly

    sum over the valid elements of the batch of the per-element loss
    ---------------------------------------------------------------
               number of valid elements in the batch

i.e. the mean over the valid pixels of the *whole batch* (not the mean of
per-image means), and ``0`` (not NaN, with a zero gradient) when the batch has
no valid pixel.  This is how the reference implementation (LibMTL) computes
them.  To get this from Keras' reduction, ``call`` returns one value per
sample: ``B / N_valid * (sum of that sample's valid pixel losses)``, so that
the sum over the batch divided by ``B`` is the pixel mean.  Consequences:

- ``reduction=None``/``"none"`` returns those per-sample contributions (their
  mean is the batch loss); ``"sum"`` returns ``B`` times the batch loss.
- A per-sample ``sample_weight`` ``w_i`` gives
  ``sum_i w_i S_i / N_valid`` (Keras' "sum over batch size" semantics: the
  weights are not renormalised).
"""

import keras
from keras import ops

__all__ = [
    "SegmentationCrossEntropy",
    "DepthL1Loss",
    "NormalCosineLoss",
    "MSELoss",
    "ClassificationCrossEntropy",
]

_EPS_SQ = 1e-12  # squared-norm floor used when normalising vectors


def _reduce_non_batch(x):
    """Sum of ``x`` over every axis but the first (rank >= 1)."""
    rank = len(x.shape)
    if rank <= 1:
        return x
    return ops.sum(x, axis=tuple(range(1, rank)))


def _masked_per_sample(values, valid):
    """Per-sample contributions whose batch mean is the valid-element mean.

    ``values``: per-element losses (already zero where invalid), shape (B, ...).
    ``valid``: boolean mask of the same shape.
    """
    dtype = values.dtype
    per_sample = _reduce_non_batch(values)
    n_valid = ops.sum(ops.cast(valid, dtype))
    batch = ops.cast(ops.shape(values)[0], dtype)
    # n_valid == 0 -> every value is 0 -> contribution 0 (no NaN).
    scale = batch / ops.maximum(n_valid, ops.cast(1.0, dtype))
    return per_sample * scale


def _squeeze_trailing_one(y, target_rank):
    """Drop a trailing axis of size 1 when ``y`` has rank ``target_rank + 1``."""
    if len(y.shape) == target_rank + 1 and y.shape[-1] == 1:
        return ops.squeeze(y, axis=-1)
    return y


def _unit(x):
    """L2-normalise along the last axis; zero vectors stay zero, no NaN grads."""
    sq = ops.sum(ops.square(x), axis=-1, keepdims=True)
    return x * ops.rsqrt(ops.maximum(sq, ops.cast(_EPS_SQ, x.dtype)))


def _sparse_nll(labels, logits, ignore_index):
    """Per-element negative log-likelihood and validity mask.

    ``logits``: (B, ..., C); ``labels``: (B, ...) or (B, ..., 1), integer or
    float.  Valid: ``0 <= label < C`` and ``label != ignore_index``.
    """
    num_classes = logits.shape[-1]
    labels = _squeeze_trailing_one(labels, len(logits.shape) - 1)
    labels = ops.cast(ops.round(ops.cast(labels, "float32")), "int32")
    valid = ops.logical_and(labels >= 0, labels < num_classes)
    if ignore_index is not None:
        valid = ops.logical_and(valid, labels != int(ignore_index))
    safe = ops.where(valid, labels, ops.zeros_like(labels))
    log_probs = ops.log_softmax(logits, axis=-1)
    picked = ops.take_along_axis(log_probs, ops.expand_dims(safe, -1), axis=-1)
    nll = -ops.squeeze(picked, axis=-1)
    nll = ops.where(valid, nll, ops.zeros_like(nll))
    return nll, valid


@keras.saving.register_keras_serializable(package="keras_dbmtl")
class SegmentationCrossEntropy(keras.losses.Loss):
    """Pixel-wise softmax cross-entropy with an ignore label.

    ``y_pred``: logits of shape (B, H, W, C).  ``y_true``: label map of shape
    (B, H, W) or (B, H, W, 1), integer or float.  Pixels whose label equals
    ``ignore_index`` (NYUv2: -1) or lies outside ``[0, C)`` are ignored.  The
    loss is the mean over the valid pixels of the batch, 0 if there is none
    (see the module docstring for the reduction semantics).
    """

    def __init__(self, ignore_index=-1, name="segmentation_cross_entropy",
                 reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.ignore_index = None if ignore_index is None else int(ignore_index)

    def call(self, y_true, y_pred):
        nll, valid = _sparse_nll(y_true, y_pred, self.ignore_index)
        return _masked_per_sample(nll, valid)

    def get_config(self):
        config = super().get_config()
        config.update({"ignore_index": self.ignore_index})
        return config


@keras.saving.register_keras_serializable(package="keras_dbmtl")
class DepthL1Loss(keras.losses.Loss):
    """L1 depth loss averaged over the valid pixels of the batch.

    ``y_true`` and ``y_pred`` of shape (B, H, W) or (B, H, W, 1) (either may
    carry the trailing 1).  A pixel is valid where the ground-truth depth is
    not 0 (0 = no measurement).  Mean over the batch's valid pixels, 0 if none.
    """

    def __init__(self, name="depth_l1", reduction="sum_over_batch_size",
                 dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true, y_pred):
        rank = min(len(y_true.shape), len(y_pred.shape))
        y_true = _squeeze_trailing_one(y_true, rank)
        y_pred = _squeeze_trailing_one(y_pred, rank)
        valid = ops.not_equal(y_true, 0)
        err = ops.abs(y_pred - y_true)
        err = ops.where(valid, err, ops.zeros_like(err))
        return _masked_per_sample(err, valid)


@keras.saving.register_keras_serializable(package="keras_dbmtl")
class NormalCosineLoss(keras.losses.Loss):
    """``1 - cos`` loss for surface normals over the valid pixels of the batch.

    ``y_pred``, ``y_true``: (B, H, W, 3).  The prediction is L2-normalised
    here (so the head may output raw vectors); the target is normalised too
    (a no-op for unit normals).  A pixel is valid unless its ground-truth
    normal is the zero vector.  Mean over the batch's valid pixels, 0 if none.
    """

    def __init__(self, name="normal_cosine", reduction="sum_over_batch_size",
                 dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true, y_pred):
        valid = ops.sum(ops.square(y_true), axis=-1) > 0
        cos = ops.sum(_unit(y_pred) * _unit(y_true), axis=-1)
        loss = 1.0 - cos
        loss = ops.where(valid, loss, ops.zeros_like(loss))
        return _masked_per_sample(loss, valid)


@keras.saving.register_keras_serializable(package="keras_dbmtl")
class MSELoss(keras.losses.Loss):
    """Mean squared error (QM9 targets), mean over all elements of the batch.

    Accepts ``y_true`` of shape (B,) with ``y_pred`` (B, 1) and vice versa.
    """

    def __init__(self, name="mse", reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true, y_pred):
        if len(y_true.shape) == len(y_pred.shape) + 1:
            y_true = _squeeze_trailing_one(y_true, len(y_pred.shape))
        elif len(y_pred.shape) == len(y_true.shape) + 1:
            y_pred = _squeeze_trailing_one(y_pred, len(y_true.shape))
        sq = ops.square(y_pred - y_true)
        rank = len(sq.shape)
        if rank <= 1:
            return sq
        return ops.mean(sq, axis=tuple(range(1, rank)))


@keras.saving.register_keras_serializable(package="keras_dbmtl")
class ClassificationCrossEntropy(keras.losses.Loss):
    """Softmax cross-entropy from logits for image classification (Office).

    ``y_pred``: logits (B, C).  ``y_true``: integer labels (B,) or (B, 1), or
    one-hot / soft labels (B, C) with C > 1.  With integer labels, labels equal
    to ``ignore_index`` (default: none) or outside ``[0, C)`` are ignored and
    the loss is the mean over the remaining samples (0 if none).
    """

    def __init__(self, ignore_index=None, name="cross_entropy",
                 reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.ignore_index = None if ignore_index is None else int(ignore_index)

    def call(self, y_true, y_pred):
        num_classes = y_pred.shape[-1]
        if (len(y_true.shape) == len(y_pred.shape) and num_classes != 1
                and y_true.shape[-1] == num_classes):
            log_probs = ops.log_softmax(y_pred, axis=-1)
            return -ops.sum(ops.cast(y_true, log_probs.dtype) * log_probs,
                            axis=-1)
        nll, valid = _sparse_nll(y_true, y_pred, self.ignore_index)
        return _masked_per_sample(nll, valid)

    def get_config(self):
        config = super().get_config()
        config.update({"ignore_index": self.ignore_index})
        return config
