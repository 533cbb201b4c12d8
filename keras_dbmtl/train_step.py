"""The balanced training step of `MultiTaskModel`, written once with `keras.ops` for every backend.

    batch -> forward (once) and task losses, raw and transformed      forward_stage
          -> task gradients (global batch; keras_dbmtl.gradients)       task_gradients_stage  -> TaskGradients
          -> usable? (finite losses and gradients; labelled tasks)      usable_stage          -> (finite, invalid)
          -> balance (keras_dbmtl.balancing: weights, direction)        balance_stage         -> Update
          -> apply (one optimizer update of shared, task-specific       apply_stage (+ metrics_stage)
             and balancer variables)

Wrappers, not branches: `LossScaling` scales what is differentiated and unscales the gradients; a skip strategy
(`SelectSkip` or `BranchSkip`) guards the balance and apply stages so that an unusable step changes nothing and
returns whether the step was applied; the amortised schedule (`task_gradients_every > 1`) decides whether a step
refreshes the task Jacobian and stores what the refresh decided. Data parallelism lives in the backend primitives
(global losses, all-reduced gradients). The model (`keras_dbmtl.model`) keeps construction, variables, compile and
saving; it calls `train(model, data)` and `evaluate(model, data)` from its `train_step` / `test_step`.
"""

import collections

import keras
from keras import ops
from keras.src.trainers.data_adapters import data_adapter_utils

from keras_dbmtl import balancing
from keras_dbmtl import callbacks as mtl_callbacks
from keras_dbmtl import gradients as gradient_backends
from keras_dbmtl._utils import unique

SKIPPED_STEPS_KEY = mtl_callbacks.SKIPPED_STEPS_KEY
#: A raw task loss from which a skipped step with finite losses is blamed on it (its gradient's square, in Adam's
#: second moment, can pass float32's 3.4e38).
OVERFLOW_SUSPECT_LOSS = 1e16

# ---------------------------------------------------------------------- the records the stages pass on
#: The training batch, unpacked.
Batch = collections.namedtuple("Batch", ["x", "y", "sample_weight"])
#: The step's variables, in the order of every gradient list: shared, then each task's own, then the balancer's.
#: `unowned`: a subclassed model's non-shared variables, whose task is unknown (between the task groups and extra).
StepVariables = collections.namedtuple("StepVariables", ["shared", "task_groups", "extra", "all", "unowned"])
#: The forward stage's output: predictions, `TaskLosses` (raw, transformed; global batch), regularisation loss.
#: A named tuple, so that it leaves `jax.vjp` as auxiliary output.
Forward = collections.namedtuple("Forward", ["y_pred", "losses", "regularization"])
#: The balance stage's output: one gradient per step variable, the task weights to log, the step's TaskJacobian
#: (None at loss level and on amortised steps), the head weights applied, and with `task_gradients_every > 1`
#: whether the step refreshed the Jacobian.
Update = collections.namedtuple("Update", ["gradients", "task_weights", "jacobian", "head_weights", "refresh"],
                                defaults=(None, None))


# ---------------------------------------------------------------------- the step
def train(model, data):
    """One training step: forward and task losses -> task gradients -> usable? -> balance -> apply (+ metrics).
    Returns the step's logs."""
    batch, variables = prepare(model, data)
    scaling = LossScaling(model.optimizer)
    skip = skip_strategy(model, scaling.inner_optimizer)        # snapshots what the forward pass may change
    grads = task_gradients_stage(model, batch, variables, scaling)
    finite, invalid, grads = usable_stage(model, grads)

    def balance_and_apply(mask):
        update = scheduled_balance_stage(model, grads, mask)
        apply_stage(model, update, batch, grads.aux, variables, scaling.inner_optimizer)
        metrics_stage(model, batch, grads.aux, update, mask)

    applied = skip.guard(finite, balance_and_apply)
    scaling.update(finite)
    return step_logs(model, applied, invalid, scaling.active, grads.aux.losses.raw)


