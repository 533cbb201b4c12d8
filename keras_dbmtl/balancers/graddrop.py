r"""GradDrop: gradient sign dropout (Chen et al., "Just Pick a Sign", NeurIPS 2020).

$$
\begin{aligned}
P &= \tfrac{1}{2} \Big(1 + \textstyle\sum_t g_t \big/ \sum_t |g_t|\Big) \qquad \text{sign purity, per entry; Section 3} \\
U &\sim \operatorname{Uniform}(0, 1), \text{ one draw per entry} \\
M_t &= [P > U] \, [g_t > 0] + [P < U] \, [g_t < 0] \qquad \text{keep one sign per entry} \\
M_t &\leftarrow k + (1 - k) \, M_t \qquad \text{leak } k \text{, default 0} \\
d &= \textstyle\sum_t M_t \odot g_t
\end{aligned}
$$

Deviation, documented: the paper applies GradDrop to the gradients of a shared *activation* (summed over the batch
dimension); the model gives the balancer the per-task gradients of the shared *parameters*, so the masks are drawn
per parameter entry (the construction is otherwise identical). Needs the Jacobian (elementwise): a
`JacobianBalancer`. Logged weight: the fraction of task t's gradient entries kept.
"""

import keras
from keras import ops

from keras_dbmtl.balancers._checks import check_hyperparameters
from keras_dbmtl.balancers.base import Aggregation, Disclaimed, JacobianBalancer
from keras_dbmtl.balancers.registry import register


@register("graddrop")
class GradDrop(JacobianBalancer):
    """GradDrop: randomly keeps, entry by entry, the positive or the negative task gradients. Cost: T backward.

    Args:
        leak: k in [0, 1], the share of every gradient always kept (default 0.0).
        seed: seed of the balancer's `SeedGenerator`.
    """

    plain_single_task = True
    permutation_equivariant = Disclaimed("random masks")
    amortisable = Disclaimed("an element-wise random mask of the gradients, not task weights")

    def __init__(self, leak=0.0, seed=None, loss_transform=None, eps=1e-8, **kwargs):
        super().__init__(loss_transform=loss_transform, eps=eps, **kwargs)
        check_hyperparameters(self, leak=(leak, "[0, 1]"))
        self.leak = float(leak)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def aggregate(self, losses, task_jacobian):
        gradients = task_jacobian.matrix()                                        # (T, P)
        purity = 0.5 * (1.0 + ops.sum(gradients, axis=0) / (ops.sum(ops.abs(gradients), axis=0) + self.eps))
        draw = keras.random.uniform(ops.shape(purity), seed=self.seed_generator)
        keep_positive = ops.cast(purity > draw, "float32")[None, :]
        keep_negative = ops.cast(purity < draw, "float32")[None, :]
        mask = keep_positive * ops.cast(gradients > 0.0, "float32") + keep_negative * ops.cast(gradients < 0.0, "float32")
        mask = self.leak + (1.0 - self.leak) * mask
        direction = ops.sum(mask * gradients, axis=0)
        return Aggregation(task_weights=ops.mean(mask, axis=1), shared_direction=direction)

    def get_config(self):
        config = super().get_config()
        config.update({"leak": self.leak, "seed": self.seed})
        return config
