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

Or any functional multi-output model, its shared variables read from the graph (`keras_dbmtl.functional`):

```python
inputs = keras.Input((8,))
trunk = keras.layers.Dense(32, activation="relu")(inputs)
model = keras_dbmtl.MultiTaskModel(inputs=inputs, outputs={"a": keras.layers.Dense(1)(trunk),
                                                           "b": keras.layers.Dense(1)(trunk)})
model = keras_dbmtl.MultiTaskModel.from_model(existing_functional_model)      # dict or named list outputs
```

The training step and its stages live in `keras_dbmtl.train_step`; this module keeps construction, variables,
compile and saving.
"""

import os
import re
import shutil
import tempfile
import weakref

import keras
from keras import ops
from keras.src.losses.losses import LossFunctionWrapper
from keras.src.utils import tracking

from keras_dbmtl import _input_checks as input_checks
from keras_dbmtl import _loss_call
from keras_dbmtl import _trackers
from keras_dbmtl import balancing
from keras_dbmtl import callbacks as mtl_callbacks
from keras_dbmtl import export as mtl_export
from keras_dbmtl import functional
from keras_dbmtl import gradients as gradient_backends
from keras_dbmtl import task_gradients as task_gradient_modes
from keras_dbmtl import train_step as balanced_step
from keras_dbmtl._utils import is_dict as _is_dict
from keras_dbmtl._utils import unique
from keras_dbmtl.balancers import registry


def _keras_name(text):
    """`text` as a name Keras accepts on every backend (TensorFlow's scope names: ASCII letters, digits, `_.-`)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", text)
    return safe if re.match(r"[A-Za-z0-9.]", safe) else "t" + safe


class _GraphState:
    """The functional form's reading of its graph: `split` (`keras_dbmtl.functional.Split`), `shared_config`
    (the constructor's `shared_variables` as saved), `representation` (a layer name or None) and `parts` (encode,
    decode, bypass; made on first use). `subclassed`: the network is a subclassed model (no graph), whose split
    is the given shared variables, resolved once they exist. A plain object: nothing in it is tracked or saved as
    state."""

    def __init__(self, split, shared_config, representation, subclassed=False):
        self.split, self.shared_config, self.representation, self.parts = split, shared_config, representation, None
        self.subclassed = subclassed


@keras.saving.register_keras_serializable(package="keras_dbmtl")
class MultiTaskModel(keras.Model):
    """A multi-task network trained with a task balancer: a shared encoder with one head per task, or any
    functional model with one output per task.

    Two ways to build one:

    - `MultiTaskModel(encoder, heads, task_layers=None, per_task_inputs=False)`: the encoder's output goes to
      every head; the encoder's trainable variables are the shared ones.
    - `MultiTaskModel.from_model(subclassed_model, shared_variables=[...])`: a subclassed model returning a dict
      {task: output}; the variables given are the shared ones, every other trainable variable is updated from the
      losses of the tasks that reach it (the sum of their gradients, each times its head weight).
    - `MultiTaskModel(inputs=..., outputs={task: tensor})`, as `keras.Model` takes them, or
      `MultiTaskModel.from_model(model)`: the functional graph says which task output depends on which layer
      (`keras_dbmtl.functional`). The trainable variables of layers that two task outputs or more depend on are
      shared (the balancer's task Jacobian covers them; a task whose output does not depend on one, e.g. a tower
      used by tasks a and b but not c, has a zero row in its block); those of a layer only one task's output
      depends on are that task's own, updated from its own loss like a head.

    Args:
        encoder: any Keras layer or model; its trainable variables are the shared variables theta (minus those
            of `task_layers`).
        heads: dict task name -> layer or model applied to the encoder's output (task variables psi_t).
        task_layers: optional dict task name -> list of names of layers inside the encoder whose variables belong
            to that task only (MTAN attention modules, cross-stitch columns). They are updated from their own
            task's loss, like heads, and left out of the shared variables.
        per_task_inputs: if True, inputs are a dict task -> that task's own batch, and task t's output is
            `heads[t](encoder(inputs[t]))` (Office-31/Office-Home: each task has its own images).
        inputs: the functional form: the input tensor(s) (`keras.Input`), any structure `keras.Model` takes.
        outputs: the functional form: dict task name -> output tensor, or a list of output tensors named by the
            layers that make them.
        shared_variables: the functional form: the list of trainable variables to balance, instead of those the
            graph shows two tasks using (it must hold every variable two tasks use; it may add one that one task
            uses).
        representation: the functional form, for `compile(task_gradients="representation")`: the name of the
            layer whose output is the shared representation z (or a tensor of the graph). By default, the
            deepest tensor through which every shared variable reaches the task outputs.
        network: a subclassed `keras.Model` whose call returns a dict {task: output}, with `shared_variables=`
            (required: there is no graph to read them from); `from_model` passes it.
        task_names: with `network=`: the keys of its output dict, when the network has not been called yet (a
            built network is called once symbolically to read them).

    Attributes:
        network: the functional form's functional model (dict outputs), whose layers are the model's; None with
            encoder/heads (whose `encoder` and `heads` are None in the functional form).
        task_names: the tasks, in the order of the heads or of the functional outputs.
    """

    def __init__(self, encoder=None, heads=None, task_layers=None, per_task_inputs=False, *, inputs=None,
                 outputs=None, shared_variables=None, representation=None, network=None, task_names=None,
                 **kwargs):
        super().__init__(**kwargs)
        self.network = None
        self.balancer = None
        self._task_losses_fns = None
        self._loss_weights_vector = None
        self._vectorize = None
        if network is not None:
            self._init_subclassed(network, shared_variables, representation, task_names,
                                  {"encoder": encoder, "heads": heads, "task_layers": task_layers,
                                   "per_task_inputs": per_task_inputs, "inputs": inputs, "outputs": outputs})
            return
        if task_names is not None:
            raise ValueError("task_names= applies to MultiTaskModel(network=subclassed_model, ...) only; the other "
                             "forms read the task names from the heads or the outputs.")
        if inputs is not None or outputs is not None:
            self._init_functional(inputs, outputs, shared_variables, representation,
                                  {"encoder": encoder, "heads": heads, "task_layers": task_layers,
                                   "per_task_inputs": per_task_inputs})
            return
        if shared_variables is not None or representation is not None:
            raise ValueError("shared_variables= and representation= apply to a functional MultiTaskModel "
                             "(inputs=..., outputs=... or MultiTaskModel.from_model); with encoder/heads the "
                             "encoder's variables are the shared ones and its output is the representation.")
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
            raise ValueError(f"`encoder` must be a Keras layer or model; received {encoder!r}. For a functional "
                             "model, pass MultiTaskModel(inputs=..., outputs={task: tensor}).")
        task_layers = dict(task_layers or {})
        unknown = sorted(set(task_layers) - set(heads))
        if unknown:
            raise ValueError(f"task_layers names unknown task(s) {unknown}; the tasks are {list(heads)}.")
        self.encoder = encoder
        self.heads = dict(heads)
        self.task_names = list(heads)
        self.task_layers = {task: list(names) for task, names in task_layers.items()}
        self.per_task_inputs = bool(per_task_inputs)

    def _init_functional(self, inputs, outputs, shared_variables, representation, others):
        """The functional form: `self.network` (a functional model with dict outputs) and its variable split."""
        given = sorted(name for name, value in others.items() if value)
        if given:
            raise ValueError(f"MultiTaskModel takes either encoder=/heads= or inputs=/outputs=, not both; received "
                             f"{given} with inputs/outputs.")
        if inputs is None or outputs is None:
            raise ValueError("A functional MultiTaskModel needs both inputs= and outputs= (as keras.Model).")
        if isinstance(outputs, keras.KerasTensor) or not isinstance(outputs, (dict, list, tuple)):
            raise ValueError(
                "outputs must be a dict mapping each task name to its output tensor, outputs={'ctr': ctr, "
                f"'cvr': cvr}} (or a list of output tensors named by their layers); received {type(outputs).__name__}."
            )
        network = keras.Model(inputs=inputs, outputs=outputs, name="network")
        self.network = network          # tracked: its layers and variables are the model's
        self.task_names = list(functional.task_outputs(network))
        self.encoder, self.heads, self.task_layers, self.per_task_inputs = None, None, {}, False
        shared = None if shared_variables is None else functional.resolve_variables(network, shared_variables)
        # What the graph says, kept out of Keras' and TensorFlow's tracking (the network's variables, not new ones).
        object.__setattr__(self, "_graph", _GraphState(
            split=functional.split_variables(network, shared),
            shared_config=None if shared is None else functional.variable_references(network, shared),
            representation=functional.representation_name(network, representation)))
        if representation is not None:
            functional.shared_representation(network, functional.common_variables(self._graph.split),
                                             self._graph.representation)

    def _init_subclassed(self, network, shared_variables, representation, task_names, others):
        """The subclassed form: `self.network` (a model whose call returns {task: output}), the shared variables
        as given (references, resolved once the network has variables) and the task names."""
        given = sorted(name for name, value in others.items() if value)
        if given:
            raise ValueError(f"MultiTaskModel(network=...) takes no {given}: the network is the whole model.")
        if not isinstance(network, keras.Model):
            raise ValueError(f"network must be a keras.Model; received {type(network).__name__}.")
        if shared_variables is None:
            raise ValueError(functional.NO_GRAPH.format(what=f"The model {network.name!r}"))
        if representation is not None:
            raise ValueError("representation= needs a functional graph to find the representation in; a subclassed "
                             "model supports task_gradients='parameters' only.")
        self.network = network
        self.task_names = functional.subclassed_task_names(network, task_names)
        self.encoder, self.heads, self.task_layers, self.per_task_inputs = None, None, {}, False
        if all(isinstance(entry, keras.Variable) for entry in shared_variables):
            config = functional.variable_references(
                network, functional.check_subclassed_shared(network, list(shared_variables)))
        else:
            config = list(shared_variables)           # references, from a saved config: resolved once built
        object.__setattr__(self, "_graph", _GraphState(split=None, shared_config=config, representation=None,
                                                       subclassed=True))

    def _subclassed_split(self):
        """The subclassed form's split, resolving the references (`shared_config`) once the network's variables
        exist."""
        graph = self._graph
        if graph.split is None:
            shared = functional.resolve_variables(self.network, graph.shared_config)
            shared = functional.check_subclassed_shared(self.network, shared)
            graph.split = functional.Split(shared, {t: [] for t in self.task_names}, {})
        return graph.split

    @classmethod
    def from_model(cls, model, shared_variables=None, representation=None, task_names=None, **kwargs):
        """A MultiTaskModel over an existing Keras model with one output per task. It uses `model`'s layers, so
        training it trains `model`'s weights.

        A functional model (dict outputs, or list outputs named by their layers, `model.output_names`): its graph
        gives the split (a Functional subclass's own `call()` is not used). A subclassed model (its call returns a
        dict {task: output}) has no graph: `shared_variables=` is required, and every other trainable variable
        gets the gradient sum_t h_t grad l_t over the tasks whose loss reaches it (h_t the method's head weight,
        1 for most), which is its own task's gradient for a variable one task uses; `task_names=` when the model
        has not been called yet. `shared_variables`, `representation` and `**kwargs` (e.g. `name`) as in the
        constructor."""
        if isinstance(model, keras.Model) and not isinstance(model, keras.Sequential) and (
                not functional.is_functional(model)):
            return cls(network=model, shared_variables=shared_variables, representation=representation,
                       task_names=task_names, **kwargs)
        if task_names is not None:
            raise ValueError("task_names= applies to a subclassed model; a functional model's outputs name its tasks.")
        outputs = functional.task_outputs(model)
        return cls(inputs=model._inputs_struct, outputs=outputs, shared_variables=shared_variables,
                   representation=representation, **kwargs)

    def _functional_parts(self):
        """The functional form's (encode, decode, bypass) for `task_gradients="representation"`
        (`keras_dbmtl.functional.encoder_decoder`), made once."""
        graph = self._graph
        if graph.parts is None:
            z = functional.shared_representation(self.network, functional.common_variables(graph.split),
                                                 graph.representation)
            parts = functional.encoder_decoder(self.network, z)
            if any(getattr(layer, "activity_regularizer", None) is not None
                   for layer in parts[0]._flatten_layers(include_self=False)):
                raise ValueError(
                    "task_gradients='representation' does not support activity regularizers before the "
                    "representation (their loss is not a function of it). Remove them or use "
                    "task_gradients='parameters'."
                )
            graph.parts = parts                  # the same layers as `network`: not tracked, not saved twice
        return graph.parts

    # ------------------------------------------------------------------ forward
    def _encode(self, inputs, training=None):
        """The shared representation z of `inputs` (the encoder's output, or the functional form's encode)."""
        if self.network is None:
            return self.encoder(inputs, training=training)
        return self._functional_parts()[0](inputs, training=training)

    def _decode(self, features, inputs, training=None):
        """dict task -> output from the representation `features` (the heads, or the functional form's decode,
        which also reads the inputs that bypass the representation)."""
        if self.network is None:
            return {task: self.heads[task](features, training=training) for task in self.task_names}
        _, decode, bypass = self._functional_parts()
        flat = keras.tree.flatten(inputs)
        bypassing = [ops.convert_to_tensor(flat[i]) for i in bypass]
        return dict(zip(self.task_names, decode([features] + bypassing, training=training)))

    def call(self, inputs, training=None):
        if self.network is not None:
            outputs = self.network(inputs, training=training)
            if self._graph.subclassed and (not _is_dict(outputs) or set(outputs) != set(self.task_names)):
                got = sorted(outputs) if _is_dict(outputs) else type(outputs).__name__
                raise ValueError(f"The network {self.network.name!r} must return a dict with one output per task "
                                 f"{self.task_names}; it returned {got}.")
            return {task: outputs[task] for task in self.task_names}
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
        """dict task -> trainable variables used by that task only (its head, plus its `task_layers`; in the
        functional form, those of the layers only that task's output depends on)."""
        if self.network is not None and self._graph.subclassed:
            return {task: [] for task in self.task_names}
        if self.network is not None:
            return {task: list(self._graph.split.task[task]) for task in self.task_names}
        layers_by_task = self._task_layer_objects()
        result = {}
        for task in self.task_names:
            variables = list(self.heads[task].trainable_variables)
            for layer in layers_by_task.get(task, []):
                variables.extend(layer.trainable_variables)
            result[task] = variables
        return result

    def shared_variables(self):
        """The encoder's trainable variables that no task owns: theta in the paper. In the functional form, those
        of the layers that two task outputs or more depend on (or the constructor's `shared_variables`)."""
        if self.network is not None and self._graph.subclassed:
            return list(self._subclassed_split().shared)
        if self.network is not None:
            return list(self._graph.split.shared)
        owned = {id(v) for variables in self.task_variables().values() for v in variables}
        return [v for v in self.encoder.trainable_variables if id(v) not in owned]

    def unowned_variables(self):
        """Variables the step gives sum_t h_t grad l_t over the tasks whose loss reaches them (h_t the method's head
        weight), from the task Jacobian's own rows, instead of a balanced direction or one task's gradient:

        - the subclassed form's trainable variables outside `shared_variables` (no graph says which task uses
          them);
        - the functional form under `task_gradients="representation"`: the shared variables after the
          representation (a tower some tasks share), which the representation's direction does not reach.

        Empty otherwise."""
        if self.network is None:
            return []
        if self._graph.subclassed:
            shared = {id(v) for v in self.shared_variables()}
            return [v for v in self.network.trainable_variables if id(v) not in shared]
        if (getattr(self, "_task_gradients", None) != "representation" or self.balancer is None
                or not self.balancer.uses_task_gradients):
            return []
        encoded = {id(v) for v in self._functional_parts()[0].trainable_variables}
        return [v for v in self._graph.split.shared if id(v) not in encoded]

    # ------------------------------------------------------------------ compile
    def compile(
        self,
        optimizer="rmsprop",
        loss=None,
        metrics=None,
        loss_weights=None,
        balancer="ew",
        vectorize_jacobian=None,
        task_gradients="parameters",
        task_gradients_every=1,
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
            task_gradients: "parameters" (the per-task gradients of the shared variables, the methods' own
                definition) or "representation" (per-task gradients of the encoder's output, then one backward
                through the encoder; MGDA-UB). See `keras_dbmtl.task_gradients` for the methods that allow it.
            task_gradients_every: k >= 1. With k > 1 the per-task gradients and the balancer's update are computed
                every k-th step only; the steps in between apply the last task weights in one backward pass
                (`keras_dbmtl.task_gradients`). k = 1 is the exact method.
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
        task_gradient_modes.check(balancer_obj, task_gradients, task_gradients_every,
                                  self if self.network is None else None)
        if self.network is not None and self._graph.subclassed and (
                task_gradients == "representation" or task_gradients_every > 1):
            raise ValueError(
                "A subclassed model supports task_gradients='parameters' with task_gradients_every=1 only: the "
                "representation level needs a graph to find the representation in, and amortised steps need each "
                "non-shared variable's task. Build the model functionally for them."
            )
        if self.network is not None and task_gradients == "representation":
            self._functional_parts()            # a representation exists, or a ValueError naming the fix
        self._task_losses_fns = self._task_loss_functions(loss)
        self._loss_weights_vector = self._loss_weights_for(loss_weights, balancer_obj)
        if metrics is not None and _is_dict(metrics):
            self._check_task_keys(metrics, "metrics", require_all=False)
        self._vectorize = vectorize_jacobian
        self._task_gradients = task_gradients
        super().compile(optimizer=optimizer, loss=None, metrics=metrics, **kwargs)
        self._attach_balancer(balancer_obj)
        self._attach_schedule(task_gradients_every if balancer_obj.uses_task_gradients else 1)
        with tracking.DotNotTrackScope():
            # Reported through the `metrics` property, not tracked as layers of the model.
            self._task_trackers = {
                kind: _trackers.TaskMeans(self.task_names, kind) for kind in ("loss", "weight", "gradient_norm")
            }
            # `<task>_steps`: the applied steps of the epoch in which the task's raw loss was nonzero and finite.
            self._task_trackers["steps"] = _trackers.TaskSums(self.task_names, "steps")
            self._skip_tracker = keras.metrics.Sum(name=mtl_callbacks.SKIPPED_STEPS_KEY)
            self._compile_config = keras.src.saving.serialization_lib.SerializableDict(
                optimizer=optimizer, loss=loss, metrics=metrics, loss_weights=loss_weights, balancer=balancer_obj,
                vectorize_jacobian=vectorize_jacobian,
                task_gradients=task_gradients,
                task_gradients_every=task_gradients_every,
                **{k: v for k, v in kwargs.items() if k in ("jit_compile", "run_eagerly", "steps_per_execution")},
            )
        if self.built:
            self._build_balancer()

    def _task_loss_functions(self, loss):
        if _is_dict(loss):
            self._check_task_keys(loss, "loss")
            loss_specs = {task: loss[task] for task in self.task_names}
        else:
            loss_specs = {task: loss for task in self.task_names}
        return {task: self._make_loss(task, spec) for task, spec in loss_specs.items()}

    def _loss_weights_for(self, loss_weights, balancer):
        """compile(loss_weights=...) as a list in task order (None without), checked against the balancer."""
        if loss_weights is None:
            return None
        if not _is_dict(loss_weights):
            raise ValueError("loss_weights must be a dict task -> float for a MultiTaskModel.")
        if not balancer.accepts_loss_weights:
            raise ValueError(
                f"compile(loss_weights=...) has no effect with balancer {type(balancer).__name__} "
                f"(loss_transform={balancer.loss_transform!r}): a constant "
                "factor on a task loss vanishes under the log transform and under gradient normalisation. "
                "Remove loss_weights, or use balancer='ew' (without loss transform), where they multiply "
                "each raw task loss as in Keras."
            )
        unknown = sorted(set(loss_weights) - set(self.task_names))
        if unknown:
            raise ValueError(f"loss_weights names unknown task(s) {unknown}; the tasks are {self.task_names}.")
        return [float(loss_weights.get(t, 1.0)) for t in self.task_names]

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

    def _attach_schedule(self, every):
        """The state of `task_gradients_every=k > 1` (tracked, so saved and threaded through the JAX step)."""
        locked = self._tracker.locked
        self._tracker.unlock()
        previous = self.__dict__.get("task_gradient_schedule")
        if previous is not None:
            self._tracker.untrack(previous)
        schedule = None
        if every > 1:
            schedule = task_gradient_modes.AmortisedSchedule(every, len(self.task_names), name="task_gradients")
        self.task_gradient_schedule = schedule
        if locked:
            self._tracker.lock()

    def _build_balancer(self):
        if self.balancer is None or self.balancer.built:
            return
        balancing.build(self.balancer, self.task_names, [v.shape for v in self.shared_variables()])
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
            result = result + [trackers["loss"], trackers["weight"], trackers["steps"], self._skip_tracker]
            if self.balancer.uses_task_gradients:
                result = result + [trackers["gradient_norm"]]
        if self.gradient_statistics is not None:
            result = result + [self.gradient_statistics]
        return result

    @property
    def gradient_statistics(self):
        """None, or a `keras.metrics.Metric` that the balance stage updates every applied step with the T x T
        Gramian of the per-task gradients (of the transformed losses, global batch) on the shared variables:
        `gradient_statistics.update_state(gramian)`. Only balancers that compute per-task gradients form it. Assign
        it before `fit` builds the train function; it is one of `model.metrics` (threaded through the JAX step,
        reset every epoch) and its result is left out of the logs."""
        return self.__dict__.get("_gradient_statistics")

    def __setattr__(self, name, value):
        if name != "gradient_statistics":
            return super().__setattr__(name, value)
        if value is not None and not isinstance(value, keras.metrics.Metric):
            raise ValueError(f"gradient_statistics must be None or a keras.metrics.Metric; received {value!r}.")
        with tracking.DotNotTrackScope():        # reported through `metrics`, not tracked as a layer's state
            super().__setattr__("_gradient_statistics", value)

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
            value = _loss_call.task_loss(self._task_losses_fns[task], y[task], y_pred[task], weight)
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
    def _forward_state_variables(self):
        """Variables the forward pass itself may change (batch-norm statistics, seed generators, the state of a
        loss-level balancer, whose `combine_losses` runs in the forward pass): small, copied before it."""
        balancer = self.balancer
        balancer_ids = {id(v) for v in balancer.variables}
        result = [v for v in self.non_trainable_variables if id(v) not in balancer_ids]
        if not balancer.uses_task_gradients:
            result += list(balancer.non_trainable_variables)
        return unique(result)

    def _guarded_variables(self, inner_optimizer):
        """Every variable a training step may change: weights, batch-norm statistics, seed generators, balancer
        and optimizer state (iteration counter included), compiled metrics and `gradient_statistics`. Left out:
        the step's own trackers (updated with a mask), and a LossScaleOptimizer's own scale and counter (they must
        still shrink on an overflow)."""
        metrics = list(self._compile_metrics.variables) if self._compile_metrics is not None else []
        if self.gradient_statistics is not None:
            metrics += list(self.gradient_statistics.variables)
        return unique(list(self.variables) + list(inner_optimizer.variables) + metrics)

    def get_metrics_result(self):
        """As in Keras, without the (matrix) result of `gradient_statistics`."""
        results = {}
        for metric in self.metrics:
            if metric is self.gradient_statistics:
                continue
            result = metric.result()
            if isinstance(result, dict):
                results.update(result)
            else:
                results[metric.name] = result
        return results

    # ------------------------------------------------------------------ the Keras trainer's entry points
    def train_step(self, *args):
        def state():
            return (self.trainable_variables, self.non_trainable_variables, self.optimizer.variables,
                    self.metrics_variables)

        return gradient_backends.run_step(lambda data: balanced_step.train(self, data), args, state)

    def test_step(self, *args):
        def state():
            return self.trainable_variables, self.non_trainable_variables, self.metrics_variables

        return gradient_backends.run_step(lambda data: balanced_step.evaluate(self, data), args, state)

    def fit(self, x=None, y=None, *args, callbacks=None, **kwargs):
        self._check_fit_arguments(x, y, kwargs.get("sample_weight"))
        validation = kwargs.get("validation_data")
        if isinstance(validation, (list, tuple)) and len(validation) in (2, 3):
            self._check_fit_arguments(*validation, what="validation")
        callbacks = list(callbacks or [])
        callbacks.insert(0, mtl_callbacks.SkipReport(self))
        callbacks.insert(1, mtl_callbacks.BalancerEpochHook(self))
        empty_check = input_checks.EmptyDataCheck()
        callbacks.insert(2, empty_check)
        callbacks.insert(3, mtl_callbacks.TaskReport(self))
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
        elif (_is_dict(x) and set(x) and set(x) <= set(self.task_names) and self.network is None
              and not isinstance(self.encoder, keras.Model)):
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
        # TensorFlow builds a model at the first trace of its step. Variables created inside a `tf.function` make it
        # trace the step a second time (every first call of `fit` paid two traces), and callbacks that need a built
        # model (BackupAndRestore) run before that trace: build at the start of `fit`/`evaluate`, as JAX and torch do.
        unbuilt = not self.built or (self.balancer is not None and not self.balancer.built)
        if unbuilt and getattr(self, "_distribute_strategy", None) is None and (
                iterator is not None or data_batch is not None):
            return self._symbolic_build(iterator=iterator, data_batch=data_batch)
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def save_weights(self, filepath, overwrite=True, max_shard_size=None):
        """As `keras.Model.save_weights`, written first to memory and then moved into place: on a full disk (or a
        folder that cannot be written) an `OSError` names the file, the previous file at `filepath` (e.g. the last
        good `BackupAndRestore` backup) is left whole, and the process does not crash (h5py segfaulted closing
        a weights file whose writes failed: `benchmarks/fault_soak.py`)."""
        path = str(filepath)
        if max_shard_size is not None or not path.endswith(".weights.h5") or (
                not overwrite and os.path.exists(path)):
            return super().save_weights(filepath, overwrite=overwrite, max_shard_size=max_shard_size)
        memory = "/dev/shm" if os.path.isdir("/dev/shm") else None
        with tempfile.TemporaryDirectory(dir=memory) as folder:
            staged = os.path.join(folder, os.path.basename(path))
            super().save_weights(staged, overwrite=True)
            partial = f"{path}.partial"
            try:
                shutil.copyfile(staged, partial)
                os.replace(partial, path)
            except OSError as error:
                if os.path.exists(partial):
                    os.remove(partial)
                raise OSError(error.errno, f"Could not write the weights file {path!r}: {error.strerror} "
                              "(a full disk or a folder that cannot be written?); the file there before, if any, "
                              "is unchanged") from error

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

    def export(self, filepath, format="tf_saved_model", **kwargs):
        mtl_export.prepare(self, format, kwargs.get("input_signature"))
        return super().export(filepath, format=format, **kwargs)

    # ------------------------------------------------------------------ config
    def get_config(self):
        if self.network is not None:
            config = {"name": self.name, "network": keras.saving.serialize_keras_object(self.network),
                      "shared_variables": self._graph.shared_config, "representation": self._graph.representation}
            if self._graph.subclassed:
                config["task_names"] = list(self.task_names)
            return config
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
        if "network" in config:
            network = keras.saving.deserialize_keras_object(config.pop("network"), custom_objects=custom_objects)
            return cls.from_model(network, **config)
        encoder = keras.saving.deserialize_keras_object(config.pop("encoder"), custom_objects=custom_objects)
        heads = {
            t: keras.saving.deserialize_keras_object(h, custom_objects=custom_objects)
            for t, h in config.pop("heads").items()
        }
        return cls(encoder=encoder, heads=heads, **config)

