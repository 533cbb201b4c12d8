"""Callbacks.

- `DeltaP` writes `val_delta_p` (Eq. 3 against single-task baselines, `keras_dbmtl.metrics.delta_p`) into the
  epoch logs.
- `TaskBalanceMonitor` logs how the tasks are balanced (weights, gradient norms, pairwise cosines, conflicts): the
  paper's Figures 8-10, into the History and TensorBoard.
- `SkipReport`, `TaskReport` and `BalancerEpochHook`: added by `MultiTaskModel.fit` itself (warnings for skipped
  steps and for tasks that train nothing; the balancer's epoch boundary).
"""

import itertools
import math
import sys
import warnings

import keras
import numpy as np

from keras_dbmtl.metrics.delta_p import delta_p, delta_p_per_task, group_baselines, is_higher_better
from keras_dbmtl.metrics.gradient_statistics import GradientStatistics

__all__ = ["DeltaP", "TaskBalanceMonitor", "SkipReport", "TaskReport", "BalancerEpochHook", "SKIPPED_STEPS_KEY"]

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
        losses = {t: float(logs.get(f"{t}_loss", 0.0)) for t in model.task_names}
        bad = [t for t, value in losses.items() if math.isnan(value)]
        suspects = [t for t, value in losses.items() if value == math.inf]   # see MultiTaskModel._step_logs
        if suspects and not bad:
            return (f"every task loss was finite, but the update made from them was not: task {suspects[0]!r} has "
                    "a loss of 1e16 or more, the likely cause (Adam's second moment of a gradient beyond ~1e19 "
                    "overflows float32; this batch logs that task's loss as inf). Scale that task's loss down (a "
                    "constant factor in its loss function or compile(loss_weights=...)), lower the learning rate, "
                    "or train with balancer='dbmtl', whose log transform makes every loss's scale irrelevant")
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


class TaskReport(keras.callbacks.Callback):
    """Warns when a task trains nothing and no step is skipped, so nothing else would say so.

    - A task whose raw loss is exactly 0 (or not finite) on every applied step of an epoch took part in none of
      them (`<task>_steps` = 0 in the logs): under the log transform its gradient is 0 (a task without labels in
      the epoch, a masked loss that masks everything). Warned at the end of every epoch in which it happens.
    - Under a balancer that stalls on a task whose shared gradient is exactly zero while its loss is not (a dead
      ReLU branch of the trunk: MGDA's min-norm point and Nash-MTL's bargaining point are then zero), warned once
      per `fit`, naming the task, at the first step where it is seen.
    """

    def __init__(self, model_ref):
        super().__init__()
        self._model_ref = model_ref
        self._steps = 0
        self._stall_warned = False

    def on_epoch_begin(self, epoch, logs=None):
        self._steps = 0

    def on_train_batch_end(self, batch, logs=None):
        self._steps = batch + 1
        balancer = self._model_ref.balancer
        if self._stall_warned or not logs or not getattr(balancer, "stalls_on_zero_gradient", False):
            return
        dead = [t for t in self._model_ref.task_names
                if logs.get(f"{t}_gradient_norm") is not None and float(logs[f"{t}_gradient_norm"]) == 0.0
                and float(logs.get(f"{t}_loss", 0.0)) > 0.0]
        if not dead:
            return
        self._stall_warned = True
        warnings.warn(
            f"The shared gradient of task(s) {', '.join(repr(t) for t in dead)} is exactly zero while the loss is "
            f"not (a dead ReLU branch of the shared layers, or a loss that does not depend on them). Under "
            f"{type(balancer).__name__} the common direction is then zero (the zero gradient is in the convex "
            "hull, and is its min-norm point), so the shared variables do not train. Check that task's path "
            "through the shared layers, or use a balancer that treats a zero gradient as a task that does not "
            "pull (balancer='dbmtl', 'upgrad', 'ew').",
            RuntimeWarning,
            stacklevel=2,
        )

    def on_epoch_end(self, epoch, logs=None):
        if not logs or not self._steps:
            return
        applied = self._steps - float(logs.get(SKIPPED_STEPS_KEY, 0.0))
        idle = [t for t in self._model_ref.task_names
                if logs.get(f"{t}_steps") is not None and float(logs[f"{t}_steps"]) == 0.0]
        if applied <= 0 or not idle:
            return
        warnings.warn(
            f"Epoch {epoch}: the loss of task(s) {', '.join(repr(t) for t in idle)} was exactly 0 (or not finite) "
            f"on every one of the epoch's {int(applied)} applied steps, so these tasks trained nothing (under the "
            "log transform a zero loss has a zero gradient). A task without labels in the epoch (every target "
            "masked, an empty loss) does this; check its targets and sample weights. Each task's count of the "
            "steps it took part in is logged as '<task>_steps'.",
            RuntimeWarning,
            stacklevel=2,
        )


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
        for metrics in group_baselines(self.baselines).values():
            for key in metrics:
                is_higher_better(key, higher_is_better)

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


TAG_PREFIX = "task_balance"


def _numpy(value):
    return np.asarray(keras.ops.convert_to_numpy(value), dtype="float64")


