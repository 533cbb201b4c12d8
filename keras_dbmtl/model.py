"""MultiTaskModel: a shared encoder, one head per task, and a balancer that decides the shared update.

```python
import keras, keras_dbmtl
encoder = keras.Sequential([keras.layers.Dense(32, activation="relu")])
model = keras_dbmtl.MultiTaskModel(
    encoder=encoder, heads={"a": keras.layers.Dense(1), "b": keras.layers.Dense(1)}
)
model.compile(optimizer="adam", loss={"a": "mse", "b": "mse"}, balancer="dbmtl")
x = keras.random.normal((64, 8))
model.fit(x, {"a": keras.random.normal((64, 1)), "b": keras.random.normal((64, 1))}, epochs=2)
```

One training step, written once with `keras.ops` for every backend:

    batch -> forward (once) -> task losses -> loss transform -> task gradients (keras_dbmtl.gradients, the only
    backend code) -> balancer -> one optimizer update of shared, task-specific and balancer variables.
"""

import math
import re
import warnings
import weakref

import keras
from keras import ops
from keras.src.backend.common.stateless_scope import StatelessScope
from keras.src.losses.losses import LossFunctionWrapper
from keras.src.trainers.data_adapters import data_adapter_utils
from keras.src.utils import tracking

from keras_dbmtl import _input_checks as input_checks
from keras_dbmtl import gradients as gradient_backends
from keras_dbmtl.balancers import base as balancer_base
from keras_dbmtl.balancers import registry

SKIPPED_STEPS_KEY = "skipped_steps"


def _is_dict(value):
    return isinstance(value, dict) or (hasattr(value, "keys") and hasattr(value, "items"))


