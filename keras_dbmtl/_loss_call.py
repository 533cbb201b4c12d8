"""One task loss, called the way `keras.losses.Loss.__call__` computes it, without its per-call wrapping on torch.

On the torch backend the train step runs eagerly and `Loss.__call__` (name scope, structure maps, mask merging,
weighted reduction) costs more than the loss itself (about 4x for an MSE of a (64, 1) batch). For the common case
(a function loss or a `LossFunctionWrapper` loss, mean reduction, no sample weight, no Keras mask) this computes
the same value with the same operations: the loss function on the inputs converted to the loss's dtype, then
sum / number of elements. Everything else, and every other backend (traced once), goes through `Loss.__call__`.
"""

import math

from keras import ops
from keras.src.backend import get_keras_mask
from keras.src.losses.losses import LossFunctionWrapper

from keras_dbmtl import gradients as gradient_backends


def _plain_tensor(value):
    return not isinstance(value, (dict, list, tuple))


def task_loss(loss, y_true, y_pred, sample_weight=None):
    """`loss(y_true, y_pred, sample_weight=sample_weight)`, the same value."""
    direct = (
        gradient_backends.branches_in_python()        # an eager step (torch), where the wrapping costs
        and sample_weight is None
        and isinstance(loss, LossFunctionWrapper) and type(loss).call is LossFunctionWrapper.call
        and loss.reduction == "sum_over_batch_size"
        and _plain_tensor(y_true) and _plain_tensor(y_pred)
        and get_keras_mask(y_pred) is None
    )
    if not direct:
        return loss(y_true, y_pred, sample_weight=sample_weight)
    values = loss.call(ops.convert_to_tensor(y_true, dtype=loss.dtype),
                       ops.convert_to_tensor(y_pred, dtype=loss.dtype))
    if get_keras_mask(values) is not None:
        return loss(y_true, y_pred, sample_weight=sample_weight)
    values = ops.convert_to_tensor(values, dtype=loss.dtype)
    if tuple(values.shape) in ((), (0,)):
        return values
    return ops.sum(values) / float(math.prod(values.shape))
