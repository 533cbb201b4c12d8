"""Shared pieces of the stateful metrics: masks, exact counters, compensated sums.

All state has a fixed shape and every update is branch-free, so the metrics
run inside jit-compiled train/test steps (JAX, TensorFlow XLA).  Counts are
kept in int32 (exact up to 2**31 - 1 elements per epoch); sums in float32
with Kahan compensation across ``update_state`` calls, so the error of a sum
does not grow with the number of batches.
"""

import keras
from keras import ops


def squeeze_trailing_one(y, target_rank):
    """Drop a trailing axis of size 1 when ``y`` has rank ``target_rank + 1``."""
    if len(y.shape) == target_rank + 1 and y.shape[-1] == 1:
        return ops.squeeze(y, axis=-1)
    return y


def weight_mask(sample_weight, like):
    """Boolean mask (shape of ``like``) that is True where sample_weight != 0.

    ``sample_weight`` may have the shape of ``like``, a prefix of it (e.g. (B,)
    for per-image weights) or carry an extra trailing axis of size 1.  The
    metrics use sample weights as a mask (weight 0 = excluded), never as
    multiplicities, so their counters stay exact integers.
    """
    if sample_weight is None:
        return None
    sw = ops.convert_to_tensor(sample_weight)
    sw = squeeze_trailing_one(sw, len(like.shape))
    while len(sw.shape) < len(like.shape):
        sw = ops.expand_dims(sw, -1)
    return ops.broadcast_to(ops.not_equal(sw, 0), ops.shape(like))


def and_mask(valid, mask):
    return valid if mask is None else ops.logical_and(valid, mask)


def flat(x):
    return ops.reshape(x, (-1,))


def count_true(mask):
    return ops.sum(ops.cast(mask, "int32"))


def histogram(ids, valid, num_bins):
    """Exact int32 counts of ``ids`` (1-D, in [0, num_bins)) where ``valid``.

    Invalid entries go to an extra bin that is dropped, so the shape is static.
    """
    ids = ops.where(valid, ops.cast(ids, "int32"), num_bins)
    ones = ops.ones_like(ids)
    counts = ops.segment_sum(ones, ids, num_segments=num_bins + 1)
    return ops.cast(counts[:num_bins], "int32")


class MeanOverValid(keras.metrics.Metric):
    """Base: sum of a per-element value over valid elements / their number.

    Subclasses implement ``_values(y_true, y_pred) -> (values, valid)`` with
    ``values`` float and ``valid`` boolean of the same shape.  ``result`` is
    ``scale * sum / count`` over every element seen since the last reset (a
    pixel-weighted mean over the epoch), 0 before any valid element.
    """

    higher_is_better = False

    def __init__(self, name=None, dtype=None, scale=1.0):
        super().__init__(name=name, dtype=dtype)
        self.scale = float(scale)
        self.total = self.add_variable(
            shape=(), initializer="zeros", dtype="float32", name="total")
        self.compensation = self.add_variable(
            shape=(), initializer="zeros", dtype="float32", name="compensation")
        self.count = self.add_variable(
            shape=(), initializer="zeros", dtype="int32", name="count")

    def _values(self, y_true, y_pred):
        raise NotImplementedError

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = ops.convert_to_tensor(y_true)
        y_pred = ops.convert_to_tensor(y_pred)
        values, valid = self._values(y_true, y_pred)
        valid = and_mask(valid, weight_mask(sample_weight, valid))
        values = ops.cast(values, "float32")
        values = ops.where(valid, values, ops.zeros_like(values))
        kahan_add(self.total, self.compensation, ops.sum(values))
        self.count.assign(self.count + count_true(valid))

    def result(self):
        count = ops.cast(self.count, "float32")
        mean = self.total / ops.maximum(count, 1.0)
        return ops.where(self.count > 0, mean * self.scale, 0.0)


def kahan_add(total, compensation, value):
    """total += value with Kahan compensation kept in ``compensation``."""
    total_value = ops.convert_to_tensor(total)
    y = ops.cast(value, "float32") - compensation
    t = total_value + y
    compensation.assign((t - total_value) - y)
    total.assign(t)
