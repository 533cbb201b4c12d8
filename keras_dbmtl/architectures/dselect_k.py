"""DSelect-k: a differentiable top-k gate for mixtures of experts (Hazimeh et al., NeurIPS 2021).

MMoE's softmax gates replaced by DSelect-k gates. A gate holds k single-expert selectors; selector i picks one of
n experts through a binary code of m = ceil(log2 n) smooth bits, and a softmax over k weights mixes the selectors:

    S(t) = 0 (t <= -g/2);  -2 t^3 / g^3 + 3 t / (2 g) + 1/2 (|t| <= g/2);  1 (t >= g/2)   smooth-step (Eq. 4)
    r(z)_j = prod_{l=1..m} [S(z_l / tau) if bit l of j is 1 else 1 - S(z_l / tau)],  j = 0..2^m - 1   (Eq. 5)
    alpha  = sum_{i=1..k} softmax(w)_i r(z^(i))                                                    (Eq. 6)
    f^t(x) = sum_j alpha_j e_j(x)

z^(i) and w are variables (a static gate) or linear in x (`per_example=True`: z^(i) = A_i x, w = C x, the
paper's per-example gate). Once every |z_l / tau| >= g/2 the bits are exactly 0 or 1: each selector is one-hot
and the gate uses at most k experts (exactly k when the selectors pick different ones). Two ways get there: the
paper's entropy regulariser lambda sum_i H(r(z^(i))) (`entropy_regularization`, Eq. 8), and a temperature tau
that starts at 1 and is multiplied by `anneal_rate` at every training call, down to `min_temperature` (an
addition here: with `anneal_rate < 1` the selection is exactly sparse after log(min_t)/log(rate) steps).

When n is not a power of two the paper leaves 2^m - n codes unused; here code j selects expert j mod n, so that
every selector is a distribution over the n experts (it sums to one) at any temperature.

Which variables are whose: the experts are shared; task t's gate (`<name>_gate_<t>`) is task t's own. Parameters:
n P(d, u) for the experts, plus per task k m + k (static) or d (k m + k) (per-example), m = max(1, ceil(log2 n)).

```python
import keras, numpy as np, keras_dbmtl
from keras_dbmtl import architectures

encoder = architectures.DSelectK(["a", "b"], num_experts=8, k=2, expert_units=(16,), anneal_rate=0.9)
model = keras_dbmtl.MultiTaskModel(
    encoder=encoder,
    heads=architectures.towers(encoder, {"a": keras.layers.Dense(1), "b": keras.layers.Dense(1)}),
    task_layers=encoder.task_layers(),
)
model.compile(optimizer="adam", loss="mse", balancer="dbmtl")
x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
model.fit(x, {"a": x[:, :1], "b": x[:, 1:2]}, batch_size=8, epochs=20, verbose=0)  # tau = 0.9^160 -> 1e-6
alpha = keras.ops.convert_to_numpy(encoder.gate_weights(x)["a"])
assert ((alpha > 0).sum(axis=-1) <= 2).all() and np.allclose(alpha.sum(axis=-1), 1.0, atol=1e-5)
```
"""

import math

import keras
import numpy as np
from keras import ops

from keras_dbmtl.architectures.base import MultiTaskLayer, _check_units, dense_stack, mixture


def smooth_step(t, gamma):
    """The cubic smooth-step S(t) of Eq. 4: 0 below -gamma/2, 1 above gamma/2, C^1 in between."""
    t = ops.clip(t, -gamma / 2.0, gamma / 2.0)
    return -2.0 / gamma ** 3 * t ** 3 + 3.0 / (2.0 * gamma) * t + 0.5


def _code_matrices(num_experts):
    """(bits (2^m, m) in {0, 1}, fold (2^m, n) with fold[j, j mod n] = 1)."""
    m = max(1, math.ceil(math.log2(num_experts)))
    codes = np.arange(2 ** m)
    bits = ((codes[:, None] >> np.arange(m)[None, :]) & 1).astype("float32")
    fold = np.zeros((2 ** m, num_experts), "float32")
    fold[codes, codes % num_experts] = 1.0
    return bits, fold


