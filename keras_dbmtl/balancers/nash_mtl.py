"""Nash-MTL: multi-task learning as a bargaining game (Navon et al., ICML 2022).

    G = J J^T / ||J J^T||_F                       (the official code normalises the Gramian)
    find alpha > 0 with  G alpha = 1 / alpha      (Section 3: the Nash bargaining solution, elementwise)
    d = sum_t alpha_t g_t,   clipped to ||d|| <= max_norm;   psi_t <- psi_t - lr alpha_t grad l_t

The official code approximates alpha by a sequence of convex problems (cvxpy, at most `optim_niter` = 20). Here
alpha is the exact solution, computed in the compiled step by `solvers.power_fair_weights` (Newton's method with a line search
on the strictly convex potential alpha^T G alpha / 2 - sum_t log alpha_t, 30 iterations, warm-started from the
previous step's alpha, a state variable, like the official code). Defaults as the paper's code: max_norm = 1.0 (0 turns
clipping off), update_weights_every = 1. The heads' gradients are scaled by alpha (the weighted loss
sum_t alpha_t l_t of the official code; the DB-MTL paper lists Nash-MTL among such methods), not clipped.
"""

from keras import ops

from keras_dbmtl.balancers import solvers
from keras_dbmtl.balancers._checks import check_hyperparameters
from keras_dbmtl.balancers.base import Aggregation, GramianBalancer
from keras_dbmtl.balancers.registry import register


@register("nash_mtl")
class NashMTL(GramianBalancer):
    """Nash-MTL: the Nash bargaining solution G alpha = 1/alpha. Cost: T backward + O(T^2 P) Gramian.

    Args:
        max_norm: clip the shared direction's norm to this (default 1.0; 0 disables).
        update_weights_every: recompute alpha every this many steps (default 1).
    """

    def __init__(self, max_norm=1.0, update_weights_every=1, loss_transform=None, eps=1e-8, **kwargs):
        super().__init__(loss_transform=loss_transform, eps=eps, **kwargs)
        check_hyperparameters(self, max_norm=(max_norm, "[0, inf)"),
                              update_weights_every=(update_weights_every, "int [1, inf)"))
        self.max_norm = float(max_norm)
        self.update_weights_every = int(update_weights_every)

    def build(self, num_tasks, num_shared_parameters, task_names=None, shared_shapes=None):
        super().build(num_tasks, num_shared_parameters, task_names, shared_shapes)
        self.alpha = self.state_variable((num_tasks,), "alpha", initializer="ones")     # warm start

    def aggregate(self, losses, task_jacobian):
        gramian = task_jacobian.gramian()
        step = ops.cast(self.iterations, "float32")
        self.next_step()
        normalized = gramian / (ops.sqrt(ops.sum(gramian * gramian)) + self.eps)
        alpha = solvers.power_fair_weights(normalized, 1.0, start=ops.convert_to_tensor(self.alpha))
        refresh = ops.logical_and(ops.equal(ops.mod(step, float(self.update_weights_every)), 0.0),
                                  ops.all(ops.isfinite(alpha)))
        alpha = ops.where(refresh, alpha, self.alpha.value)
        self.alpha.assign(alpha)
        weights = alpha
        if self.max_norm > 0.0:
            norm = ops.sqrt(ops.maximum(ops.sum(alpha * ops.matmul(gramian, alpha)), 0.0))   # ||d||
            weights = alpha * ops.minimum(1.0, self.max_norm / (norm + 1e-6))
        return Aggregation(task_weights=weights, head_weights=alpha)

    def get_config(self):
        config = super().get_config()
        config.update({"max_norm": self.max_norm, "update_weights_every": self.update_weights_every})
        return config
