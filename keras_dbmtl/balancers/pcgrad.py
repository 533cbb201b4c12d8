r"""PCGrad: projecting conflicting gradients (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020).

$$
\begin{aligned}
&\text{for each task } i \text{:} \quad g_i^{PC} = g_i \\
&\quad \text{for } j \ne i \text{ in a random order:} \qquad \text{Algorithm 1} \\
&\qquad \text{if } g_i^{PC} \cdot g_j < 0 \text{:} \quad g_i^{PC} \leftarrow g_i^{PC} - \frac{g_i^{PC} \cdot g_j}{\lVert g_j \rVert^2} \, g_j \\
&d = \textstyle\sum_i g_i^{PC}
\end{aligned}
$$

Every g_i^PC is a linear combination of the original gradients, g_i^PC = sum_j C_ij g_j, and every inner
product the algorithm needs is an entry of C G (G = J J^T). So the surgery runs on the T x T Gramian (a
`GramianBalancer`) and the direction is d = (1^T C) J, formed block by block by the model: the logged task weights are
exactly the coefficients of the direction. The random order (one permutation per task, every step) comes from the
balancer's `SeedGenerator`. Heads receive their own task's gradient. Measured accuracy (float32 against float64 over
the scale battery, `tests/balancers/test_scale_battery.py`):
$\lVert d - d^* \rVert \le 10^{-5} \max_t \lVert g_t \rVert$ (measured 2.7e-6) against Algorithm 1 on the vectors in float64.
"""

import keras
from keras import ops

from keras_dbmtl.balancers import solvers
from keras_dbmtl.balancers.base import Aggregation, Disclaimed, GramianBalancer
from keras_dbmtl.balancers.registry import register


def pcgrad_coefficients(gramian, order, eps=1e-12):
    """C with g_i^PC = sum_j C_ij g_j, visiting for task i the tasks order[i, 0], order[i, 1], ... (itself skipped).

    The visits are one `ops.fori_loop` (a loop in the compiled program, not T unrolled copies: compile time stays
    flat in T, `benchmarks/task_loop_compile.py`)."""
    num = gramian.shape[-1]
    squared_norms = ops.diagonal(gramian)
    tasks = ops.arange(num)
    floor = eps * ops.max(squared_norms) + 1e-30

    def visit(k, coefficients):
        other = ops.take(order, k, axis=1)                                        # j for every i at once
        pick = solvers.one_hot(other, num, gramian.dtype)                       # E_ij = [j == order[i, k]]
        inner = ops.sum(ops.matmul(coefficients, gramian) * pick, axis=1)         # g_i^PC . g_j
        conflict = ops.logical_and(inner < 0.0, ops.not_equal(other, tasks))
        norm_j = ops.sum(pick * squared_norms[None, :], axis=1)                   # ||g_j||^2
        step = ops.where(conflict, inner / ops.maximum(norm_j, floor), 0.0)
        return coefficients - step[:, None] * pick                                # g_i^PC -= step g_j

    return ops.fori_loop(0, num, visit, ops.eye(num, dtype=gramian.dtype))


@register("pcgrad")
class PCGrad(GramianBalancer):
    """PCGrad: sum of the task gradients, each projected off the gradients it conflicts with.

    Cost: T backward + O(T^2 P) Gramian.

    Args:
        seed: seed of the balancer's `SeedGenerator` (the random task order).
    """

    plain_single_task = True
    permutation_equivariant = Disclaimed("random task order")
    amortisable = "projection coefficients from the last refresh (random task order drawn on refresh steps)"
    representation_level = True

    def __init__(self, seed=None, loss_transform=None, eps=1e-8, **kwargs):
        super().__init__(loss_transform=loss_transform, eps=eps, **kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def aggregate(self, losses, task_jacobian):
        gramian = task_jacobian.gramian()
        keys = keras.random.uniform((self.num_tasks, self.num_tasks), seed=self.seed_generator)
        order = ops.argsort(keys, axis=1)                                         # a random permutation per task
        coefficients = pcgrad_coefficients(gramian, order)
        return Aggregation(task_weights=ops.sum(coefficients, axis=0))            # d = sum_i g_i^PC

    def get_config(self):
        config = super().get_config()
        config["seed"] = self.seed
        return config
