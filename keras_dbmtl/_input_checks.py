"""Checks of what a user hands to a MultiTaskModel, each raising an error that names the mistake and the fix.

Kept out of the train step: they run on shapes and Python objects, once per trace (or once per `fit`).
"""

import keras

from keras_dbmtl import losses as dbmtl_losses

EMPTY_DATA = (
    "The {what} data yielded no batch: the dataset is empty. Check the data source (a filter that removed "
    "every sample, a wrong path or split, drop_remainder=True with fewer samples than one batch)."
)

# How a loss reads its target, by the name of the Keras loss function it wraps.
_DENSE_FUNCTIONS = {
    "mean_squared_error", "mean_absolute_error", "mean_absolute_percentage_error",
    "mean_squared_logarithmic_error", "huber", "log_cosh", "binary_crossentropy", "binary_focal_crossentropy",
    "categorical_crossentropy", "categorical_focal_crossentropy", "kl_divergence", "poisson",
    "cosine_similarity", "hinge", "squared_hinge", "categorical_hinge",
}
_SPARSE_FUNCTIONS = {"sparse_categorical_crossentropy"}


def label_format(loss):
    """"dense" (target shaped like the output), "sparse" (class indices: the output's shape without its last
    axis), "either", or None (a custom loss: its target is not checked)."""
    if isinstance(loss, dbmtl_losses.SegmentationCrossEntropy):
        return "sparse"
    if isinstance(loss, dbmtl_losses.ClassificationCrossEntropy):
        return "either"
    if isinstance(loss, (dbmtl_losses.DepthL1Loss, dbmtl_losses.NormalCosineLoss, dbmtl_losses.MSELoss)):
        return "dense"
    name = getattr(getattr(loss, "fn", None), "__name__", None)
    if name in _DENSE_FUNCTIONS:
        return "dense"
    if name in _SPARSE_FUNCTIONS:
        return "sparse"
    return None


def _same(a, b):
    return len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b))


def _accepted_shapes(output, fmt):
    """The target shapes (without the batch axis) a loss of this format reads correctly for this output."""
    dense = [output]
    if output and output[-1] == 1:
        dense.append(output[:-1])                       # (N,) for a (N, 1) output
    if not output:
        dense.append((1,))                              # (N, 1) for a (N,) output
    sparse = [output[:-1], output[:-1] + (1,)] if output else []
    return {"dense": dense, "sparse": sparse, "either": dense + sparse}[fmt]


def check_target_shape(task, target, output_shape, loss):
    """A target whose shape the task's loss would broadcast against its head's output (a (N, 2) target for a
    one-output head, (N, 1) for a three-output head with mse) raises a ValueError naming the task."""
    fmt = label_format(loss)
    shape = getattr(target, "shape", None)
    if fmt is None or output_shape is None or shape is None:
        return
    try:
        shape = tuple(None if d is None else int(d) for d in shape)
    except TypeError:                                   # unknown rank (a tf.data element of unknown shape)
        return
    output = tuple(output_shape[1:])
    accepted = _accepted_shapes(output, fmt)
    if any(_same(shape[1:], a) for a in accepted):
        return

    def show(s):
        return "(" + ", ".join(["N"] + ["?" if d is None else str(d) for d in s]) + ("," if not s else "") + ")"

    name = getattr(getattr(loss, "fn", None), "__name__", None) or type(loss).__name__
    raise ValueError(
        f"The target of task {task!r} has shape {show(shape[1:])} but its head outputs {show(output)}; with the "
        f"loss {name} it must have shape {' or '.join(show(a) for a in accepted)}. The loss would otherwise "
        "broadcast the two silently. Give this task a target of its head's output shape (or change the head)."
    )


def check_target_present(task, target):
    if target is None:
        raise ValueError(
            f"The target of task {task!r} is None. Every task needs a target array in every batch; for samples "
            f"without a label of this task, give any value and a sample_weight of 0 for {task!r} "
            "(sample_weight={task: weights})."
        )


def check_per_task_inputs(inputs, task_names, describe):
    """`per_task_inputs=True`: inputs (or their shapes) must be a dict with one entry per task."""
    is_dict = isinstance(inputs, dict) or (hasattr(inputs, "keys") and hasattr(inputs, "items"))
    if not is_dict:
        raise ValueError(
            "This MultiTaskModel has per_task_inputs=True: x must be a dict mapping each task "
            f"({task_names}) to its own batch; received {describe(inputs)}. Use per_task_inputs=False for one "
            "input shared by every task."
        )
    missing = [t for t in task_names if t not in inputs]
    unknown = sorted(set(inputs) - set(task_names))
    if missing or unknown:
        raise ValueError(
            "This MultiTaskModel has per_task_inputs=True: x must have one entry per task "
            f"({task_names}); " + (f"missing task(s) {missing}" if missing else "")
            + ("; " if missing and unknown else "") + (f"unknown task(s) {unknown}" if unknown else "") + "."
        )


def describe(value):
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"a {type(value).__name__} of shape {tuple(shape)}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)} entries"
    return f"{type(value).__name__}"


def num_samples(data):
    """The number of samples of array-like data (numpy, tensors, dicts/lists of them), or None if unknown."""
    leaves = keras.tree.flatten(data) if data is not None else []
    lengths = [int(leaf.shape[0]) for leaf in leaves if getattr(leaf, "shape", None) and leaf.shape[0] is not None]
    return min(lengths) if lengths and len(lengths) == len(leaves) else None


class NonEmpty:
    """A Keras epoch iterator, as Keras' symbolic build reads it (its first batch), with a clear error when the
    data are empty instead of a bare StopIteration (JAX) or "Unable to automatically build the model" (torch)."""

    def __init__(self, iterator):
        self._iterator = iterator

    def __iter__(self):
        for begin, end, data in self._iterator:
            yield begin, end, (data if isinstance(data, (list, tuple)) else _NonEmptyBatches(data))
        raise ValueError(EMPTY_DATA.format(what="training or evaluation"))


class _NonEmptyBatches:
    def __init__(self, iterator):
        self._iterator = iterator

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._iterator)
        except StopIteration:
            raise ValueError(EMPTY_DATA.format(what="training or evaluation")) from None


class EmptyDataCheck(keras.callbacks.Callback):
    """An epoch of `fit` that saw no batch (an empty dataset on a model already built) raises instead of
    returning an empty History."""

    saw_no_batch = False

    def on_train_begin(self, logs=None):
        self.saw_no_batch = True

    def on_train_batch_end(self, batch, logs=None):
        self.saw_no_batch = False

    def on_epoch_end(self, epoch, logs=None):
        if self.saw_no_batch:
            raise ValueError(EMPTY_DATA.format(what="training"))
