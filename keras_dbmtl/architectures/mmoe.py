"""MMoE: multi-gate mixture of experts (Ma et al., KDD 2018).

n experts e_1..e_n, shared by all tasks, and one softmax gate per task over them (Eqs. 5-6 of the paper):

    g^t(x) = softmax(W_gt x),   W_gt in R^{n x d}                                     (6)
    f^t(x) = sum_{i=1..n} g^t(x)_i e_i(x)                                             (5)

and task t's tower (the `MultiTaskModel` head) reads f^t(x). The encoder returns `{task: f^t(x)}`.

Which variables are whose: the experts are shared (the balancer acts on them); the gate of task t
(`<name>_gate_<t>`) is task t's own: it only changes f^t. Trainable parameters, with input width d, experts of
widths (h_1, .., h_m) and T tasks: n * sum_k (h_{k-1} h_k + h_k) (h_0 = d) + T * n * d (+ T * n gate biases with
`gate_bias=True`; the paper's gates have none).

```python
import keras, numpy as np, keras_dbmtl
from keras_dbmtl import architectures

encoder = architectures.MMoE(["click", "time"], num_experts=4, expert_units=(16,))
model = keras_dbmtl.MultiTaskModel(
    encoder=encoder,
    heads=architectures.towers(encoder, {"click": keras.layers.Dense(1), "time": keras.layers.Dense(1)}),
    task_layers=encoder.task_layers(),
)
model.compile(optimizer="adam", loss={"click": "mse", "time": "mse"}, balancer="dbmtl")
x = np.random.default_rng(0).normal(size=(32, 8)).astype("float32")
model.fit(x, {"click": x[:, :1], "time": x[:, 1:2]}, epochs=1, verbose=0)
weights = encoder.gate_weights(x)                    # dict task -> (32, 4), rows sum to one
```
"""

import keras
from keras import ops

from keras_dbmtl.architectures.base import MultiTaskLayer, _check_units, dense_stack, mixture


@keras.saving.register_keras_serializable(package="keras_dbmtl")
class MMoE(MultiTaskLayer):
    """Multi-gate mixture of experts.

    Args:
        tasks: task names (the keys of the returned dict and of the model's heads).
        num_experts: n, the number of shared experts.
        expert_units: widths of each expert's Dense layers (an MLP; the last width is the output width).
        expert_activation: activation of the experts' layers.
        gate_bias: whether the gates' linear maps have a bias (False in the paper, Eq. 6).
    """

    default_name = "mmoe"

    def __init__(self, tasks, num_experts=4, expert_units=(64,), expert_activation="relu", gate_bias=False,
                 **kwargs):
        super().__init__(tasks, **kwargs)
        if int(num_experts) < 1:
            raise ValueError(f"MMoE needs num_experts >= 1; received {num_experts}.")
        self.num_experts = int(num_experts)
        self.expert_units = _check_units(expert_units, "expert_units")
        self.expert_activation = expert_activation
        self.gate_bias = bool(gate_bias)
        self.experts = [dense_stack(self.expert_units, expert_activation, self._sub(f"expert_{i}"))
                        for i in range(self.num_experts)]
        self.gates = {t: keras.layers.Dense(self.num_experts, use_bias=self.gate_bias, name=self._sub(f"gate_{t}"))
                      for t in self.tasks}

    def task_layers(self):
        return {t: [self._sub(f"gate_{t}")] for t in self.tasks}

    def gate_weights(self, inputs):
        """dict task -> g^t(x) (Eq. 6), shape (..., num_experts)."""
        return {t: ops.softmax(self.gates[t](inputs), axis=-1) for t in self.tasks}

    def call(self, inputs, training=None):
        outputs = [expert(inputs, training=training) for expert in self.experts]
        return {t: mixture(g, outputs) for t, g in self.gate_weights(inputs).items()}

    def get_config(self):
        return {**super().get_config(), "num_experts": self.num_experts, "expert_units": list(self.expert_units),
                "expert_activation": self.expert_activation, "gate_bias": self.gate_bias}
