"""Classification accuracy (Office-31 / Office-Home, Table 4)."""

import keras
from keras import ops

from keras_dbmtl.metrics import _utils


@keras.saving.register_keras_serializable(package="keras_dbmtl")
class ClassificationAccuracy(keras.metrics.Metric):
    """Top-1 accuracy over the epoch, in percent by default (Table 4).

    ``y_pred``: logits or probabilities (B, C).  ``y_true``: integer labels
    (B,) or (B, 1), or one-hot (B, C).  Exact int32 counts; samples with a
    zero ``sample_weight`` are left out (weights act as a mask).  Higher is
    better.  Log key: ``<output>_accuracy``.
    """

    higher_is_better = True

    def __init__(self, percent=True, name="accuracy", dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.percent = bool(percent)
        self.correct = self.add_variable(
            shape=(), initializer="zeros", dtype="int32", name="correct")
        self.count = self.add_variable(
            shape=(), initializer="zeros", dtype="int32", name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = ops.convert_to_tensor(y_true)
        y_pred = ops.convert_to_tensor(y_pred)
        num_classes = y_pred.shape[-1]
        if (len(y_true.shape) == len(y_pred.shape) and num_classes != 1
                and y_true.shape[-1] == num_classes):
            labels = ops.cast(ops.argmax(y_true, axis=-1), "int32")
        else:
            labels = _utils.squeeze_trailing_one(y_true, len(y_pred.shape) - 1)
            labels = ops.cast(ops.round(ops.cast(labels, "float32")), "int32")
        pred = ops.cast(ops.argmax(y_pred, axis=-1), "int32")
        valid = ops.ones_like(labels, dtype="bool")
        valid = _utils.and_mask(valid, _utils.weight_mask(sample_weight, labels))
        hit = ops.logical_and(valid, ops.equal(labels, pred))
        self.correct.assign(self.correct + _utils.count_true(hit))
        self.count.assign(self.count + _utils.count_true(valid))

    def result(self):
        acc = ops.cast(self.correct, "float32") / ops.maximum(
            ops.cast(self.count, "float32"), 1.0)
        return acc * (100.0 if self.percent else 1.0)

    def get_config(self):
        config = super().get_config()
        config.update({"percent": self.percent})
        return config
