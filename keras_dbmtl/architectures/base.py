"""What every architecture shares: the task-owned sub-layers, the towers that read one task's features, experts.

An architecture here is a Keras layer used as the `encoder` of `keras_dbmtl.MultiTaskModel`. It returns a dict
task -> features, and it knows which of its sub-layers only one task uses (`task_layers()`): pass that to the
model, and wrap each head in a `TaskTower` so that it reads its own task's features:

```python
import keras, keras_dbmtl
from keras_dbmtl import architectures

encoder = architectures.MMoE(["a", "b"], num_experts=4, expert_units=(16,))
model = keras_dbmtl.MultiTaskModel(
    encoder=encoder,
    heads=architectures.towers(encoder, {"a": keras.layers.Dense(1), "b": keras.layers.Dense(1)}),
    task_layers=encoder.task_layers(),
)
```

The split must be exact: the model differentiates a task-owned variable with its own task's loss only, so a
sub-layer listed in `task_layers()[t]` must not influence any other task's output. Each architecture says in its
docstring which sub-layers that is, and the tests check it by differentiating every task's loss.
"""

import keras
from keras import ops
from keras.src import backend as keras_backend
from keras.src.utils import naming


def _check_tasks(tasks):
    tasks = list(tasks)
    if not tasks or not all(isinstance(t, str) and t for t in tasks) or len(set(tasks)) != len(tasks):
        raise ValueError(f"`tasks` must be a non-empty list of distinct task names (strings); received {tasks!r}.")
    return tasks


def _check_units(units, what):
    units = tuple(int(u) for u in (units if isinstance(units, (list, tuple)) else (units,)))
    if not units or min(units) < 1:
        raise ValueError(f"`{what}` must be one or more positive layer widths, e.g. (64, 32); received {units!r}.")
    return units


def dense_stack(units, activation, name):
    """Dense layers of the given widths, each followed by `activation` (an expert or a tower)."""
    return keras.Sequential([keras.layers.Dense(u, activation=activation, name=f"dense_{i}")
                             for i, u in enumerate(units)], name=name)


def dense_stack_parameters(input_dim, units):
    """Closed form of `dense_stack`'s trainable parameter count (weights and biases)."""
    total, previous = 0, int(input_dim)
    for u in units:
        total += previous * u + u
        previous = u
    return total


def mixture(gate_weights, expert_outputs):
    """sum_i g_i * e_i: gate weights (..., n) over n expert outputs, each (..., d)."""
    stacked = ops.stack(expert_outputs, axis=-2)                                   # (..., n, d)
    return ops.sum(ops.expand_dims(ops.cast(gate_weights, stacked.dtype), -1) * stacked, axis=-2)


class MultiTaskLayer(keras.layers.Layer):
    """Base of the architectures: `tasks`, `task_layers()`, and a build that runs the call once symbolically
    (so that every sub-layer, whatever its input, is built before the model splits the variables)."""

    default_name = "architecture"

    def __init__(self, tasks, **kwargs):
        if not kwargs.get("name"):
            kwargs["name"] = naming.auto_name(self.default_name)           # "mmoe", "mmoe_1", ...
        super().__init__(**kwargs)
        self.tasks = _check_tasks(tasks)

    def _sub(self, suffix):
        """The name of a sub-layer: this layer's name first, so that two architectures in one model differ."""
        return f"{self.name}_{suffix}"

    def task_layers(self):
        """dict task -> names of the sub-layers only that task uses (`MultiTaskModel(task_layers=...)`)."""
        raise NotImplementedError

    def build(self, input_shape):
        keras_backend.compute_output_spec(self.call, keras.KerasTensor(tuple(input_shape), dtype=self.compute_dtype))
        self.built = True

    def get_config(self):
        return {**super().get_config(), "tasks": list(self.tasks)}


@keras.saving.register_keras_serializable(package="keras_dbmtl")
class TaskTower(keras.layers.Layer):
    """A task's head over an architecture that returns a dict task -> features: applies `tower` to
    `inputs[task]`. Its variables are the tower's (the task's own variables in `MultiTaskModel`)."""

    def __init__(self, task, tower, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(tower, keras.layers.Layer):
            raise ValueError(f"The tower of task {task!r} must be a Keras layer; received {tower!r}.")
        self.task = task
        self.tower = tower

    def _select(self, inputs):
        if not isinstance(inputs, dict) or self.task not in inputs:
            keys = sorted(inputs) if isinstance(inputs, dict) else type(inputs).__name__
            raise ValueError(f"TaskTower({self.task!r}) expects the encoder's dict task -> features; received "
                             f"{keys}. Use it over an architecture of keras_dbmtl.architectures.")
        return inputs[self.task]

    def build(self, input_shape):
        if not self.tower.built:                     # a tower loaded from a .keras file is built already
            self.tower.build(tuple(self._select(input_shape)))
        self.built = True

    def call(self, inputs, training=None):
        return self.tower(self._select(inputs), training=training)

    def compute_output_shape(self, input_shape):
        return self.tower.compute_output_shape(tuple(self._select(input_shape)))

    def get_config(self):
        return {**super().get_config(), "task": self.task, "tower": keras.saving.serialize_keras_object(self.tower)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["tower"] = keras.saving.deserialize_keras_object(config["tower"])
        return cls(**config)


def towers(encoder, heads):
    """dict task -> `TaskTower(task, head)` for `MultiTaskModel(heads=...)`, checking the tasks match the
    encoder's."""
    tasks = list(getattr(encoder, "tasks", heads))
    if sorted(heads) != sorted(tasks):
        raise ValueError(f"The heads' tasks {sorted(heads)} differ from the encoder's tasks {sorted(tasks)}.")
    return {t: TaskTower(t, heads[t], name=f"{t}_tower") for t in tasks}
