r"""CAGrad: conflict-averse gradient descent (Liu et al., NeurIPS 2021).

$$
\begin{aligned}
&\max_d \min_t \, g_t \cdot d \ \ \text{s.t.} \ \lVert d - g_0 \rVert \le c \lVert g_0 \rVert, \quad g_0 = \tfrac{1}{T} \textstyle\sum_t g_t
    \qquad \text{the primal problem} \\
w^* &= \operatorname*{argmin}_{w \in \text{simplex}} \; g_w \cdot g_0 + c \lVert g_0 \rVert \lVert g_w \rVert, \quad g_w = \textstyle\sum_t w_t g_t
    \qquad \text{its dual} \\
d &= g_0 + \frac{c \lVert g_0 \rVert}{\lVert g_{w^*} \rVert} \, g_{w^*} \qquad \text{Algorithm 1} \\
d &\leftarrow d / (1 + c^2) \qquad \text{rescale} = 1
\end{aligned}
$$

Defaults: c = 0.5, rescale = 1 (the official code and LibMTL); rescale = 0 keeps d, rescale = 2 divides by
(1 + c). c = 0 gives the mean gradient. Every quantity is a product with the Gramian: needs = "gramian", and the
result is task weights $w_t = (1/T + \lambda w^*_t) / \mathrm{rescale}$. The dual is solved in the compiled step by
`solvers.cagrad_weights` (projected gradient, fixed iterations) instead of scipy's SLSQP. Heads receive their own
task's gradient. Measured accuracy (float32 against float64 over the scale battery,
`tests/balancers/test_scale_battery.py`): $\lVert d - d^* \rVert \le 10^{-4} \lVert g_0 \rVert$ (measured 5.8e-6) against a tight
SLSQP solve of the dual.
"""

from keras import ops

from keras_dbmtl.balancers import solvers
from keras_dbmtl.balancers._checks import check_hyperparameters
from keras_dbmtl.balancers.base import Aggregation, Disclaimed, GramianBalancer
from keras_dbmtl.balancers.registry import register


@register("cagrad")
class CAGrad(GramianBalancer):
    """CAGrad: the direction maximising the worst task improvement within a ball around the mean gradient.

    Cost: T backward + O(T^2 P) Gramian.

    Args:
        c: radius of the ball, relative to ||g_0|| (default 0.5).
        rescale: 0, 1 (default) or 2, the final division (none, 1 + c^2, 1 + c).
    """

    plain_single_task = Disclaimed("d = (1 + c) / (1 + c^2) g with the default rescale=1")
    permutation_equivariant = True
    amortisable = "weights from the last refresh"
    representation_level = True

    def __init__(self, c=0.5, rescale=1, loss_transform=None, eps=1e-8, **kwargs):
        super().__init__(loss_transform=loss_transform, eps=eps, **kwargs)
        check_hyperparameters(self, c=(c, "[0, 1)"), rescale=(rescale, "int [0, 2]"))
        self.c = float(c)
        self.rescale = int(rescale)

    def aggregate(self, losses, task_jacobian):
        gramian = task_jacobian.gramian()
        num = self.num_tasks
        mean = ops.ones((num,), "float32") / num
        if self.c == 0.0:
            return Aggregation(task_weights=mean)                                   # d = g_0
        w = solvers.cagrad_weights(gramian, self.c)                                 # the dual's w*
        g0_norm = ops.sqrt(ops.maximum(ops.mean(gramian), 0.0))                      # ||g_0||
        gw_norm = ops.sqrt(ops.maximum(ops.sum(w * ops.matmul(gramian, w)), 0.0))    # ||g_w||
        lam = self.c * g0_norm / ops.maximum(gw_norm, 1e-30)                          # (no eps: scale-free)
        weights = mean + lam * w                                                    # d = g_0 + lambda g_w
        divisor = {0: 1.0, 1: 1.0 + self.c ** 2, 2: 1.0 + self.c}[self.rescale]
        return Aggregation(task_weights=weights / divisor)

    def get_config(self):
        config = super().get_config()
        config.update({"c": self.c, "rescale": self.rescale})
        return config