def prepare(model, data):
    """The unpacked batch and the step's variables; builds what TensorFlow defers to the first trace."""
    x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
    model._check_targets(y)
    if not model.built or (model.balancer is not None and not model.balancer.built):
        model._symbolic_build(data_batch=data)
        model._check_targets(y)                              # again, now against the heads' output shapes
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    task_variables = model.task_variables()
    groups = [task_variables[t] for t in model.task_names]
    extra, unowned = list(model.balancer.trainable_variables), model.unowned_variables()
    unowned_ids = {id(v) for v in unowned}
    shared = [v for v in model.shared_variables() if id(v) not in unowned_ids]
    flat = shared + [v for group in groups for v in group] + unowned + extra
    return Batch(x, y, sample_weight), StepVariables(shared, groups, extra, flat, unowned)


def forward_stage(model, batch):
    """One forward pass: predictions, the task losses (float32 under any policy; on several replicas the global
    batch's values, keras_dbmtl.gradients) raw and transformed, and the regularisation loss."""
    y_pred = model(batch.x, training=True)
    raw = gradient_backends.global_losses(model._task_losses(batch.y, y_pred, batch.sample_weight))
    return Forward(y_pred, model.balancer.task_losses(raw), model._regularization_loss())


def task_gradients_stage(model, batch, variables, scaling):
    """The forward stage, differentiated: per-task gradients for a gradient-level balancer, one gradient of the
    combined loss for a loss-level one. `TaskGradients` of the global batch, unscaled."""
    if model.balancer.uses_task_gradients and model._task_gradients == "representation":
        grads = _representation_gradients(model, batch, variables, scaling)
    elif model.balancer.uses_task_gradients:
        grads = _parameter_gradients(model, batch, variables, scaling)
    else:
        grads = _combined_gradients(model, batch, variables, scaling)
    return grads.map(scaling.unscale)


def _parameter_gradients(model, batch, variables, scaling):
    """The T x P Jacobian of the shared variables, or with `task_gradients_every=k > 1` (between refresh steps)
    the shared gradient of sum_t w_t transformed_loss_t with the last refresh's weights instead."""
    def differentiated():
        forward = forward_stage(model, batch)
        return scaling.scale(forward.losses.transformed), scaling.scale(forward.regularization), forward

    schedule = model.task_gradient_schedule
    amortise = None if schedule is None else (schedule.refresh(), schedule.stored()[0])
    return gradient_backends.task_gradients(differentiated, variables.shared, variables.task_groups,
                                            variables.extra, model._vectorize, amortise, variables.unowned)


def _representation_gradients(model, batch, variables, scaling):
    """The T x (B * size of z) Jacobian of the task losses with respect to the encoder's output z; the balanced
    direction over z reaches the shared variables through one backward pass of the encoder (`to_shared`)."""
    def encode():
        return model._encode(batch.x, training=True)

    def decode(features):
        y_pred = model._decode(features, batch.x, training=True)
        raw = gradient_backends.global_losses(model._task_losses(batch.y, y_pred, batch.sample_weight))
        forward = Forward(y_pred, model.balancer.task_losses(raw), model._regularization_loss())
        return scaling.scale(forward.losses.transformed), scaling.scale(forward.regularization), forward

    result = gradient_backends.representation_gradients(encode, decode, variables.shared, variables.task_groups,
                                                        variables.extra, model._vectorize, variables.unowned)

    def to_shared(cotangent):
        return [scaling.unscale(g) for g in result.to_shared(scaling.scale(cotangent))]

    return result._replace(to_shared=to_shared)


def _combined_gradients(model, batch, variables, scaling):
    def differentiated():
        forward = forward_stage(model, batch)
        combined, weights = balancing.combine(model.balancer, forward.losses)
        return scaling.scale(combined + forward.regularization), (forward, weights)

    (forward, weights), grads = gradient_backends.loss_gradients(differentiated, variables.all)
    return gradient_backends.TaskGradients(forward, forward.losses.transformed, None, combined=grads,
                                           task_weights=weights)