class TaskBalanceMonitor(keras.callbacks.Callback):
    """Logs, per epoch, each task's weight and gradient norm, the pairwise cosines of the task gradients on the
    shared variables and the number of conflicting pairs (negative cosine): the paper's Figures 8-10.

    Into the History (epoch logs): `cosine_<a>_<b>` for every pair (when T <= `pair_logs_up_to`),
    `mean_cosine` (over the pairs) and `conflicting_pairs` (mean over the epoch's steps of the number of pairs
    with a negative cosine); the model already logs `<task>_weight` and `<task>_gradient_norm`. The full T x T
    matrices of each epoch are kept in `monitor.cosines` and `monitor.gramians` (numpy), for the heat maps of
    `keras_dbmtl.plotting`. Cosines are epoch means of the per-step cosines.

    With `tensorboard=` a `keras.callbacks.TensorBoard` of the same fit, the same scalars (weights and gradient
    norms included) go to its train writer under `task_balance/`, per epoch and, with `every_n_steps=N`, every
    N steps (`task_balance_steps/`; cosines and conflicts averaged over those N steps, weights and norms as the
    batch logs give them, running epoch means). TensorBoard needs TensorFlow's summary writer and the
    `tensorboard` package: without them the monitor warns once and keeps logging into the History. The
    `monitor.steps` list keeps the step records either way.

    How it works: `set_model` gives the model a `keras_dbmtl.metrics.GradientStatistics` (the model's
    `gradient_statistics` hook; the train function is rebuilt once to include it), which the train step feeds
    with the Gramian of the per-task gradients it already forms for the logged gradient norms: T x T work and one
    variable update per step, plus one device-to-host copy per epoch (and per N steps). Measured with
    `benchmarks/monitor_cost.py` (CPU, single-threaded, T = 3, dense encoder with 21k shared parameters, DB-MTL,
    batch 64, median of 5 epochs of 200 steps): JAX 1.53 -> 1.52 ms/step (-0.01), torch 9.78 -> 9.82 (+0.04,
    +0.4 %), TensorFlow 2.88 -> 3.26 (+0.38; but the hook without the callback measured 2.99 -> 2.88, and two
    identical TF fits in a row differ by 0.8 ms on this shared machine, so that is within TF's noise). Without
    `every_n_steps` the monitor adds no batch hook, so Keras keeps dispatching steps without per-step host copies.
    Gradient-level balancers only: a loss-level balancer (EW, UW, DWA, ...) forms no task gradients,
    and the monitor then logs nothing but warns once.

    ```python
    import keras, numpy as np, keras_dbmtl
    encoder = keras.Sequential([keras.layers.Dense(16, activation="relu")])
    model = keras_dbmtl.MultiTaskModel(encoder=encoder, heads={"a": keras.layers.Dense(1), "b": keras.layers.Dense(1)})
    model.compile(optimizer="adam", loss="mse", balancer="dbmtl")
    x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    monitor = keras_dbmtl.callbacks.TaskBalanceMonitor()
    history = model.fit(x, {"a": x[:, :1], "b": -x[:, :1]}, epochs=2, verbose=0, callbacks=[monitor])
    print(history.history["cosine_a_b"], history.history["conflicting_pairs"])
    ```

    Args:
        every_n_steps: None (per epoch only) or N: also record (and write to TensorBoard) every N steps.
        tensorboard: None or the `keras.callbacks.TensorBoard` callback of the same fit.
        pair_logs_up_to: the most tasks for which every pair's cosine gets its own History key (T (T - 1) / 2
            keys); above it only `mean_cosine` and `conflicting_pairs` (the matrices stay in `monitor.cosines`).
    """

    def __init__(self, every_n_steps=None, tensorboard=None, pair_logs_up_to=10):
        super().__init__()
        if every_n_steps is not None and int(every_n_steps) < 1:
            raise ValueError(f"every_n_steps must be None or a positive integer; received {every_n_steps!r}.")
        if tensorboard is not None and not isinstance(tensorboard, keras.callbacks.TensorBoard):
            raise ValueError("`tensorboard` must be the keras.callbacks.TensorBoard callback passed to the same "
                             f"fit; received {tensorboard!r}.")
        self.every_n_steps = None if every_n_steps is None else int(every_n_steps)
        self.tensorboard = tensorboard
        self.pair_logs_up_to = int(pair_logs_up_to)
        self.epochs, self.cosines, self.gramians, self.steps = [], [], [], []
        self._statistics = None
        self._window = None
        self._epoch_sums = None                            # the training epoch's sums, kept before validation
        self._in_epoch = False
        self._global_step = 0
        self._writer_failed = False
        self._warned_loss_level = False
        if self.every_n_steps is not None:
            # Only then a batch hook: Keras skips the per-batch callback work (a host copy of the logs every step,
            # which costs TensorFlow most) when no callback overrides it.
            self.on_train_batch_end = self._record_steps

    # ------------------------------------------------------------------ wiring
    def set_model(self, model):
        super().set_model(model)
        if not hasattr(model, "task_names") or not hasattr(model, "gradient_statistics"):
            raise ValueError("TaskBalanceMonitor works with a keras_dbmtl.MultiTaskModel; received "
                             f"{type(model).__name__}.")
        statistics = model.gradient_statistics
        if not isinstance(statistics, GradientStatistics) or statistics.num_tasks != len(model.task_names):
            model.gradient_statistics = GradientStatistics(len(model.task_names))
            model.train_function = None                    # rebuilt by fit, now with the metric's update
        self._statistics = model.gradient_statistics

    def _gradient_level(self):
        balancer = getattr(self.model, "balancer", None)
        if balancer is not None and not balancer.uses_task_gradients:
            if not self._warned_loss_level:
                self._warned_loss_level = True
                warnings.warn(f"TaskBalanceMonitor: balancer {type(balancer).__name__} weighs the losses and forms "
                              "no per-task gradients, so there are no gradient norms or cosines to log. Use a "
                              "gradient-level balancer (e.g. 'dbmtl') to see them.", RuntimeWarning, stacklevel=2)
            return False
        return True

    def _sums(self):
        s = self._statistics
        gramian, cosine, conflicts, steps = (_numpy(v) for v in s.split_totals(s.totals.value, s.num_tasks))
        return {"cosine": cosine, "gramian": gramian, "conflicts": float(conflicts), "steps": float(steps)}

    # ------------------------------------------------------------------ logs
    def _pair_values(self, cosine, conflicts):
        tasks = self.model.task_names
        values = {}
        if len(tasks) <= self.pair_logs_up_to:
            for i, j in itertools.combinations(range(len(tasks)), 2):
                values[f"cosine_{tasks[i]}_{tasks[j]}"] = float(cosine[i, j])
        off_diagonal = cosine[~np.eye(len(tasks), dtype=bool)]
        values["mean_cosine"] = float(off_diagonal.mean()) if off_diagonal.size else 1.0
        values["conflicting_pairs"] = float(conflicts)
        return values

    def _task_values(self, logs):
        keys = [f"{t}_{kind}" for t in self.model.task_names for kind in ("weight", "gradient_norm")]
        return {k: float(logs[k]) for k in keys if logs and k in logs}

    def _write(self, prefix, values, step):
        if self.tensorboard is None or self._writer_failed or not values:
            return
        try:
            summary = self.tensorboard.summary
            with self.tensorboard._train_writer.as_default():
                for key, value in values.items():
                    summary.scalar(f"{prefix}/{key}", value, step=int(step))
        except Exception as error:  # noqa: BLE001 - only the "TensorBoard is not installed" kinds are caught
            if not (isinstance(error, ImportError) or type(error).__name__ == "TBNotInstalledError"):
                raise
            self._writer_failed = True
            warnings.warn(f"TaskBalanceMonitor: cannot write to TensorBoard ({error}); the values stay in the "
                          "History and in the monitor. Install tensorflow and tensorboard to write event files.",
                          RuntimeWarning, stacklevel=2)

    def on_epoch_begin(self, epoch, logs=None):
        self._window = {"cosine": 0.0, "conflicts": 0.0, "steps": 0.0}
        self._epoch_sums = None
        self._in_epoch = True

    def on_test_begin(self, logs=None):
        # fit's validation resets every metric of the model, ours too: keep the training epoch's sums first
        if self._in_epoch and self._epoch_sums is None and self._gradient_level():
            self._epoch_sums = self._sums()

    def _record_steps(self, batch, logs=None):
        self._global_step += 1
        if self.every_n_steps is None or self._global_step % self.every_n_steps or not self._gradient_level():
            return
        sync = getattr(self.model, "jax_state_sync", None)
        if sync is not None:
            sync()                              # Keras's JAX trainer keeps the state outside the variables mid-epoch
        sums = self._sums()
        steps = sums["steps"] - self._window["steps"]
        if steps <= 0:
            return
        cosine = (sums["cosine"] - self._window["cosine"]) / steps
        conflicts = (sums["conflicts"] - self._window["conflicts"]) / steps
        self._window = {"cosine": sums["cosine"], "conflicts": sums["conflicts"], "steps": sums["steps"]}
        values = {**self._task_values(logs), **self._pair_values(cosine, conflicts)}
        self.steps.append({"step": self._global_step, "cosine": cosine, **values})
        self._write(f"{TAG_PREFIX}_steps", values, self._global_step)

    def on_epoch_end(self, epoch, logs=None):
        sums, self._epoch_sums, self._in_epoch = self._epoch_sums, None, False
        if logs is None or not self._gradient_level():
            return
        sums = sums if sums is not None else self._sums()
        if sums["steps"] <= 0:                             # every step of the epoch was skipped
            return
        cosine, gramian = sums["cosine"] / sums["steps"], sums["gramian"] / sums["steps"]
        values = self._pair_values(cosine, sums["conflicts"] / sums["steps"])
        logs.update(values)
        self.epochs.append(epoch)
        self.cosines.append(cosine)
        self.gramians.append(gramian)
        self._write(TAG_PREFIX, {**self._task_values(logs), **values}, epoch)
