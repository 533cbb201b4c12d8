r"""FairGrad: fair resource allocation in multi-task learning (Ban and Ji, ICML 2024).

$$
\begin{aligned}
&\text{find } w > 0 \text{ with } (J J^\top) \, w = w^{-1/\alpha} \qquad \text{$\alpha$-fair allocation; Section 4 of the paper} \\
d &= \textstyle\sum_t w_t g_t; \quad \psi_t \leftarrow \psi_t - \mathrm{lr} \, w_t \nabla \ell_t
\end{aligned}
$$

alpha = 1 is proportional fairness (Nash-MTL's equation on the unnormalised Gramian), alpha -> infinity max-min
fairness. Default alpha = 1.0 (LibMTL's). The official code solves the equation with scipy's `least_squares`
from w = 1/T; here the solution is computed in the compiled step by `solvers.power_fair_weights` (Newton's method
with a line search on the strictly convex potential w^T G w / 2 - sum_t psi(w_t), psi' = w^(-1/alpha), 30
iterations) on the cosine matrix (see `fair_weights`). The weights multiply the task losses (heads included), as
the official weighted loss sum_t w_t l_t does. Measured accuracy (float32 against float64 over the scale battery,
`tests/balancers/test_scale_battery.py`), full-rank problems:
max_t |w_t / w*_t - 1| <= 1e-3 for alpha = 1 (measured 9.9e-5), <= 3e-3 for alpha = 2 (4.4e-4), against Newton
in float64; the worst cases are T = 40 with 20 nearly collinear tasks.
"""

from keras import ops

from keras_dbmtl.balancers import solvers
from keras_dbmtl.balancers._checks import check_hyperparameters
from keras_dbmtl.balancers.base import Aggregation, Disclaimed, GramianBalancer
from keras_dbmtl.balancers.registry import register


def fair_weights(gramian, alpha):
    """G w = w^(-1/alpha) solved in the variables v = N w (N = diag ||g_t||, G = N C N, C the cosine matrix):
    C v = ||g||^(1/alpha - 1) v^(-1/alpha). float32 then sees only the cosines, however far apart the norms are
    (on G itself the error reached 19 % with norms spanning 1e4). A task whose gradient is exactly zero (a dead
    ReLU branch) is left out of the equation and weighted as the mean of the others (`solvers.live_cosines`):
    it cannot pull the shared direction, and it must not stop the other tasks (its weight would be infinite)."""
    norms, cosines, live = solvers.live_cosines(gramian)
    coefficients = ops.power(norms, 1.0 / alpha - 1.0)
    weights = solvers.power_fair_weights(cosines, alpha, coefficients=coefficients) / norms
    return solvers.weights_for_dead_tasks(weights, live)


@register("fairgrad")
class FairGrad(GramianBalancer):
    """FairGrad: alpha-fair task weights solving G w = w^(-1/alpha). Cost: T backward + O(T^2 P) Gramian.

    Args:
        alpha: fairness parameter > 0 (default 1.0).
    """

    plain_single_task = Disclaimed("weight ||g||^(-2 / (1 + alpha))")
    permutation_equivariant = True
    amortisable = "weights from the last refresh (shared and heads)"
    representation_level = True

    def __init__(self, alpha=1.0, loss_transform=None, eps=1e-8, **kwargs):
        super().__init__(loss_transform=loss_transform, eps=eps, **kwargs)
        check_hyperparameters(self, alpha=(alpha, "(0, inf)"))
        self.alpha = float(alpha)

    def aggregate(self, losses, task_jacobian):
        weights = fair_weights(task_jacobian.gramian(), self.alpha)
        return Aggregation(task_weights=weights, head_weights=weights)

    def get_config(self):
        config = super().get_config()
        config["alpha"] = self.alpha
        return config