def usable_stage(model, grads):
    """(finite, invalid, grads): whether the step can be applied, the (T,) tasks whose loss is unusable, and the
    record with `labelled` (gradient level: False for a task without labels in the batch, which takes no part).

    `keras_dbmtl.gradients.all_finite`: a NaN or inf entry in any gradient (TF, JAX: one sum per tensor, so a sum of
    finite gradients that overflows float32 counts too; torch: one fused max-abs call)."""
    raw = grads.aux.losses.raw
    invalid = model.balancer.invalid_losses(raw)
    if grads.shared_blocks is not None:
        labelled = ops.logical_not(_without_labels(raw, grads))
        grads = grads._replace(labelled=labelled)
        none_labelled = ops.logical_not(ops.any(labelled))            # then nothing to learn: skipped
        invalid = ops.logical_and(invalid, ops.logical_or(labelled, none_labelled))
    finite = ops.logical_not(ops.any(invalid))
    tensors = grads.tensors()
    if tensors:
        finite = ops.logical_and(finite, gradient_backends.all_finite(tensors))
    return finite, invalid, grads


def _without_labels(raw, grads):
    """(T,) bool: tasks whose raw loss is exactly 0 with every gradient exactly 0 (no labelled sample, or a
    sample_weight of 0 for the task over the whole batch)."""
    num_tasks = int(raw.shape[0])
    squares = ops.zeros((num_tasks,), "float32")
    for block in list(grads.shared_blocks) + list(grads.unowned_blocks or []):
        squares = squares + ops.sum(ops.square(ops.reshape(ops.cast(block, "float32"), (num_tasks, -1))), axis=1)
    own = [ops.sum(ops.stack([ops.sum(ops.square(ops.cast(g, "float32"))) for g in group]))
           if group else ops.zeros((), "float32") for group in grads.task_gradients]
    return ops.logical_and(ops.equal(raw, 0.0), ops.equal(squares + ops.stack(own), 0.0))


def balance_stage(model, grads, mask=None):
    """The balancer's update (keras_dbmtl.balancing, the core every front door calls): one gradient per step
    variable, the task weights, and the step's one `TaskJacobian` (None at loss level, where the balancing happened
    inside the differentiated loss)."""
    if grads.shared_blocks is None:
        return Update(grads.combined, grads.task_weights, None)
    blocks, unowned, losses = grads.shared_blocks, grads.unowned_blocks or [], grads.aux.losses
    if mask is not None:
        # The select path runs this on a skipped step too (the result is discarded): keep NaN out of solvers.
        blocks = [ops.where(mask, b, ops.zeros_like(b)) for b in blocks]
        unowned = [ops.where(mask, b, ops.zeros_like(b)) for b in unowned]
        losses = losses.where(mask)
    balanced = balancing.balance(model.balancer, losses, blocks, grads.task_gradients, grads.labelled,
                                 model.gradient_statistics, unowned)
    shared = balanced.shared if grads.to_shared is None else grads.to_shared(balanced.shared[0])
    step = (list(shared) + [g for group in balanced.heads for g in group] + list(balanced.unowned)
            + grads.extra_gradients)
    return Update(_plus_regularization(step, grads), balanced.task_weights, balanced.jacobian,
                  balanced.head_weights)


