"""Callbacks.

- `DeltaP` writes `val_delta_p` (Eq. 3 against single-task baselines, `keras_dbmtl.metrics.delta_p`) into the
  epoch logs.
- `SkipReport` and `BalancerEpochHook`: added by `MultiTaskModel.fit` itself (warnings for skipped steps; the
  balancer's epoch boundary).
"""

import math
import sys
import warnings

import keras

from keras_dbmtl.metrics.delta_p import _direction, _normalise_baselines, delta_p, delta_p_per_task

__all__ = ["DeltaP", "SkipReport", "BalancerEpochHook", "SKIPPED_STEPS_KEY"]

#: The log key of the number of skipped training steps.
SKIPPED_STEPS_KEY = "skipped_steps"


class SkipReport(keras.callbacks.Callback):
    """Warns, naming the tasks, when a training step was skipped for an unusable task loss or gradient.

    The train step itself skipped the update; this callback only reports it, and logs `loss = nan` for an epoch
    in which every step was skipped (there is no training loss to report).
    """

    MAX_WARNINGS = 5

    def __init__(self, model_ref):
        super().__init__()
        self._model_ref = model_ref
        self._count = 0.0
        self._steps = 0
        self._warned = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._count, self._steps = 0.0, 0

    def on_train_batch_end(self, batch, logs=None):
        self._steps = batch + 1               # the last step of this execution (steps_per_execution may be > 1)
        if not logs or logs.get(SKIPPED_STEPS_KEY) is None:
            return
        count, previous = float(logs[SKIPPED_STEPS_KEY]), self._count
        self._count = count
        if count <= previous or self._warned >= self.MAX_WARNINGS:
            return
        self._warned += 1
        warnings.warn(
            f"Batch {batch}: {self._what(logs)}. The step was skipped for every variable (weights, optimizer and "
            f"balancer state untouched); logged as '{SKIPPED_STEPS_KEY}'. If it keeps happening, check the "
            "targets and loss functions of these tasks (a loss that can be zero or negative, such as a negative "
            "log-likelihood, needs an offset under the log transform, or compile with a balancer whose "
            "loss_transform=None), lower the learning rate, or add keras.callbacks.TerminateOnNaN() to stop at "
            "the first skipped step.",
            RuntimeWarning,
            stacklevel=2,
        )

    def _what(self, logs):
        model = self._model_ref
        bad = [t for t in model.task_names if not math.isfinite(float(logs.get(f"{t}_loss", 0.0)))]
        if bad:
            transform = model.balancer.loss_transform
            need = "positive and finite (the log transform takes log(loss + eps))" if transform == "log" else "finite"
            return f"the loss of task(s) {', '.join(repr(b) for b in bad)} is not {need}"
        if isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer):
            return "a scaled task gradient overflowed (the LossScaleOptimizer halved its scale)"
        return "a task gradient was not finite"

    def on_epoch_end(self, epoch, logs=None):
        if logs and self._steps and logs.get(SKIPPED_STEPS_KEY, 0.0) >= self._steps:
            logs["loss"] = float("nan")


class BalancerEpochHook(keras.callbacks.Callback):
    """Gives balancers that need an epoch boundary (DWA) their hook, without the user's help."""

    def __init__(self, model_ref):
        super().__init__()
        self._model_ref = model_ref

    def on_epoch_end(self, epoch, logs=None):
        if self._model_ref.balancer is not None:
            self._model_ref.balancer.on_epoch_end(epoch)


def _calling_callback_list(callback, max_depth=8):
    """The keras CallbackList whose hook is running ``callback`` (or None)."""
    try:
        frame = sys._getframe(2)
    except ValueError:  # called from the top of the stack
        return None
    depth = 0
    while frame is not None and depth < max_depth:
        owner = frame.f_locals.get("self")
        if isinstance(owner, keras.callbacks.CallbackList):
            if any(c is callback for c in owner.callbacks):
                return owner
        frame = frame.f_back
        depth += 1
    return None