@keras.saving.register_keras_serializable(package="keras_dbmtl")
class DSelectKGate(keras.layers.Layer):
    """One task's DSelect-k gate: `call(x)` returns the expert weights alpha, (num_experts,) for a static gate
    or (..., num_experts) per example. The temperature is a non-trainable variable of the gate."""

    def __init__(self, num_experts, k, per_example=False, gamma=1.0, anneal_rate=1.0, min_temperature=1e-6,
                 entropy_regularization=0.0, **kwargs):
        super().__init__(**kwargs)
        if int(num_experts) < 1 or not 1 <= int(k) <= int(num_experts):
            raise ValueError(f"DSelect-k needs 1 <= k <= num_experts; received k={k}, num_experts={num_experts}.")
        if not 0.0 < float(anneal_rate) <= 1.0 or float(min_temperature) <= 0.0 or float(gamma) <= 0.0:
            raise ValueError("DSelect-k needs gamma > 0, 0 < anneal_rate <= 1 and min_temperature > 0; received "
                             f"gamma={gamma}, anneal_rate={anneal_rate}, min_temperature={min_temperature}.")
        self.num_experts, self.k, self.per_example = int(num_experts), int(k), bool(per_example)
        self.gamma, self.anneal_rate = float(gamma), float(anneal_rate)
        self.min_temperature, self.entropy_regularization = float(min_temperature), float(entropy_regularization)
        bits, fold = _code_matrices(self.num_experts)
        self.num_bits = bits.shape[1]
        self._bits, self._fold = bits, fold

    def build(self, input_shape):
        d = int(input_shape[-1])
        z_init = keras.initializers.RandomUniform(-self.gamma / 2, self.gamma / 2)
        if self.per_example:
            self.z = self.add_weight(shape=(d, self.k * self.num_bits), initializer="glorot_uniform", name="z")
            self.w = self.add_weight(shape=(d, self.k), initializer="glorot_uniform", name="w")
        else:
            self.z = self.add_weight(shape=(self.k, self.num_bits), initializer=z_init, name="z")
            self.w = self.add_weight(shape=(self.k,), initializer="zeros", name="w")
        self.temperature = self.add_weight(shape=(), initializer="ones", trainable=False, name="temperature")

    def selectors(self, inputs):
        """r(z^(i)) folded onto the experts: (k, n) for a static gate, (..., k, n) per example."""
        if self.per_example:
            z = ops.matmul(inputs, ops.cast(self.z, inputs.dtype))
            z = ops.reshape(z, tuple(ops.shape(z)[:-1]) + (self.k, self.num_bits))
        else:
            z = self.z
        bit = smooth_step(ops.cast(z, "float32") / self.temperature, self.gamma)     # (..., k, m)
        bit = ops.expand_dims(bit, -2)                                                # (..., k, 1, m)
        bits = ops.convert_to_tensor(self._bits)                                      # (2^m, m)
        codes = ops.prod(bits * bit + (1.0 - bits) * (1.0 - bit), axis=-1)            # (..., k, 2^m)   Eq. 5
        return ops.matmul(codes, ops.convert_to_tensor(self._fold))                   # (..., k, n)

    def call(self, inputs, training=None):
        if training:
            self.temperature.assign(ops.maximum(self.temperature * self.anneal_rate, self.min_temperature))
        selectors = self.selectors(inputs)
        w = ops.matmul(inputs, ops.cast(self.w, inputs.dtype)) if self.per_example else self.w
        mix = ops.softmax(ops.cast(w, "float32"), axis=-1)                            # (..., k)
        alpha = ops.sum(ops.expand_dims(mix, -1) * selectors, axis=-2)                # (..., n)   Eq. 6
        if self.entropy_regularization:
            entropy = -ops.sum(selectors * ops.log(selectors + 1e-12), axis=-1)       # (..., k)   Eq. 8
            self.add_loss(self.entropy_regularization * ops.mean(ops.sum(entropy, axis=-1)))
        return alpha

    def get_config(self):
        return {**super().get_config(), "num_experts": self.num_experts, "k": self.k,
                "per_example": self.per_example, "gamma": self.gamma, "anneal_rate": self.anneal_rate,
                "min_temperature": self.min_temperature, "entropy_regularization": self.entropy_regularization}


@keras.saving.register_keras_serializable(package="keras_dbmtl")
class DSelectK(MultiTaskLayer):
    """A mixture of n shared experts with one DSelect-k gate per task.

    Args:
        tasks: task names.
        num_experts: n.
        k: the most experts each gate selects.
        expert_units, expert_activation: the experts' MLP (as in `MMoE`).
        per_example: gates computed from the input (the paper's per-example gate) or static variables.
        gamma: the smooth-step's width.
        anneal_rate, min_temperature: the temperature schedule (1.0: no annealing).
        entropy_regularization: lambda of the paper's entropy regulariser (0: off).
    """

    default_name = "dselect_k"

    def __init__(self, tasks, num_experts=8, k=2, expert_units=(64,), expert_activation="relu", per_example=True,
                 gamma=1.0, anneal_rate=1.0, min_temperature=1e-6, entropy_regularization=0.0, **kwargs):
        super().__init__(tasks, **kwargs)
        self.num_experts, self.k = int(num_experts), int(k)
        self.expert_units = _check_units(expert_units, "expert_units")
        self.expert_activation = expert_activation
        self.gate_config = dict(per_example=bool(per_example), gamma=float(gamma), anneal_rate=float(anneal_rate),
                                min_temperature=float(min_temperature),
                                entropy_regularization=float(entropy_regularization))
        self.experts = [dense_stack(self.expert_units, expert_activation, self._sub(f"expert_{i}"))
                        for i in range(self.num_experts)]
        self.gates = {t: DSelectKGate(self.num_experts, self.k, name=self._sub(f"gate_{t}"), **self.gate_config)
                      for t in self.tasks}

    def task_layers(self):
        return {t: [self._sub(f"gate_{t}")] for t in self.tasks}

    def gate_weights(self, inputs):
        """dict task -> alpha, the expert weights of Eq. 6 (no annealing step)."""
        return {t: self.gates[t](inputs) for t in self.tasks}

    def call(self, inputs, training=None):
        outputs = [expert(inputs, training=training) for expert in self.experts]
        return {t: mixture(self.gates[t](inputs, training=training), outputs) for t in self.tasks}

    def get_config(self):
        return {**super().get_config(), "num_experts": self.num_experts, "k": self.k,
                "expert_units": list(self.expert_units), "expert_activation": self.expert_activation,
                **self.gate_config}