def scheduled_balance_stage(model, grads, mask=None):
    """The balance stage; with `task_gradients_every=k > 1`, the balancer's update on refresh steps and the last
    refresh's weights in between (keras_dbmtl.task_gradients.AmortisedSchedule). Compiled steps (JAX,
    TensorFlow) run the balancer on every step (its Jacobian holds zeros in between) and keep its state where the
    step is not a refresh; torch, eager, branches in Python and runs the balancer on refresh steps only."""
    schedule, refresh = model.task_gradient_schedule, grads.refresh
    if refresh is None:
        return balance_stage(model, grads, mask)
    stored_weights, stored_heads = schedule.stored()
    if gradient_backends.branches_in_python():
        if bool(ops.convert_to_numpy(refresh)):
            update = balance_stage(model, grads, mask)
            schedule.commit(True, update.task_weights, update.head_weights)
            return update._replace(refresh=refresh)
        schedule.commit(False, stored_weights, stored_heads)
        return Update(_amortised_gradients(grads, stored_heads), stored_weights, None, stored_heads, refresh)
    state = list(model.balancer.variables)
    if model.gradient_statistics is not None:
        state += list(model.gradient_statistics.variables)
    previous = gradient_backends.snapshot(state)
    update = balance_stage(model, grads, mask)
    gradient_backends.keep_where(refresh, state, previous)
    amortised = _amortised_gradients(grads, stored_heads)
    weights = schedule.commit(refresh, update.task_weights, update.head_weights)
    gradients = [ops.where(refresh, a, b) for a, b in zip(update.gradients, amortised)]
    return update._replace(gradients=gradients, task_weights=weights, refresh=refresh)


def _amortised_gradients(grads, head_weights):
    """An amortised step's gradients: the shared gradient of sum_t w_t l_t, each head's own gradient times its
    stored head weight, the balancer's variables'; plus the regularisation gradients."""
    heads = [g * ops.cast(head_weights[t], g.dtype) for t, group in enumerate(grads.task_gradients) for g in group]
    return _plus_regularization(list(grads.combined_shared) + heads + grads.extra_gradients, grads)


def _plus_regularization(step, grads):
    regularization = grads.regularization_gradients or [None] * len(step)
    return [g if r is None else g + r for g, r in zip(step, regularization)]


def apply_stage(model, update, batch, forward, variables, optimizer):
    """One optimizer update of every step variable; then the balancer's `after_step` hook (FAMO asks for the
    losses of the same batch after the update)."""
    optimizer.apply(gradient_backends.optimizer_gradients(update.gradients), variables.all)

    def losses_after():
        y_pred = model(batch.x, training=True)
        return gradient_backends.global_losses(model._task_losses(batch.y, y_pred, batch.sample_weight))

    model.balancer.after_step(forward.losses.raw, losses_after)


def metrics_stage(model, batch, forward, update, mask=None):
    """The loss, per-task loss, weight and gradient-norm trackers, and the compiled metrics."""
    update_state = _metric_updater(mask)
    trackers, raw = model._task_trackers, forward.losses.raw
    update_state(model._loss_tracker, ops.sum(raw) + forward.regularization)
    norms = None if update.jacobian is None else update.jacobian.norms()
    norm_mask = mask
    if update.refresh is not None:      # task_gradients_every > 1: norms of refresh steps only
        norm_mask = update.refresh if mask is None else ops.logical_and(mask, update.refresh)
    trackers["loss"].update_state(raw, mask)
    trackers["weight"].update_state(ops.cast(update.task_weights, "float32"), mask)
    took_part = ops.logical_and(ops.not_equal(raw, 0.0), ops.isfinite(raw))
    trackers["steps"].update_state(ops.cast(took_part, "float32"), mask)
    if norms is not None:
        trackers["gradient_norm"].update_state(norms, norm_mask)
    if model._compile_metrics is not None:
        model._compile_metrics.update_state(batch.y, forward.y_pred, batch.sample_weight)


def _metric_updater(mask):
    """`update(tracker, value)`: a Mean's update_state, or, with `mask`, one that counts the step only where `mask`
    (the select path runs the metrics stage on skipped steps too)."""
    if mask is None:
        def add(tracker, value):        # Mean.update_state of a scalar, without its per-call conversions
            tracker.total.assign_add(ops.cast(value, tracker.total.dtype))
            tracker.count.assign_add(ops.cast(1, tracker.count.dtype))

        return add
    applied = ops.cast(mask, "float32")

    def update(tracker, value):
        tracker.total.assign_add(ops.where(mask, ops.cast(value, tracker.total.dtype), 0.0))
        tracker.count.assign_add(ops.cast(applied, tracker.count.dtype))

    return update


