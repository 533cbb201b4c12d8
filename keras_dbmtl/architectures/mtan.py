"""MTAN: multi-task attention network (Liu et al., CVPR 2019) over any stack of shared stages.

A shared network of stages p_j = stage_j(p_{j-1}) (p_0 = x) and, for every task t, one soft-attention module
per stage. Stage j may be one layer or a pair [inner, last] (the paper's u_j = inner(p_{j-1}), p_j = last(u_j));
with one layer u_j = p_j. For task t (Section 3.2 of the paper):

    mask_j^t = attention_j^t(u_j)                              (j = 1)
    mask_j^t = attention_j^t(concat(u_j, f_{j-1}(a_{j-1}^t)))  (j > 1)
    a_j^t    = mask_j^t * p_j                                  (element-wise)

attention_j^t is Dense -> ReLU -> Dense -> sigmoid on the last axis (a 1x1 convolution on images), task t's own;
f_j is a shared layer between stages (the paper's shared 3x3 convolution; by default Dense to the next stage's
width with ReLU; pass `transfers` for images, e.g. a convolution with pooling). The encoder returns
`{task: a_S^t}`.

Which variables are whose: the stages and the transfers f_j are shared; task t's attention modules
(`<name>_<t>_attention_<j>`) reach only task t's output and are its own. Parameters of one attention module on a
stage of width C with input width I and hidden width H: I H + H + H C + C.

```python
import keras, numpy as np, keras_dbmtl
from keras_dbmtl import architectures

encoder = architectures.MTAN(
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

import keras
from keras import ops
from keras.src import backend as keras_backend

from keras_dbmtl.architectures.base import MultiTaskLayer


def _as_layer(item):
    return keras.layers.deserialize(item) if isinstance(item, dict) else item


@keras.saving.register_keras_serializable(package="keras_dbmtl")
class MTAN(MultiTaskLayer):
    """Task-specific soft attention over a shared stack of stages.

    Args:
        tasks: task names.
        stages: list of shared layers, or of pairs [inner, last] (the attention reads inner's output).
        attention_units: hidden width of the attention modules (None: the stage's width).
        transfers: optional list of S - 1 shared layers f_j (default: Dense(next stage's width, ReLU)).
    """

    default_name = "mtan"

    def __init__(self, tasks, stages, attention_units=None, transfers=None, **kwargs):
        super().__init__(tasks, **kwargs)
        stages = [[_as_layer(s) for s in stage] if isinstance(stage, (list, tuple)) else [_as_layer(stage)]
                  for stage in stages]
        if not stages or not all(len(s) in (1, 2) and all(isinstance(x, keras.layers.Layer) for x in s)
                                 for s in stages):
            raise ValueError("MTAN needs `stages`: a list whose items are Keras layers or pairs [inner, last] of "
                             f"layers; received {stages!r}.")
        if transfers is not None and len(transfers) != len(stages) - 1:
            raise ValueError(f"MTAN needs one transfer layer between each pair of stages ({len(stages) - 1}); "
                             f"received {len(transfers)}.")
        self.stages = stages
        self.attention_units = None if attention_units is None else int(attention_units)
        self.transfers = None if transfers is None else [_as_layer(f) for f in transfers]
        self.attention = None

    def task_layers(self):
        return {t: [self._sub(f"{t}_attention_{j}") for j in range(len(self.stages))] for t in self.tasks}

    def _shared(self, inputs, training=None):
        """[(u_j, p_j)] for every stage."""
        taps, p = [], inputs
        for stage in self.stages:
            u = stage[0](p, training=training)
            p = stage[-1](u, training=training) if len(stage) == 2 else u
            taps.append((u, p))
        return taps

    def build(self, input_shape):
        taps = keras_backend.compute_output_spec(self._shared, keras.KerasTensor(tuple(input_shape)))
        widths = [int(p.shape[-1]) for _, p in taps]
        if self.transfers is None:
            self.transfers = [keras.layers.Dense(widths[j + 1], activation="relu", name=self._sub(f"transfer_{j}"))
                              for j in range(len(widths) - 1)]

        def module(task, j):
            hidden = self.attention_units or widths[j]
            return keras.Sequential([keras.layers.Dense(hidden, activation="relu", name="dense_0"),
                                     keras.layers.Dense(widths[j], activation="sigmoid", name="dense_1")],
                                    name=self._sub(f"{task}_attention_{j}"))

        self.attention = {t: [module(t, j) for j in range(len(self.stages))] for t in self.tasks}
        super().build(input_shape)

    def call(self, inputs, training=None):
        taps = self._shared(inputs, training)
        outputs = {}
        for t in self.tasks:
            attended = None
            for j, (u, p) in enumerate(taps):
                mask_input = u if j == 0 else ops.concatenate(
                    [u, self.transfers[j - 1](attended, training=training)], axis=-1)
                attended = self.attention[t][j](mask_input, training=training) * p
            outputs[t] = attended
        return outputs

    def get_config(self):
        stages = [[keras.layers.serialize(x) for x in s] if len(s) == 2 else keras.layers.serialize(s[0])
                  for s in self.stages]
        transfers = None if self.transfers is None else [keras.layers.serialize(f) for f in self.transfers]
        return {**super().get_config(), "stages": stages, "attention_units": self.attention_units,
                "transfers": transfers}
