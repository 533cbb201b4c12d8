"""Depth-estimation metrics: absolute and relative error over valid pixels.

Definitions (LibMTL's ``DepthMetric``): with V the set of valid pixels (ground
truth != 0) seen since the last reset,

    abs_err = sum_{i in V} |pred_i - gt_i| / |V|
    rel_err = sum_{i in V} |pred_i - gt_i| / gt_i / |V|

Averaging: pixel-weighted over the whole epoch.  LibMTL stores each batch's
mean together with that batch's number of valid pixels and returns the
count-weighted average of the batch means, which is algebraically this same
pixel-weighted epoch mean (not a mean of per-batch or per-image means).
"""

import keras
from keras import ops

from keras_dbmtl.metrics import _utils


def _depth_pair(y_true, y_pred):
    rank = min(len(y_true.shape), len(y_pred.shape))
    y_true = _utils.squeeze_trailing_one(y_true, rank)
    y_pred = _utils.squeeze_trailing_one(y_pred, rank)
    y_true = ops.cast(y_true, "float32")
    y_pred = ops.cast(y_pred, "float32")
    return y_true, y_pred, ops.not_equal(y_true, 0)


@keras.saving.register_keras_serializable(package="keras_dbmtl")
class DepthAbsError(_utils.MeanOverValid):
    """Mean absolute depth error over the valid pixels of the epoch ("AErr").

    ``y_true``, ``y_pred``: (B, H, W) or (B, H, W, 1); ground truth 0 = no
    measurement (ignored); zero ``sample_weight`` also excludes a pixel/image.
    Lower is better.  Log key: ``<output>_abs_err``.
    """

    higher_is_better = False

    def __init__(self, name="abs_err", dtype=None):
        super().__init__(name=name, dtype=dtype)

    def _values(self, y_true, y_pred):
        y_true, y_pred, valid = _depth_pair(y_true, y_pred)
        return ops.abs(y_pred - y_true), valid


@keras.saving.register_keras_serializable(package="keras_dbmtl")
class DepthRelError(_utils.MeanOverValid):
    """Mean relative depth error |pred - gt| / gt over the valid pixels ("RErr").

    Same inputs and masking as :class:`DepthAbsError`.  Lower is better.
    Log key: ``<output>_rel_err``.
    """

    higher_is_better = False

    def __init__(self, name="rel_err", dtype=None):
        super().__init__(name=name, dtype=dtype)

    def _values(self, y_true, y_pred):
        y_true, y_pred, valid = _depth_pair(y_true, y_pred)
        safe_gt = ops.where(valid, y_true, ops.ones_like(y_true))
        return ops.abs(y_pred - y_true) / safe_gt, valid