@keras.saving.register_keras_serializable(package="keras_dbmtl")
class DeltaP(keras.callbacks.Callback):
    """Writes Delta_p (Eq. 3) into the epoch logs as ``val_delta_p``.

    At the end of every epoch that ran validation, computes :func:`delta_p`
    from the logs' ``val_<key>`` entries and the STL ``baselines``, and stores
    it in the logs dict that Keras hands to every callback, so it appears in
    ``History.history["val_delta_p"]``, the progress bar, CSVLogger, and can
    be monitored (``mode="max"``) by ModelCheckpoint, EarlyStopping and
    ReduceLROnPlateau.

    Position in the callback list: Keras 3 passes one shared logs dict to the
    callbacks in list order, so a monitoring callback only sees keys written
    by callbacks before it.  At ``on_train_begin`` DeltaP moves itself to the
    front of the running ``CallbackList`` (its own relative order is the only
    thing that changes), so it may be given anywhere in ``callbacks=[...]``.
    If it cannot find the list (a hand-driven loop), it warns once and
    then must be placed before the callbacks that monitor its key.

    Args:
        baselines: STL values, ``{task: {key: value}}`` or ``{key: value}``;
            keys are the log keys without the ``val_`` prefix.
        higher_is_better: bool or ``{key: bool}``; default infers it from the
            keras_dbmtl metric names.
        prefix: logs prefix to read and write (``"val_"``; ``""`` for the
            training metrics).
        name: written key is ``prefix + name`` (``"val_delta_p"``).
        average: ``"task"`` (Eq. 3) or ``"metric"``.
        log_per_task: also write ``prefix + name + "_" + task`` for each task.
        verbose: 1 prints the value each epoch.
    """

    def __init__(self, baselines, higher_is_better=None, prefix="val_",
                 name="delta_p", average="task", log_per_task=False,
                 verbose=0):
        super().__init__()
        self.baselines = {
            t: ({k: float(x) for k, x in v.items()} if isinstance(v, dict)
                else float(v))
            for t, v in baselines.items()
        }
        if isinstance(higher_is_better, dict):
            higher_is_better = {k: bool(v) for k, v in higher_is_better.items()}
        self.higher_is_better = higher_is_better
        self.prefix = prefix
        self.name = name
        self.average = average
        self.log_per_task = bool(log_per_task)
        self.verbose = int(verbose)
        self._warned = False
        # Fail early on bad settings rather than after the first epoch.
        if average not in ("task", "metric"):
            raise ValueError(f"average must be 'task' or 'metric', got {average!r}.")
        for metrics in _normalise_baselines(self.baselines).values():
            for key in metrics:
                _direction(key, higher_is_better)

    @property
    def monitor(self):
        """The key this callback writes, e.g. ``"val_delta_p"``."""
        return self.prefix + self.name

    def _move_to_front(self):
        callback_list = _calling_callback_list(self)
        if callback_list is None:
            if not self._warned:
                self._warned = True
                import warnings
                warnings.warn(
                    "DeltaP could not find the CallbackList running it; place "
                    f"it before any callback that monitors {self.monitor!r}.",
                    stacklevel=3)
            return
        callbacks = callback_list.callbacks
        index = next(i for i, c in enumerate(callbacks) if c is self)
        if index:
            # In place: CallbackList is iterating over this very list; moving
            # the current element to the front keeps the elements after it
            # at their indices, so the loop neither skips nor repeats one.
            callbacks.insert(0, callbacks.pop(index))

    def on_train_begin(self, logs=None):
        self._move_to_front()

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        if self.prefix and not any(k.startswith(self.prefix) for k in logs):
            return  # no validation this epoch (validation_freq > 1)
        results = dict(logs)
        value = delta_p(results, self.baselines, self.higher_is_better,
                        prefix=self.prefix, average=self.average)
        logs[self.monitor] = value
        if self.log_per_task:
            per_task = delta_p_per_task(results, self.baselines,
                                        self.higher_is_better,
                                        prefix=self.prefix)
            for task, v in per_task.items():
                logs[f"{self.monitor}_{task}"] = v
        if self.verbose:
            print(f"\nEpoch {epoch + 1}: {self.monitor} = {value:+.4f}")

    def get_config(self):
        return {"baselines": self.baselines,
                "higher_is_better": self.higher_is_better,
                "prefix": self.prefix, "name": self.name,
                "average": self.average, "log_per_task": self.log_per_task,
                "verbose": self.verbose}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
