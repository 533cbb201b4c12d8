"""Semantic-segmentation metrics (mIoU, pixel accuracy) from a confusion matrix.

Both metrics accumulate an exact int32 confusion matrix ``conf[true, pred]``
over every ``update_state`` call of an epoch (the reference implementation's
definition), so the epoch value does not depend on how the data was batched.
"""

import keras
from keras import ops

from keras_dbmtl.metrics import _utils


class _ConfusionMatrixMetric(keras.metrics.Metric):
    """Accumulates ``conf[t, p]`` = number of valid pixels of class t predicted p.

    ``y_pred``: logits or probabilities (B, H, W, C) (arg-maxed), ``y_true``:
    label map (B, H, W) or (B, H, W, 1), integer or float.  Pixels whose label
    equals ``ignore_index`` or lies outside ``[0, num_classes)`` are ignored,
    as are pixels with a zero ``sample_weight`` (weights act as a mask).
    """

    higher_is_better = True

    def __init__(self, num_classes, ignore_index=-1, percent=True, name=None,
                 dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.num_classes = int(num_classes)
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.percent = bool(percent)
        self.confusion = self.add_variable(
            shape=(self.num_classes, self.num_classes), initializer="zeros",
            dtype="int32", name="confusion_matrix")

    def update_state(self, y_true, y_pred, sample_weight=None):
        c = self.num_classes
        y_true = ops.convert_to_tensor(y_true)
        y_pred = ops.convert_to_tensor(y_pred)
        labels = _utils.squeeze_trailing_one(y_true, len(y_pred.shape) - 1)
        labels = ops.cast(ops.round(ops.cast(labels, "float32")), "int32")
        valid = ops.logical_and(labels >= 0, labels < c)
        if self.ignore_index is not None:
            valid = ops.logical_and(valid, labels != self.ignore_index)
        valid = _utils.and_mask(valid, _utils.weight_mask(sample_weight, labels))
        pred = ops.cast(ops.argmax(y_pred, axis=-1), "int32")
        ids = _utils.flat(labels) * c + _utils.flat(pred)
        counts = _utils.histogram(ids, _utils.flat(valid), c * c)
        self.confusion.assign(self.confusion + ops.reshape(counts, (c, c)))

    def _conf(self):
        return ops.cast(self.confusion, "float32")

    def get_config(self):
        config = super().get_config()
        config.update({"num_classes": self.num_classes,
                       "ignore_index": self.ignore_index,
                       "percent": self.percent})
        return config


@keras.saving.register_keras_serializable(package="keras_dbmtl")
class SegmentationMIoU(_ConfusionMatrixMetric):
    """Mean intersection-over-union over the epoch (Table 1/2 "mIoU").

    IoU_c = conf[c, c] / (sum_p conf[c, p] + sum_t conf[t, c] - conf[c, c]),
    averaged over the classes that occur in the target or the prediction at
    least once since the last reset (classes with an empty union are left
    out instead of making the mean NaN).  In percent by default.  Log key:
    ``<output>_miou``.
    """

    def __init__(self, num_classes, ignore_index=-1, percent=True, name="miou",
                 dtype=None):
        super().__init__(num_classes, ignore_index=ignore_index,
                         percent=percent, name=name, dtype=dtype)

    def result(self):
        conf = self._conf()
        inter = ops.diagonal(conf)
        union = ops.sum(conf, axis=0) + ops.sum(conf, axis=1) - inter
        present = union > 0
        iou = inter / ops.maximum(union, 1.0)
        n_present = ops.sum(ops.cast(present, "float32"))
        miou = ops.sum(ops.where(present, iou, 0.0)) / ops.maximum(n_present, 1.0)
        return miou * (100.0 if self.percent else 1.0)


@keras.saving.register_keras_serializable(package="keras_dbmtl")
class SegmentationPixelAccuracy(_ConfusionMatrixMetric):
    """Pixel accuracy over the epoch (Table 1/2 "PAcc"): trace(conf) / sum(conf).

    The fraction of valid pixels whose arg-max prediction is right (the
    reference implementation's "pixAcc"), in percent by default; 0 before any
    valid pixel.  Log key: ``<output>_pixel_acc``.
    """

    def __init__(self, num_classes, ignore_index=-1, percent=True,
                 name="pixel_acc", dtype=None):
        super().__init__(num_classes, ignore_index=ignore_index,
                         percent=percent, name=name, dtype=dtype)

    def result(self):
        conf = self._conf()
        total = ops.sum(conf)
        acc = ops.sum(ops.diagonal(conf)) / ops.maximum(total, 1.0)
        return acc * (100.0 if self.percent else 1.0)
