"""Callbacks.

- `DeltaP` writes `val_delta_p` (Eq. 3 against single-task baselines) into the epoch logs (defined with the
  Delta_p functions in `keras_dbmtl.metrics.delta_p`).
- `SkipReport` and `BalancerEpochHook`: added by `MultiTaskModel.fit` itself (warnings for skipped steps; the
  balancer's epoch boundary).
"""

import math
import warnings

import keras

from keras_dbmtl.metrics.delta_p import DeltaP

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
        return ("a task gradient was not finite, or the optimizer's update made from finite gradients was not "
                "(e.g. Adam's second moment of a gradient beyond ~1e19 overflows float32)")

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
