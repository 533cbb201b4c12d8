"""CGC: customized gate control (Tang et al., RecSys 2020, Section 4.2): one PLE extraction level.

Every task t has m_t experts of its own and shares m_s experts with the others; its gate mixes the two:

    g^t(x) = softmax(W_t x)                                                          (3)
    y^t(x) = g^t(x) · [E_{t,1}(x), .., E_{t,m_t}(x), E_{s,1}(x), .., E_{s,m_s}(x)]   (2, 4)

and task t's tower reads y^t(x). Which variables are whose: the shared experts are shared; task t's experts and
gate are task t's own (nothing else reads them). Parameters: (T m_t + m_s) P(d, u) + T d (m_t + m_s), with
P(d, u) an expert MLP's weights and biases.

```python
import keras, numpy as np, keras_dbmtl
from keras_dbmtl import architectures

encoder = architectures.CGC(["a", "b"], task_experts=2, shared_experts=2, expert_units=(16,))
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

from keras_dbmtl.architectures.ple import PLE


@keras.saving.register_keras_serializable(package="keras_dbmtl")
class CGC(PLE):
    """Customized gate control: `PLE` with one extraction level (same arguments, without `num_levels`)."""

    default_name = "cgc"

    def __init__(self, tasks, task_experts=1, shared_experts=1, expert_units=(64,), expert_activation="relu",
                 gate_bias=False, **kwargs):
        kwargs.pop("num_levels", None)
        super().__init__(tasks, num_levels=1, task_experts=task_experts, shared_experts=shared_experts,
                         expert_units=expert_units, expert_activation=expert_activation, gate_bias=gate_bias,
                         **kwargs)

    def get_config(self):
        config = super().get_config()
        config.pop("num_levels")
        return config