def step_logs(model, applied, invalid, loss_scaled, raw):
    """The metrics' results. A skipped batch logs a NaN loss, so that TerminateOnNaN stops on it (except a
    LossScaleOptimizer's overflow with finite losses: its normal scale adjustment), and NaN for each task at fault;
    the epoch means count the applied steps only. Skipped with every loss finite (a gradient or the optimizer's
    update was not finite; no LossScaleOptimizer) and the largest raw loss at least `OVERFLOW_SUSPECT_LOSS` (its
    gradient's square can overflow float32 in Adam), that task, the likely cause, logs +inf, so that `SkipReport`
    can name it."""
    logs = model.get_metrics_result()
    nan = ops.convert_to_tensor(float("nan"), "float32")
    nan_loss = ops.logical_not(applied)
    if loss_scaled:
        nan_loss = ops.logical_and(nan_loss, ops.any(invalid))
    logs["loss"] = ops.where(nan_loss, nan, logs["loss"])
    largest = ops.equal(ops.arange(len(model.task_names)), ops.argmax(raw))
    largest = ops.logical_and(largest, raw >= OVERFLOW_SUSPECT_LOSS)
    suspect = ops.logical_and(largest, nan_loss)
    suspect = ops.logical_and(suspect, ops.logical_not(ops.any(invalid)))
    inf = ops.convert_to_tensor(float("inf"), "float32")
    for t, task in enumerate(model.task_names):
        key = f"{task}_loss"
        if key in logs:
            logs[key] = ops.where(invalid[t], nan, ops.where(suspect[t], inf, logs[key]))
    return logs


# ---------------------------------------------------------------------- the test step
def evaluate(model, data):
    """One test step: the raw task losses, the loss and the compiled metrics (no balancing)."""
    x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
    model._check_targets(y)
    y_pred = model(x, training=False)
    raw_losses = model._task_losses(y, y_pred, sample_weight)
    model._loss_tracker.update_state(ops.sum(raw_losses) + model._regularization_loss())
    model._task_trackers["loss"].update_state(raw_losses)
    logs = model.compute_metrics(x, y, y_pred, sample_weight)
    # Task weights and gradient norms exist only in training.
    training_only = {key for kind in ("weight", "gradient_norm", "steps") for key in model._task_trackers[kind].keys}
    training_only.add(SKIPPED_STEPS_KEY)
    return {key: value for key, value in logs.items() if key not in training_only}


