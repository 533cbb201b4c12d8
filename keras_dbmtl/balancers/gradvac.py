r"""GradVac: gradient vaccine (Wang et al., "Gradient Vaccine: Investigating and Improving Multi-task Optimization
in Massively Multilingual Models", ICLR 2021).

$$
\begin{aligned}
&\text{for each task } i \text{:} \quad g_i' = g_i \\
&\quad \text{for } j \ne i \text{ in a random order:} \qquad \text{Algorithm 1} \\
&\qquad \phi_{ij} = \cos(g_i', g_j) \\
&\qquad \text{if } \phi_{ij} < \hat\phi_{ij} \text{:} \quad (\hat\phi_{ij} \text{: EMA target of the cosine similarity}) \\
&\qquad\quad g_i' \mathrel{+}= g_j \, \frac{\lVert g_i' \rVert \big(\hat\phi_{ij} \sqrt{1 - \phi_{ij}^2} - \phi_{ij} \sqrt{1 - \hat\phi_{ij}^2}\big)}{\lVert g_j \rVert \sqrt{1 - \hat\phi_{ij}^2}} \\
&\qquad \hat\phi_{ij} \leftarrow (1 - \beta) \, \hat\phi_{ij} + \beta \, \phi_{ij} \\
&d = \textstyle\sum_i g_i'
\end{aligned}
$$

As with PCGrad, g_i' stays a linear combination of the original gradients, so the whole procedure (cosines and
norms included) runs on the T x T Gramian (a `GramianBalancer`) and the logged weights are the coefficients of d.
phi_hat (T x T, starts at 0) is a state variable. beta = 0.01 is the paper's; LibMTL's default is 0.5. The
targets are updated for every visited pair, as in Algorithm 1. Whole-model granularity (one phi_hat per pair).
No eps in the cosines (scale-free). Measured accuracy (first step) (float32 against float64 over the scale battery,
`tests/balancers/test_scale_battery.py`): $\lVert d - d^* \rVert \le 10^{-5}
\max_t \lVert g_t \rVert$ (measured 3.0e-6) against Algorithm 1 on the vectors in float64.
"""

import keras
from keras import ops

from keras_dbmtl.balancers import solvers
from keras_dbmtl.balancers._checks import check_hyperparameters
from keras_dbmtl.balancers.base import Aggregation, Disclaimed, GramianBalancer
from keras_dbmtl.balancers.registry import register


@register("gradvac")
class GradVac(GramianBalancer):
    """GradVac: aligns each pair of task gradients towards an EMA target cosine similarity.

    Cost: T backward + O(T^2 P) Gramian.

    Args:
        beta: EMA rate of the target similarities (default 0.01, the paper's).
        seed: seed of the balancer's `SeedGenerator` (the random task order).
    """

    plain_single_task = True
    permutation_equivariant = Disclaimed("random task order")
    amortisable = "coefficients from the last refresh; targets updated on refresh steps"
    representation_level = True

    def __init__(self, beta=0.01, seed=None, loss_transform=None, eps=1e-8, **kwargs):
        super().__init__(loss_transform=loss_transform, eps=eps, **kwargs)
        check_hyperparameters(self, beta=(beta, "[0, 1]"))
        self.beta = float(beta)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, num_tasks, num_shared_parameters, task_names=None, shared_shapes=None):
        super().build(num_tasks, num_shared_parameters, task_names, shared_shapes)
        self.targets = self.state_variable((num_tasks, num_tasks), "targets")              # phi_hat

    def aggregate(self, losses, task_jacobian):
        gramian = task_jacobian.gramian()
        num = self.num_tasks
        order = ops.argsort(keras.random.uniform((num, num), seed=self.seed_generator), axis=1)
        norms = ops.sqrt(ops.maximum(ops.diagonal(gramian), 0.0))
        tasks = ops.arange(num)

        def visit(k, carry):                                                       # one ops.fori_loop, not T copies
            coefficients, targets = carry                                          # g_i' = sum_j C_ij g_j
            other = ops.take(order, k, axis=1)
            pick = solvers.one_hot(other, num, "float32")
            visited = ops.not_equal(other, tasks)
            products = ops.matmul(coefficients, gramian)
            inner = ops.sum(products * pick, axis=1)                               # g_i' . g_j
            norm_i = ops.sqrt(ops.maximum(ops.sum(products * coefficients, axis=1), 0.0))
            norm_j = ops.sum(pick * norms[None, :], axis=1)
            phi = ops.clip(inner / ops.maximum(norm_i * norm_j, 1e-30), -1.0, 1.0)         # (no eps: scale-free)
            target = ops.sum(pick * targets, axis=1)
            root_phi, root_target = ops.sqrt(1.0 - phi * phi), ops.sqrt(1.0 - target * target)
            denominator = ops.maximum(norm_j * root_target, 1e-6 * norm_j + 1e-30)
            step = norm_i * (target * root_phi - phi * root_target) / denominator
            adjust = ops.logical_and(visited, phi < target)
            coefficients = coefficients + ops.where(adjust, step, 0.0)[:, None] * pick
            updated = ops.where(visited, (1.0 - self.beta) * target + self.beta * phi, target)
            return coefficients, targets + (updated - target)[:, None] * pick

        start = (ops.eye(num, dtype="float32"), ops.convert_to_tensor(self.targets))
        coefficients, targets = ops.fori_loop(0, num, visit, start)
        self.targets.assign(targets)
        return Aggregation(task_weights=ops.sum(coefficients, axis=0))

    def get_config(self):
        config = super().get_config()
        config.update({"beta": self.beta, "seed": self.seed})
        return config
