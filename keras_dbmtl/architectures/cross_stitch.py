"""Cross-stitch networks (Misra et al., CVPR 2016): one column per task, mixed linearly between stages.

Every task t has its own copy of each stage; between stage i and i+1 a cross-stitch unit with a learnable T x T
matrix alpha_i mixes the columns (Eq. 1 of the paper, one alpha per pair of tasks):

    input of stage i+1 of task t = sum_j alpha_i[t, j] * output of stage i of task j

The encoder returns `{task: output of the last stage of column t}`. alpha starts at `self_weight` on the diagonal
and `other_weight` off it (the paper's 0.9 / 0.1).

Which variables are whose (exact: a task's own variables must not reach another task's output): task t owns the
last stage of its column (`<name>_<t>_stage_<S-1>`); every earlier stage of every column reaches every task
through the units, so those stages and the units are shared variables, balanced together. (The scene
application's ResNet version gives each task its whole column and leaves the cross-task gradients of the earlier
stages out, as its docstring says.) Parameters: T sum_i P_i + (S - 1) T^2 for S stages of P_i parameters.

```python
import keras, numpy as np, keras_dbmtl
from keras_dbmtl import architectures

encoder = architectures.CrossStitchNetwork(
    ["a", "b"], stages=[keras.layers.Dense(16, activation="relu"), keras.layers.Dense(8, activation="relu")])
model = keras_dbmtl.MultiTaskModel(
    encoder=encoder,
    heads=architectures.towers(encoder, {"a": keras.layers.Dense(1), "b": keras.layers.Dense(1)}),
    task_layers=encoder.task_layers(),
)
model.compile(optimizer="adam", loss="mse", balancer="dbmtl")
x = np.random.default_rng(0).normal(size=(32, 8)).astype("float32")
model.fit(x, {"a": x[:, :1], "b": x[:, 1:2]}, epochs=1, verbose=0)
```
"""

import copy

import keras
import numpy as np
from keras import ops

from keras_dbmtl.architectures.base import MultiTaskLayer


@keras.saving.register_keras_serializable(package="keras_dbmtl")
class CrossStitch(keras.layers.Layer):
    """A cross-stitch unit: T same-shaped tensors -> T tensors, `out[t] = sum_j alpha[t, j] in[j]`."""

    def __init__(self, num_tasks, self_weight=0.9, other_weight=0.1, **kwargs):
        super().__init__(**kwargs)
        self.num_tasks = int(num_tasks)
        self.self_weight = float(self_weight)
        self.other_weight = float(other_weight)

    def build(self, input_shape):
        initial = np.full((self.num_tasks, self.num_tasks), self.other_weight, "float32")
        np.fill_diagonal(initial, self.self_weight)
        self.alpha = self.add_weight(shape=(self.num_tasks, self.num_tasks),
                                     initializer=keras.initializers.Constant(initial), name="alpha")

    def call(self, inputs):
        if len(inputs) != self.num_tasks:
            raise ValueError(f"CrossStitch expects {self.num_tasks} feature maps, got {len(inputs)}.")
        stacked = ops.stack(inputs, axis=0)                       # (T, ...)
        mixed = ops.tensordot(ops.cast(self.alpha, stacked.dtype), stacked, axes=1)
        return [mixed[t] for t in range(self.num_tasks)]

    def compute_output_shape(self, input_shape):
        return [tuple(input_shape[0])] * self.num_tasks

    def get_config(self):
        return {**super().get_config(), "num_tasks": self.num_tasks, "self_weight": self.self_weight,
                "other_weight": self.other_weight}


def clone_layer(config, name):
    """A new layer (fresh weights, the given name) from a serialized layer. Each clone is its own object, even
    while Keras' loader shares objects between configs that name the same one."""
    config = copy.deepcopy(dict(config))
    config.pop("shared_object_id", None)
    config["config"] = {**config["config"], "name": name}
    return keras.layers.deserialize(config)


@keras.saving.register_keras_serializable(package="keras_dbmtl")
class CrossStitchNetwork(MultiTaskLayer):
    """T columns of the given stages joined by cross-stitch units.

    Args:
        tasks: task names.
        stages: Keras layers, the stages of one column in order; each task gets its own copy of each (a new
            layer from the stage's configuration). Every stage's output must have the same shape in all columns.
        self_weight, other_weight: initial diagonal / off-diagonal entries of the units' alpha (paper: 0.9, 0.1).
    """

    default_name = "cross_stitch"

    def __init__(self, tasks, stages, self_weight=0.9, other_weight=0.1, **kwargs):
        super().__init__(tasks, **kwargs)
        if not stages or not all(isinstance(s, (keras.layers.Layer, dict)) for s in stages):
            raise ValueError(f"CrossStitchNetwork needs `stages`: a list of Keras layers; received {stages!r}.")
        self.stage_configs = [s if isinstance(s, dict) else keras.layers.serialize(s) for s in stages]
        self.self_weight, self.other_weight = float(self_weight), float(other_weight)
        self.columns = {t: [clone_layer(s, self._sub(f"{t}_stage_{i}")) for i, s in enumerate(self.stage_configs)]
                        for t in self.tasks}
        self.units = [CrossStitch(len(self.tasks), self.self_weight, self.other_weight, name=self._sub(f"unit_{i}"))
                      for i in range(len(stages) - 1)]

    def task_layers(self):
        last = len(self.units)
        return {t: [self._sub(f"{t}_stage_{last}")] for t in self.tasks}

    def call(self, inputs, training=None):
        features = [inputs] * len(self.tasks)
        for i in range(len(self.units) + 1):
            if i > 0:
                features = self.units[i - 1](features)
            features = [self.columns[t][i](x, training=training) for t, x in zip(self.tasks, features)]
        return dict(zip(self.tasks, features))

    def get_config(self):
        return {**super().get_config(), "stages": self.stage_configs, "self_weight": self.self_weight,
                "other_weight": self.other_weight}