# ---------------------------------------------------------------------- wrappers around the stages
class LossScaling:
    """mixed_float16 with a `keras.optimizers.LossScaleOptimizer`: the differentiated losses are scaled with the
    optimizer's own `scale_loss`, the gradients unscaled before the balancer (which sees the true gradients), the
    inner optimizer applies the update, and the scale follows the optimizer's rule once per step. Without a
    LossScaleOptimizer every method is the identity."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.active = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        self.inner_optimizer = optimizer.inner_optimizer if self.active else optimizer

    def scale(self, value):
        if not self.active or isinstance(value, float):
            return value
        return self.optimizer.scale_loss(value)

    def unscale(self, gradient):
        if not self.active:
            return gradient
        return ops.cast(gradient, "float32") / ops.cast(self.optimizer.dynamic_scale, "float32")

    def update(self, finite):
        """Keras' LossScaleOptimizer rule: halve the scale on a skipped step, double it after
        `dynamic_growth_steps` applied steps in a row. Written with selects: the optimizer's own `apply` branches
        with `ops.cond` around its variable updates, a host round trip on torch that the select path avoids."""
        if not self.active:
            return
        optimizer = self.optimizer
        counter, scale = optimizer.step_counter.value, optimizer.dynamic_scale.value
        grow = ops.logical_and(finite, ops.equal(counter, optimizer.dynamic_growth_steps - 1))
        new_scale = ops.where(finite, ops.where(grow, scale * 2.0, scale), scale * 0.5)
        new_counter = ops.where(ops.logical_and(finite, ops.logical_not(grow)), counter + 1, 0)
        optimizer.dynamic_scale.assign(ops.cast(new_scale, optimizer.dynamic_scale.dtype))
        optimizer.step_counter.assign(ops.cast(new_counter, optimizer.step_counter.dtype))


def skip_strategy(model, inner_optimizer):
    """How this backend skips an unusable step (`SelectSkip` or `BranchSkip`), made before the forward pass."""
    updated = unique(model.trainable_variables + list(inner_optimizer.variables))
    if gradient_backends.skips_by_branch():
        return BranchSkip(model._forward_state_variables(), model._skip_tracker, updated)
    return SelectSkip(model._guarded_variables(inner_optimizer), model._skip_tracker, updated)


class SelectSkip:
    """The skip of an unusable step on JAX, torch and tf.distribute: the step runs with `mask`, then every variable
    it may change keeps its previous value where the step is not usable (a select: no branch, so no host round
    trip on torch; the previous values cost nothing on JAX, where XLA fuses the select)."""

    def __init__(self, variables, skip_tracker, updated_variables=()):
        self.variables, self.skip_tracker = variables, skip_tracker
        self.previous = gradient_backends.snapshot(variables)       # before the forward pass
        self.updated_variables = list(updated_variables)

    def guard(self, finite, step):
        """Runs `step(mask=finite)`; returns whether it was applied (a bool scalar)."""
        step(finite)
        return self.commit(finite)

    def commit(self, finite):
        """Keeps the step's writes where it is usable, restores the previous values elsewhere; counts a skip.
        Finite gradients can still make a non-finite update (Adam's second moment of a gradient beyond ~1e19
        overflows float32): the weights and optimizer state it wrote are checked too, one reduction each."""
        applied = ops.logical_and(finite, _all_finite(self.updated_variables))
        gradient_backends.keep_where(applied, self.variables, self.previous)
        self.skip_tracker.update_state(1.0 - ops.cast(applied, "float32"))
        return applied


class BranchSkip:
    """The skip of an unusable step on TensorFlow (one replica): the step runs under `tf.cond`; only what the
    forward pass changed before the check (batch-norm statistics, seeds, a loss-level balancer's state) is copied,
    and restored on the skipped branch."""

    def __init__(self, variables, skip_tracker, updated_variables=()):
        self.variables, self.skip_tracker = variables, skip_tracker
        self.previous = [ops.copy(v.value) for v in variables]     # before the forward pass
        self.updated_variables = list(updated_variables)

    def guard(self, finite, step):
        """Runs `step(mask=None)` where `finite`; returns whether it was applied (a bool scalar)."""
        def applied():
            # Finite gradients can still make a non-finite update (Adam's second moment of a gradient beyond
            # ~1e19 overflows float32): the variables the update writes are copied in this branch and restored.
            saved = [ops.copy(v.value) for v in self.updated_variables]
            step(None)

            def unusable_update():
                self._restore(self.updated_variables + self.variables, saved + self.previous)
                return ops.convert_to_tensor(False)

            return ops.cond(_all_finite(self.updated_variables), lambda: ops.convert_to_tensor(True),
                            unusable_update)

        def skipped():
            self._restore(self.variables, self.previous)
            return ops.convert_to_tensor(False)

        return ops.cond(finite, applied, skipped)

    def _restore(self, variables, values):
        for v, old in zip(variables, values):
            v.assign(old)
        self.skip_tracker.update_state(1.0)


def _all_finite(variables):
    """Whether every floating-point variable holds only finite values (a scalar bool)."""
    values = [v.value for v in variables if "float" in keras.backend.standardize_dtype(v.dtype)]
    return gradient_backends.all_finite(values) if values else ops.convert_to_tensor(True)
