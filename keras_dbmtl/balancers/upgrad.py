r"""UPGrad: unconflicting projection of gradients (Quinton and Rey, "Jacobian Descent for Multi-Objective
Optimization", 2024).

$$
\begin{aligned}
\pi_J(x) &= \operatorname*{argmin}_{y \,:\, J y \ge 0} \lVert y - x \rVert \qquad \text{Eq. 3: projection onto the dual cone of the rows} \\
\pi_J(J^\top u) &= J^\top v, \quad v = \operatorname*{argmin}_{v \ge u} v^\top G v \qquad \text{Proposition 1, } G = J J^\top \\
d &= \tfrac{1}{T} \textstyle\sum_t \pi_J(g_t) = J^\top \sum_t v^{(t)}, \quad v^{(t)} = \operatorname*{argmin}_{v \ge e_t / T} v^\top G v
    \qquad \pi_J \text{ is homogeneous}
\end{aligned}
$$

so J d >= 0: d conflicts with no task. As TorchJD/LibMTL, G is normalised by its trace (zero when the trace is
below `norm_eps`) and regularised by `reg_eps` I; defaults 1e-4 and 1e-4. The T quadratic programs (quadprog in
the reference) are solved together in the compiled step by `solvers.box_qp_weights`. Heads receive their own
task's gradient. Measured accuracy (float32 against float64 over the scale battery,
`tests/balancers/test_scale_battery.py`): $\lVert d - d^* \rVert \le 2 \cdot 10^{-5} \max_t \lVert g_t \rVert$ (measured 9.5e-6) against
BVLS in float64.
"""

from keras import ops

from keras_dbmtl.balancers import solvers
from keras_dbmtl.balancers._checks import check_hyperparameters
from keras_dbmtl.balancers.base import Aggregation, GramianBalancer
from keras_dbmtl.balancers.registry import register


def upgrad_weights(gramian, norm_eps=1e-4, reg_eps=1e-4):
    num = gramian.shape[-1]
    trace = ops.sum(ops.diagonal(gramian))
    normalized = ops.where(trace < norm_eps, 0.0, gramian / ops.maximum(trace, norm_eps))
    regularized = normalized + reg_eps * ops.eye(num, dtype=gramian.dtype)
    projections = solvers.box_qp_weights(regularized, ops.eye(num, dtype=gramian.dtype) / num)   # rows v^(t)
    return ops.sum(projections, axis=0)


@register("upgrad")
class UPGrad(GramianBalancer):
    """UPGrad: the mean of the task gradients, each projected onto the dual cone of all of them.

    Cost: T backward + O(T^2 P) Gramian.

    Args:
        norm_eps: trace below which the Gramian is treated as zero (default 1e-4).
        reg_eps: ridge added to the normalised Gramian (default 1e-4).
    """

    plain_single_task = True
    permutation_equivariant = True
    amortisable = "weights from the last refresh"
    representation_level = True

    def __init__(self, norm_eps=1e-4, reg_eps=1e-4, loss_transform=None, eps=1e-8, **kwargs):
        super().__init__(loss_transform=loss_transform, eps=eps, **kwargs)
        check_hyperparameters(self, norm_eps=(norm_eps, "[0, inf)"), reg_eps=(reg_eps, "[0, inf)"))
        self.norm_eps = float(norm_eps)
        self.reg_eps = float(reg_eps)

    def aggregate(self, losses, task_jacobian):
        weights = upgrad_weights(task_jacobian.gramian(), self.norm_eps, self.reg_eps)
        return Aggregation(task_weights=weights)

    def get_config(self):
        config = super().get_config()
        config.update({"norm_eps": self.norm_eps, "reg_eps": self.reg_eps})
        return config