def _keras_name(text):
    """`text` as a name Keras accepts on every backend (TensorFlow's scope names: ASCII letters, digits, `_.-`)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", text)
    return safe if re.match(r"[A-Za-z0-9.]", safe) else "t" + safe


def _unique(variables):
    seen, result = set(), []
    for v in variables:
        if id(v) not in seen:
            seen.add(id(v))
            result.append(v)
    return result


def _update_loss_scale(optimizer, finite):
    """A LossScaleOptimizer's own rule, without branches: halve the scale on a skipped step, double it after
    `dynamic_growth_steps` applied steps in a row."""
    counter, scale = optimizer.step_counter.value, optimizer.dynamic_scale.value
    grow = ops.logical_and(finite, ops.equal(counter, optimizer.dynamic_growth_steps - 1))
    new_scale = ops.where(finite, ops.where(grow, scale * 2.0, scale), scale * 0.5)
    new_counter = ops.where(ops.logical_and(finite, ops.logical_not(grow)), counter + 1, 0)
    optimizer.dynamic_scale.assign(ops.cast(new_scale, optimizer.dynamic_scale.dtype))
    optimizer.step_counter.assign(ops.cast(new_counter, optimizer.step_counter.dtype))


class _SkipReport(keras.callbacks.Callback):
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
        model = self._model_ref
        bad = [t for t in model.task_names if not math.isfinite(float(logs.get(f"{t}_loss", 0.0)))]
        if bad:
            transform = model.balancer.loss_transform
            need = "positive and finite (the log transform takes log(loss + eps))" if transform == "log" else "finite"
            what = f"the loss of task(s) {', '.join(repr(b) for b in bad)} is not {need}"
        elif isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer):
            what = "a scaled task gradient overflowed (the LossScaleOptimizer halved its scale)"
        else:
            what = "a task gradient was not finite"
        warnings.warn(
            f"Batch {batch}: {what}. The step was skipped for every variable (weights, optimizer and balancer "
            f"state untouched); logged as '{SKIPPED_STEPS_KEY}'. If it keeps happening, check the targets and "
            "loss functions of these tasks (a loss that can be zero or negative, such as a negative "
            "log-likelihood, needs an offset under the log transform, or compile with a balancer whose "
            "loss_transform=None), lower the learning rate, or add keras.callbacks.TerminateOnNaN() to stop at "
            "the first skipped step.",
            RuntimeWarning,
            stacklevel=2,
        )

    def on_epoch_end(self, epoch, logs=None):
        if logs and self._steps and logs.get(SKIPPED_STEPS_KEY, 0.0) >= self._steps:
            logs["loss"] = float("nan")


@keras.saving.register_keras_serializable(package="keras_dbmtl")
class MultiTaskModel(keras.Model):
    """A shared encoder with one head per task, trained with a task balancer.

    Args:
        encoder: any Keras layer or model; its trainable variables are the shared variables theta (minus those
            of `task_layers`).
        heads: dict task name -> layer or model applied to the encoder's output (task variables psi_t).
        task_layers: optional dict task name -> list of names of layers inside the encoder whose variables belong
            to that task only (MTAN attention modules, cross-stitch columns). They are updated from their own
            task's loss, like heads, and left out of the shared variables.
        per_task_inputs: if True, inputs are a dict task -> that task's own batch, and task t's output is
            `heads[t](encoder(inputs[t]))` (Office-31/Office-Home: each task has its own images).
    """

    def __init__(self, encoder, heads, task_layers=None, per_task_inputs=False, **kwargs):
        super().__init__(**kwargs)
        if not _is_dict(heads) or len(heads) == 0:
            raise ValueError(
                "MultiTaskModel needs `heads`: a non-empty dict mapping each task name to a Keras layer, e.g. "
                "heads={'seg': seg_head, 'depth': depth_head}. Received: " + repr(heads)
            )
        for name, head in heads.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"Task names must be non-empty strings; received {name!r}.")
            if not isinstance(head, keras.layers.Layer):
                raise ValueError(f"The head of task {name!r} must be a Keras layer or model; received {head!r}.")
        if not isinstance(encoder, keras.layers.Layer):
            raise ValueError(f"`encoder` must be a Keras layer or model; received {encoder!r}.")
        task_layers = dict(task_layers or {})
        unknown = sorted(set(task_layers) - set(heads))
        if unknown:
            raise ValueError(f"task_layers names unknown task(s) {unknown}; the tasks are {list(heads)}.")
        self.encoder = encoder
        self.heads = dict(heads)
        self.task_names = list(heads)
        self.task_layers = {task: list(names) for task, names in task_layers.items()}
        self.per_task_inputs = bool(per_task_inputs)
        self.balancer = None
        self._task_losses_fns = None
        self._loss_weights_vector = None
        self._vectorize = None

    # ------------------------------------------------------------------ forward
    def call(self, inputs, training=None):
        if self.per_task_inputs:
            input_checks.check_per_task_inputs(inputs, self.task_names, input_checks.describe)
            return {task: self.heads[task](self.encoder(inputs[task], training=training), training=training)
                    for task in self.task_names}
        features = self.encoder(inputs, training=training)
        return {task: self.heads[task](features, training=training) for task in self.task_names}

    def build(self, input_shape):
        if self.per_task_inputs:
            input_checks.check_per_task_inputs(input_shape, self.task_names, lambda s: f"inputs of shape {s}")
            spec = {t: keras.KerasTensor(tuple(input_shape[t])) for t in self.task_names}
        else:
            spec = keras.tree.map_shape_structure(lambda s: keras.KerasTensor(tuple(s)), input_shape)
        outputs = keras.src.backend.compute_output_spec(self.call, spec)
        self._head_output_shapes = {t: tuple(outputs[t].shape) for t in self.task_names}
        if not getattr(self, "_build_shapes_dict", None):
            self._build_shapes_dict = {"input_shape": input_shape}
        # The balancer's state is sized by the shared variables: create it as soon as they exist, so that it is
        # part of the model's variables before the optimizer is built. Before `built`: a balancer's ValueError
        # (e.g. STL(task="zzz")) must not be lost when torch's shape inference retries the call.
        self._build_balancer()
        self.built = True

    # ------------------------------------------------------------------ variables
    def _task_layer_objects(self):
        by_name = {}
        for layer in self.encoder._flatten_layers(include_self=False):
            by_name.setdefault(layer.name, layer)
        result = {}
        for task, names in self.task_layers.items():
            missing = [n for n in names if n not in by_name]
            if missing:
                raise ValueError(
                    f"task_layers[{task!r}] names layer(s) {missing} that are not inside the encoder. "
                    f"Layers in the encoder: {sorted(by_name)[:50]}"
                )
            result[task] = [by_name[n] for n in names]
        return result

    def task_variables(self):
        """dict task -> trainable variables used by that task only (its head, plus its `task_layers`)."""
        layers_by_task = self._task_layer_objects()
        result = {}
        for task in self.task_names:
            variables = list(self.heads[task].trainable_variables)
            for layer in layers_by_task.get(task, []):
                variables.extend(layer.trainable_variables)
            result[task] = variables
        return result

    def shared_variables(self):
        """The encoder's trainable variables that no task owns: theta in the paper."""
        owned = {id(v) for variables in self.task_variables().values() for v in variables}
        return [v for v in self.encoder.trainable_variables if id(v) not in owned]

    # ------------------------------------------------------------------ compile
    def compile(
        self,
        optimizer="rmsprop",
        loss=None,
        metrics=None,
        loss_weights=None,
        balancer="ew",
        vectorize_jacobian=None,
        **kwargs,
    ):
        """Configures training.

        Args:
            optimizer: as in `keras.Model.compile`.
            loss: dict task -> loss (name, function or `keras.losses.Loss`), or one loss for every task.
            metrics: dict task -> list of metrics, as in Keras for dict outputs.
            loss_weights: dict task -> float. Multiplies each raw task loss, as in Keras. Only balancers for which
                a constant factor on a loss has an effect accept it (EW without loss transform); the others
                (log transform, gradient normalisation) raise a ValueError, because the weights would be
                silently ignored.
            balancer: a registered name (`keras_dbmtl.balancers.names()`) or a `Balancer` instance.
            vectorize_jacobian: None (the backend's measured default), True or False: how the T x P task
                Jacobian is computed (one vectorised backward or a loop of T backward passes).
            **kwargs: `jit_compile`, `run_eagerly`, `steps_per_execution`, ... as in `keras.Model.compile`.
        """
        if loss is None:
            raise ValueError(
                "MultiTaskModel.compile needs `loss`: a dict mapping each task "
                f"({self.task_names}) to a loss, or one loss used for every task."
            )
        if kwargs.get("weighted_metrics"):
            raise ValueError("weighted_metrics is not supported by MultiTaskModel; pass sample weights per task.")
        balancer_obj = self._balancer_of_this_model(registry.get(balancer))
        if _is_dict(loss):
            self._check_task_keys(loss, "loss")
            loss_specs = {task: loss[task] for task in self.task_names}
        else:
            loss_specs = {task: loss for task in self.task_names}
        self._task_losses_fns = {task: self._make_loss(task, spec) for task, spec in loss_specs.items()}
        if loss_weights is not None:
            if not _is_dict(loss_weights):
                raise ValueError("loss_weights must be a dict task -> float for a MultiTaskModel.")
            if not balancer_obj.accepts_loss_weights:
                raise ValueError(
                    f"compile(loss_weights=...) has no effect with balancer {type(balancer_obj).__name__} "
                    f"(loss_transform={balancer_obj.loss_transform!r}, needs={balancer_obj.needs!r}): a constant "
                    "factor on a task loss vanishes under the log transform and under gradient normalisation. "
                    "Remove loss_weights, or use balancer='ew' (without loss transform), where they multiply "
                    "each raw task loss as in Keras."
                )
            unknown = sorted(set(loss_weights) - set(self.task_names))
            if unknown:
                raise ValueError(f"loss_weights names unknown task(s) {unknown}; the tasks are {self.task_names}.")
            self._loss_weights_vector = [float(loss_weights.get(t, 1.0)) for t in self.task_names]
        else:
            self._loss_weights_vector = None
        if metrics is not None and _is_dict(metrics):
            self._check_task_keys(metrics, "metrics", require_all=False)
        self._vectorize = vectorize_jacobian
        super().compile(optimizer=optimizer, loss=None, metrics=metrics, **kwargs)
        self._attach_balancer(balancer_obj)
        with tracking.DotNotTrackScope():
            # Reported through the `metrics` property, not tracked as layers of the model.
            self._task_trackers = {
                kind: [keras.metrics.Mean(name=f"{task}_{kind}") for task in self.task_names]
                for kind in ("loss", "weight", "gradient_norm")
            }
            self._skip_tracker = keras.metrics.Sum(name=SKIPPED_STEPS_KEY)
            self._compile_config = keras.src.saving.serialization_lib.SerializableDict(
                optimizer=optimizer,
                loss=loss,
                metrics=metrics,
                loss_weights=loss_weights,
                balancer=balancer_obj,
                vectorize_jacobian=vectorize_jacobian,
                **{k: v for k, v in kwargs.items() if k in ("jit_compile", "run_eagerly", "steps_per_execution")},
            )
        if self.built:
            self._build_balancer()

    def _make_loss(self, task, spec):
        loss = keras.losses.get(spec)
        if loss is None:
            raise ValueError(f"Could not interpret the loss of task {task!r}: {spec!r}.")
        if not isinstance(loss, keras.losses.Loss):
            loss = LossFunctionWrapper(loss, name=_keras_name(f"{task}_loss_fn"))
        return loss

    def _balancer_of_this_model(self, balancer):
        """A balancer object already compiled into another model (or built) carries that model's state (step
        counter, EMAs) and sizes: this model gets a fresh copy from its config, as if it were created anew."""
        owner = getattr(balancer, "_compiled_into", None)
        if owner is not None and owner() is self:
            return balancer
        if owner is None and not balancer.built:
            return balancer
        try:
            return type(balancer).from_config(balancer.get_config())
        except Exception as error:
            raise ValueError(
                f"The balancer {balancer.name!r} was already compiled into another model, and a fresh copy could "
                f"not be made from its get_config() ({error}). Create one balancer object per model."
            ) from error

    def _attach_balancer(self, balancer):
        object.__setattr__(balancer, "_compiled_into", weakref.ref(self))
        locked = self._tracker.locked
        self._tracker.unlock()
        if self.balancer is not None and self.balancer is not balancer:
            self._tracker.untrack(self.balancer)
        self.balancer = balancer
        if locked:
            self._tracker.lock()

    def _build_balancer(self):
        if self.balancer is None or self.balancer.built:
            return
        num_shared = sum(int(math.prod(v.shape)) for v in self.shared_variables())
        self.balancer.build(len(self.task_names), num_shared, self.task_names)
        if self.optimizer is not None and self.optimizer.built:
            # The optimizer was built before the balancer's learnable variables existed: add them.
            missing = [v for v in self.balancer.trainable_variables]
            if missing:
                self.optimizer.build(self.trainable_variables)

    def get_compile_config(self):
        if self.compiled and hasattr(self, "_compile_config"):
            return self._compile_config.serialize()
        return {}

    def compile_from_config(self, config):
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)

    @property
    def metrics(self):
        result = super().metrics
        trackers = getattr(self, "_task_trackers", None)
        if trackers and self.balancer is not None:
            result = result + trackers["loss"] + trackers["weight"] + [self._skip_tracker]
            if self.balancer.needs != "losses":
                result = result + trackers["gradient_norm"]
        return result

    # ------------------------------------------------------------------ checks
    def _check_task_keys(self, mapping, what, require_all=True):
        keys = set(mapping.keys())
        unknown = sorted(keys - set(self.task_names))
        missing = [t for t in self.task_names if t not in keys]
        if unknown:
            raise ValueError(
                f"The {what} carry unknown task(s) {unknown}; this model's tasks are {self.task_names}. "
                f"Remove them or add a head for each."
            )
        if require_all and missing:
            raise ValueError(
                f"The {what} are missing task(s) {missing}; this model's tasks are {self.task_names}. "
                f"Give the {what} as a dict with one entry per task."
            )

    def _check_targets(self, y):
        if not _is_dict(y):
            raise ValueError(
                "MultiTaskModel targets must be a dict keyed by task name "
                f"({self.task_names}); received {type(y).__name__}."
            )
        self._check_task_keys(y, "targets")
        output_shapes = getattr(self, "_head_output_shapes", None) or {}
        for task in self.task_names:
            input_checks.check_target_present(task, y[task])
            input_checks.check_target_shape(task, y[task], output_shapes.get(task), self._task_losses_fns[task])

    # ------------------------------------------------------------------ losses
    def _task_losses(self, y, y_pred, sample_weight):
        losses = []
        for task in self.task_names:
            weight = sample_weight.get(task) if _is_dict(sample_weight) else sample_weight
            value = self._task_losses_fns[task](y[task], y_pred[task], sample_weight=weight)
            losses.append(ops.cast(value, "float32"))
        losses = ops.stack(losses)
        if self._loss_weights_vector is not None:
            losses = losses * ops.convert_to_tensor(self._loss_weights_vector, "float32")
        return losses

    def _regularization_loss(self):
        terms = [ops.cast(ops.sum(term), "float32") for term in self.losses]
        if not terms:
            return 0.0
        return ops.sum(ops.stack(terms))

    # ------------------------------------------------------------------ steps
    def _ensure_built(self, data):
        # TensorFlow defers building to the first trace of the step: build symbolically before the variables
        # are partitioned into shared and task-specific.
        if not self.built or (self.balancer is not None and not self.balancer.built):
            self._symbolic_build(data_batch=data)
            self._check_targets(data_adapter_utils.unpack_x_y_sample_weight(data)[1])   # now against the heads

    def _forward_state_variables(self):
        """Variables the forward pass itself may change (batch-norm statistics, seed generators, the state of a
        loss-level balancer, whose `combine_losses` runs in the forward pass): small, copied before it."""
        balancer = self.balancer
        balancer_ids = {id(v) for v in balancer.variables}
        result = [v for v in self.non_trainable_variables if id(v) not in balancer_ids]
        if balancer.needs == "losses":
            result += list(balancer.non_trainable_variables)
        return _unique(result)

    def _guarded_variables(self, inner_optimizer):
        """Every variable a training step may change: weights, batch-norm statistics, seed generators, balancer
        and optimizer state (iteration counter included), compiled metrics. Left out: the step's own trackers
        (updated with a mask), and a LossScaleOptimizer's own scale and counter (they must still shrink on an
        overflow)."""
        metrics = list(self._compile_metrics.variables) if self._compile_metrics is not None else []
        return _unique(list(self.variables) + list(inner_optimizer.variables) + metrics)

    def _balanced_train_step(self, data):
        x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
        self._check_targets(y)
        self._ensure_built(data)
        balancer = self.balancer
        num_tasks = len(self.task_names)
        optimizer = self.optimizer
        if not optimizer.built:
            optimizer.build(self.trainable_variables)
        loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        inner_optimizer = optimizer.inner_optimizer if loss_scaled else optimizer
        scale = ops.cast(optimizer.dynamic_scale, "float32") if loss_scaled else None
        # A step whose task loss or gradient is not usable is skipped for every variable. TensorFlow: the update
        # runs under `ops.cond` (tf.cond), and only what the forward pass changes before the check (small:
        # batch-norm statistics, seeds) is copied. JAX: the step is a function of the state, so the previous values
        # cost nothing and a select at the end keeps them (fused by XLA). torch: the same select on copies made
        # before the step, because a branch on the flag would be a host round trip (a device sync) in every step.
        # Under tf.distribute (several replicas) the optimizer's cross-replica step cannot run inside tf.cond
        # (`merge_call` in control flow): the select path is used there too.
        functional = keras.backend.backend() != "tensorflow" or gradient_backends.num_replicas() > 1
        if functional:
            guarded = self._guarded_variables(inner_optimizer)
            previous = gradient_backends.snapshot(guarded)
        else:
            guarded = self._forward_state_variables()
            previous = [ops.copy(v.value) for v in guarded]

        def forward(scaled=True):
            y_pred = self(x, training=True)
            # float32 under any policy; on several replicas the global batch's values (keras_dbmtl.gradients)
            raw_losses = gradient_backends.global_losses(self._task_losses(y, y_pred, sample_weight))
            transformed = balancer.transform_losses(raw_losses)                      # so is the log transform
            regularization = self._regularization_loss()
            aux = (raw_losses, y_pred, regularization)
            if loss_scaled and scaled:
                # mixed_float16: differentiate the scaled losses; the gradients are unscaled before the balancer.
                transformed = transformed * scale
                if not isinstance(regularization, float):
                    regularization = regularization * scale
            return transformed, regularization, aux

        def unscale(g):
            return g if g is None or not loss_scaled else ops.cast(g, "float32") / scale

        shared = self.shared_variables()
        task_groups = [self.task_variables()[t] for t in self.task_names]
        extra = list(balancer.trainable_variables)
        variables = shared + [v for group in task_groups for v in group] + extra
        if balancer.needs == "losses":
            def scalar_forward():
                transformed, regularization, aux = forward(scaled=False)
                combined, weights = balancer.combine_losses(transformed)
                combined = combined + regularization
                return (combined * scale if loss_scaled else combined), (aux, weights)

            ((raw_losses, y_pred, regularization), task_weights), grads = gradient_backends.loss_gradients(
                scalar_forward, variables
            )
            grads = [unscale(g) for g in grads]
            checked = grads
            result = None
        else:
            result = gradient_backends.task_gradients(forward, shared, task_groups, extra, self._vectorize)
            raw_losses, y_pred, regularization = result.aux
            blocks = [unscale(b) for b in result.shared_blocks]
            own_grads = [[unscale(g) for g in group] for group in result.task_gradients]
            extra_grads = [unscale(g) for g in result.extra_gradients]
            regularization_grads = [unscale(g) for g in result.regularization_gradients]
            checked = blocks + [g for group in own_grads for g in group] + extra_grads + [
                g for g in regularization_grads if g is not None
            ]
            transformed_losses = result.task_losses / scale if loss_scaled else result.task_losses
            jacobian = balancer_base.TaskJacobian(blocks, num_tasks)

        invalid = ops.logical_not(ops.isfinite(raw_losses))
        if balancer.loss_transform == "log":
            invalid = ops.logical_or(invalid, raw_losses <= 0.0)
        finite = ops.logical_not(ops.any(invalid))
        if checked:
            # One reduction per tensor: a NaN or inf entry makes its sum non-finite (a sum of finite gradients
            # that overflows float32 counts as non-finite too: such a step is not usable either).
            sums = ops.stack([ops.sum(ops.cast(g, "float32")) for g in checked])
            finite = ops.logical_and(finite, ops.all(ops.isfinite(sums)))

        def apply_step(sanitize):
            if result is None:
                step_grads, weights = grads, task_weights
            else:
                step_blocks, step_losses = blocks, transformed_losses
                if sanitize:
                    # JAX runs this on a skipped step too (the result is discarded): keep NaN out of the solvers.
                    step_blocks = [ops.where(finite, b, ops.zeros_like(b)) for b in blocks]
                    step_losses = ops.where(finite, transformed_losses, ops.zeros_like(transformed_losses))
                step_jacobian = balancer_base.TaskJacobian(step_blocks, num_tasks)
                aggregation = balancer.aggregate(step_losses, step_jacobian)
                weights = aggregation.task_weights
                if aggregation.shared_direction is None:
                    shared_grads = step_jacobian.weighted_sum_blocks(weights)
                else:
                    shared_grads = self._split_flat(aggregation.shared_direction, shared)
                task_grads = []
                for t, group_grads in enumerate(own_grads):
                    if aggregation.head_weights is not None:
                        group_grads = [g * aggregation.head_weights[t] for g in group_grads]
                    task_grads.extend(group_grads)
                step_grads = list(shared_grads) + task_grads + extra_grads
                step_grads = [g if r is None else g + r for g, r in zip(step_grads, regularization_grads)]
            if keras.backend.backend() == "tensorflow":
                # Inside tf.cond the optimizer's all-reduce needs tensors of the branch's own graph.
                step_grads = [ops.copy(g) for g in step_grads]
            inner_optimizer.apply(gradient_backends.optimizer_gradients(step_grads), variables)
            if balancer.needs_losses_after_update:            # FAMO: the same batch again, after the update
                losses_after = gradient_backends.global_losses(
                    self._task_losses(y, self(x, training=True), sample_weight))
                balancer.update_after_step(ops.stop_gradient(raw_losses), ops.stop_gradient(losses_after))
            return ops.cast(weights, "float32")

        jacobian_norms = None if result is None else jacobian.norms

        def applied_step(sanitize, mask=None):
            weights = apply_step(sanitize)
            self._update_step_metrics(y, y_pred, sample_weight, raw_losses, regularization, weights, jacobian_norms,
                                      mask)
            return None if mask is not None else dict(self.get_metrics_result())

        def skipped_step():
            for v, old in zip(guarded, previous):
                v.assign(old)
            self._skip_tracker.update_state(1.0)
            return self._step_logs(finite, invalid, loss_scaled)

        if functional:
            applied_step(sanitize=True, mask=finite)
            gradient_backends.keep_where(finite, guarded, previous)
            self._skip_tracker.update_state(1.0 - ops.cast(finite, "float32"))
            logs = self._step_logs(finite, invalid, loss_scaled)
        else:
            logs = ops.cond(finite, lambda: applied_step(sanitize=False), skipped_step)
        if loss_scaled:
            _update_loss_scale(optimizer, finite)
        return logs

    def _update_step_metrics(self, y, y_pred, sample_weight, raw_losses, regularization, task_weights, norms,
                             mask=None):
        if mask is None:
            def update(tracker, value):
                tracker.update_state(value)
        else:
            applied = ops.cast(mask, "float32")

            def update(tracker, value):                      # a Mean that counts the step only where `mask`
                tracker.total.assign_add(ops.where(mask, ops.cast(value, tracker.total.dtype), 0.0))
                tracker.count.assign_add(ops.cast(applied, tracker.count.dtype))

        update(self._loss_tracker, ops.sum(raw_losses) + regularization)
        gradient_norms = None if norms is None else norms()
        for t in range(len(self.task_names)):
            update(self._task_trackers["loss"][t], raw_losses[t])
            update(self._task_trackers["weight"][t], task_weights[t])
            if gradient_norms is not None:
                update(self._task_trackers["gradient_norm"][t], gradient_norms[t])
        if self._compile_metrics is not None:
            self._compile_metrics.update_state(y, y_pred, sample_weight)

    def _step_logs(self, finite, invalid, loss_scaled):
        """The metrics' results. A skipped batch logs a NaN loss, so that TerminateOnNaN stops on it (except a
        LossScaleOptimizer's overflow with finite losses: its normal scale adjustment), and NaN for each task at
        fault; the epoch means count the applied steps only."""
        logs = dict(self.get_metrics_result())
        nan = ops.convert_to_tensor(float("nan"), "float32")
        nan_loss = ops.logical_not(finite)
        if loss_scaled:
            nan_loss = ops.logical_and(nan_loss, ops.any(invalid))
        logs["loss"] = ops.where(nan_loss, nan, logs["loss"])
        for t, task in enumerate(self.task_names):
            key = f"{task}_loss"
            if key in logs:
                logs[key] = ops.where(invalid[t], nan, logs[key])
        return logs

    def _split_flat(self, flat, variables):
        pieces, start = [], 0
        for v in variables:
            size = 1
            for dim in v.shape:
                size *= int(dim)
            pieces.append(ops.reshape(flat[start : start + size], v.shape))
            start += size
        return pieces

    def _balanced_test_step(self, data):
        x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
        self._check_targets(y)
        y_pred = self(x, training=False)
        raw_losses = self._task_losses(y, y_pred, sample_weight)
        regularization = self._regularization_loss()
        self._loss_tracker.update_state(ops.sum(raw_losses) + regularization)
        for t in range(len(self.task_names)):
            self._task_trackers["loss"][t].update_state(raw_losses[t])
        logs = self.compute_metrics(x, y, y_pred, sample_weight)
        # Task weights and gradient norms exist only in training.
        training_only = {m.name for kind in ("weight", "gradient_norm") for m in self._task_trackers[kind]}
        training_only.add(SKIPPED_STEPS_KEY)
        return {key: value for key, value in logs.items() if key not in training_only}

    def _run_stateless(self, step, state, data, groups):
        mapping = []
        for variables, values in zip(groups, state):
            mapping.extend(zip(variables, values))
        with StatelessScope(state_mapping=mapping) as scope:
            logs = step(data)
        new_state = tuple(
            [scope.get_current_value(v) if scope.get_current_value(v) is not None else value
             for v, value in zip(variables, values)]
            for variables, values in zip(groups, state)
        )
        return logs, new_state

    def train_step(self, *args):
        if keras.backend.backend() == "jax":
            state, data = args
            groups = (
                self.trainable_variables,
                self.non_trainable_variables,
                self.optimizer.variables,
                self.metrics_variables,
            )
            return self._run_stateless(self._balanced_train_step, state, data, groups)
        return self._balanced_train_step(args[0])

    def test_step(self, *args):
        if keras.backend.backend() == "jax":
            state, data = args
            groups = (self.trainable_variables, self.non_trainable_variables, self.metrics_variables)
            return self._run_stateless(self._balanced_test_step, state, data, groups)
        return self._balanced_test_step(args[0])

    def fit(self, x=None, y=None, *args, callbacks=None, **kwargs):
        self._check_fit_arguments(x, y, kwargs.get("sample_weight"))
        validation = kwargs.get("validation_data")
        if isinstance(validation, (list, tuple)) and len(validation) in (2, 3):
            self._check_fit_arguments(*validation, what="validation")
        callbacks = list(callbacks or [])
        callbacks.insert(0, _SkipReport(self))
        callbacks.insert(1, _BalancerEpochHook(self))
        empty_check = input_checks.EmptyDataCheck()
        callbacks.insert(2, empty_check)
        self._build_at_fit_start = any(isinstance(c, keras.callbacks.BackupAndRestore) for c in callbacks)
        try:
            return super().fit(x, y, *args, callbacks=callbacks, **kwargs)
        except UnboundLocalError as error:        # Keras' JAX loop after an epoch without a batch
            if empty_check.saw_no_batch:
                raise ValueError(input_checks.EMPTY_DATA.format(what="training")) from error
            raise

    def evaluate(self, x=None, y=None, *args, **kwargs):
        self._check_fit_arguments(x, y, kwargs.get("sample_weight"), what="evaluation")
        return super().evaluate(x, y, *args, **kwargs)

    def _check_fit_arguments(self, x, y, sample_weight=None, what="training"):
        """What can be checked before any work: array data with no sample, a target None, per-task inputs."""
        if _is_dict(y):
            self._check_task_keys(y, "targets")
            for task in self.task_names:
                input_checks.check_target_present(task, y[task])
        if _is_dict(sample_weight):
            self._check_task_keys(sample_weight, "sample weights", require_all=False)
        if self.per_task_inputs and (_is_dict(x) or hasattr(x, "shape")):
            input_checks.check_per_task_inputs(x, self.task_names, input_checks.describe)
        elif _is_dict(x) and set(x) and set(x) <= set(self.task_names) and not isinstance(self.encoder, keras.Model):
            raise ValueError(
                f"x is a dict keyed by task names ({sorted(x)}) but this MultiTaskModel has per_task_inputs=False: "
                "one input runs through the encoder for every task. Pass MultiTaskModel(..., per_task_inputs=True) "
                "for one batch per task, or give x as one array."
            )
        if input_checks.num_samples(x) == 0:
            raise ValueError(input_checks.EMPTY_DATA.format(what=what) + " (x has 0 samples)")

    def _symbolic_build(self, iterator=None, data_batch=None):
        # Keras takes the first batch of `iterator` here: an empty dataset gets a clear error.
        if iterator is not None and data_batch is None:
            iterator = input_checks.NonEmpty(iterator)
        return super()._symbolic_build(iterator=iterator, data_batch=data_batch)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # TensorFlow builds a model at the first trace of its step, after `on_train_begin`: with a callback that
        # needs a built model (BackupAndRestore), build it at the start of `fit`, as JAX and torch do.
        if (getattr(self, "_build_at_fit_start", False) and iterator is not None and not self.built
                and getattr(self, "_distribute_strategy", None) is None):
            return self._symbolic_build(iterator=iterator)
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def load_weights(self, filepath, *args, **kwargs):
        try:
            return super().load_weights(filepath, *args, **kwargs)
        except OSError as error:                # still an OSError: BackupAndRestore(double_checkpoint=True) retries
            raise OSError(
                f"Could not read the weights file {str(filepath)!r}: {error}. The file is damaged, e.g. truncated "
                "by a process killed while writing it. Delete it to start over; "
                "keras.callbacks.BackupAndRestore(..., double_checkpoint=True) keeps the previous backup and "
                "falls back to it."
            ) from error

    # ------------------------------------------------------------------ export
    def export(self, filepath, format="tf_saved_model", **kwargs):
        backend = keras.backend.backend()
        if backend == "torch" and format == "tf_saved_model":
            raise ValueError(
                "Keras cannot export a tf_saved_model from the torch backend. Save the model with "
                "model.save('model.keras'), then export it through the TensorFlow backend:\n"
                "    KERAS_BACKEND=tensorflow python -m keras_dbmtl.export model.keras served/"
            )
        if format == "tf_saved_model" and kwargs.get("input_signature") is None and (
            backend == "jax" or not getattr(self, "_called", False)
        ):
            # JAX needs one eager call before exporting, and so does a model just loaded from a .keras file.
            self._eager_call_for_export()
        return super().export(filepath, format=format, **kwargs)

    def _eager_call_for_export(self):
        shapes = getattr(self, "_build_shapes_dict", None)
        if not shapes:
            raise ValueError("Call or fit the model once before exporting it.")
        shape = next(iter(shapes.values()))

        def zeros(s):
            return ops.zeros(tuple(1 if d is None else d for d in s))

        if self.per_task_inputs:
            self({t: zeros(shape[t]) for t in self.task_names})
        else:
            self(keras.tree.map_shape_structure(zeros, shape))

    # ------------------------------------------------------------------ config
    def get_config(self):
        return {
            "name": self.name,
            "encoder": keras.saving.serialize_keras_object(self.encoder),
            "heads": {t: keras.saving.serialize_keras_object(h) for t, h in self.heads.items()},
            "task_layers": self.task_layers,
            "per_task_inputs": self.per_task_inputs,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        encoder = keras.saving.deserialize_keras_object(config.pop("encoder"), custom_objects=custom_objects)
        heads = {
            t: keras.saving.deserialize_keras_object(h, custom_objects=custom_objects)
            for t, h in config.pop("heads").items()
        }
        return cls(encoder=encoder, heads=heads, **config)


class _BalancerEpochHook(keras.callbacks.Callback):
    """Gives balancers that need an epoch boundary (DWA) their hook, without the user's help."""

    def __init__(self, model_ref):
        super().__init__()
        self._model_ref = model_ref

    def on_epoch_end(self, epoch, logs=None):
        if self._model_ref.balancer is not None:
            self._model_ref.balancer.on_epoch_end(epoch)
