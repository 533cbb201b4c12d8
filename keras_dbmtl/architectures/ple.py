"""PLE: progressive layered extraction (Tang et al., RecSys 2020), with several extraction levels.

Each extraction level l = 1..L has, for every task t, m_t task-specific experts E_t^l, and m_s shared experts
E_s^l. Task t's gate mixes its own experts and the shared ones (Eqs. 2-4 of the paper); below the last level a
shared gate mixes every expert of the level, and its output feeds the next level's shared experts (Eq. 5):

    g_t^l(h)  = softmax(W_t^l h_t^{l-1})                                             (3)
    h_t^l     = g_t^l · [E_t^l(h_t^{l-1}), E_s^l(h_s^{l-1})]                         (2, 4)
    h_s^l     = softmax(W_s^l h_s^{l-1}) · [E_1^l(h_1^{l-1}), .., E_T^l(h_T^{l-1}), E_s^l(h_s^{l-1})]   (l < L)
    h_t^0 = h_s^0 = x;   the encoder returns {task: h_t^L}.

With L = 1 this is CGC (`keras_dbmtl.architectures.CGC`).

Which variables are whose (exact: the model differentiates a task's own variables with that task's loss only):
task t owns its last-level experts E_t^L, its last-level gate and its gate at level L-1 (h_t^{L-1} only feeds
E_t^L and g_t^L). Its experts below the last level feed the shared gate, so every task's loss reaches them: they
are shared variables, balanced with the shared experts and the shared gates. Trainable parameters, with input
width d, expert widths (u_1, .., u_k) and d_l = d at level 1, u_k above (`P(d, u)` = an MLP's weights and
biases): sum_l [(T m_t + m_s) P(d_l, u) + T d_l (m_t + m_s) + [l < L] d_l (T m_t + m_s)] (no gate biases, as
in MMoE's Eq. 6; `gate_bias=True` adds one per gate output).

```python
import keras, numpy as np, keras_dbmtl
from keras_dbmtl import architectures

encoder = architectures.PLE(["ctr", "cvr"], num_levels=2, task_experts=1, shared_experts=2, expert_units=(16,))
model = keras_dbmtl.MultiTaskModel(
    encoder=encoder,
    heads=architectures.towers(encoder, {"ctr": keras.layers.Dense(1), "cvr": keras.layers.Dense(1)}),
    task_layers=encoder.task_layers(),
)
model.compile(optimizer="adam", loss={"ctr": "mse", "cvr": "mse"}, balancer="dbmtl")
x = np.random.default_rng(0).normal(size=(32, 8)).astype("float32")
model.fit(x, {"ctr": x[:, :1], "cvr": x[:, 1:2]}, epochs=1, verbose=0)
```
"""

import keras
from keras import ops

from keras_dbmtl.architectures.base import MultiTaskLayer, _check_units, dense_stack, mixture


@keras.saving.register_keras_serializable(package="keras_dbmtl")
class PLE(MultiTaskLayer):
    """Progressive layered extraction: `num_levels` stacked CGC levels with shared gates between them.

    Args:
        tasks: task names.
        num_levels: L, the number of extraction levels (1 = CGC).
        task_experts: m_t, the experts of each task at each level.
        shared_experts: m_s, the shared experts at each level.
        expert_units: widths of each expert's Dense layers (the last is the output width of a level).
        expert_activation: activation of the experts' layers.
        gate_bias: whether the gates have a bias (no, by default).
    """

    default_name = "ple"

    def __init__(self, tasks, num_levels=2, task_experts=1, shared_experts=1, expert_units=(64,),
                 expert_activation="relu", gate_bias=False, **kwargs):
        super().__init__(tasks, **kwargs)
        if int(num_levels) < 1 or int(task_experts) < 0 or int(shared_experts) < 0:
            raise ValueError(f"{type(self).__name__} needs num_levels >= 1 and task_experts, shared_experts >= 0; "
                             f"received {num_levels}, {task_experts}, {shared_experts}.")
        if int(task_experts) + int(shared_experts) < 1:
            raise ValueError("Each task's gate needs at least one expert: task_experts + shared_experts >= 1.")
        self.num_levels = int(num_levels)
        self.task_experts = int(task_experts)
        self.shared_experts = int(shared_experts)
        self.expert_units = _check_units(expert_units, "expert_units")
        self.expert_activation = expert_activation
        self.gate_bias = bool(gate_bias)
        self.levels = [self._make_level(level) for level in range(self.num_levels)]

    def _make_level(self, level):
        def experts(owner, count):
            return [dense_stack(self.expert_units, self.expert_activation, self._sub(f"level_{level}_{owner}_expert_{i}"))
                    for i in range(count)]

        def gate(owner, width):
            return keras.layers.Dense(width, use_bias=self.gate_bias, name=self._sub(f"level_{level}_{owner}_gate"))

        last = level == self.num_levels - 1
        own_width = self.task_experts + self.shared_experts
        return {
            "task_experts": {t: experts(t, self.task_experts) for t in self.tasks},
            "shared_experts": experts("shared", self.shared_experts),
            "task_gates": {t: gate(t, own_width) for t in self.tasks},
            "shared_gate": None if last else gate("shared", len(self.tasks) * self.task_experts + self.shared_experts),
        }

    def task_layers(self):
        last = self.num_levels - 1
        result = {}
        for t in self.tasks:
            names = [self._sub(f"level_{last}_{t}_expert_{i}") for i in range(self.task_experts)]
            names += [self._sub(f"level_{level}_{t}_gate") for level in range(max(last - 1, 0), last + 1)]
            result[t] = names
        return result

    def _forward(self, inputs, training=None):
        """(outputs, gates): gates is one dict per level: task -> g_t^l, and None -> the shared gate's weights."""
        task_inputs = {t: inputs for t in self.tasks}
        shared_input = inputs
        gates = []
        for level in self.levels:
            task_outputs = {t: [e(task_inputs[t], training=training) for e in level["task_experts"][t]]
                            for t in self.tasks}
            shared_outputs = [e(shared_input, training=training) for e in level["shared_experts"]]
            level_gates = {t: ops.softmax(level["task_gates"][t](task_inputs[t]), axis=-1) for t in self.tasks}
            new_inputs = {t: mixture(level_gates[t], task_outputs[t] + shared_outputs) for t in self.tasks}
            if level["shared_gate"] is not None:
                level_gates[None] = ops.softmax(level["shared_gate"](shared_input), axis=-1)
                every = [o for t in self.tasks for o in task_outputs[t]] + shared_outputs
                shared_input = mixture(level_gates[None], every)
            task_inputs = new_inputs
            gates.append(level_gates)
        return task_inputs, gates

    def gate_weights(self, inputs):
        """One dict per level: task -> g_t^l(x) (..., m_t + m_s), and the key None -> the shared gate's weights
        (..., T m_t + m_s) below the last level."""
        return self._forward(inputs)[1]

    def call(self, inputs, training=None):
        return self._forward(inputs, training)[0]

    def get_config(self):
        return {**super().get_config(), "num_levels": self.num_levels, "task_experts": self.task_experts,
                "shared_experts": self.shared_experts, "expert_units": list(self.expert_units),
                "expert_activation": self.expert_activation, "gate_bias": self.gate_bias}
