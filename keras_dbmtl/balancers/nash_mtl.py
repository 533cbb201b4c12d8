r"""Nash-MTL: multi-task learning as a bargaining game (Navon et al., ICML 2022).

$$
\begin{aligned}
G &= J J^\top \qquad \text{the real Gramian, Section 3.1; scale-equivariant} \\
&\text{find } \alpha > 0 \text{ with } G \alpha = 1 / \alpha \qquad \text{Section 3: the Nash bargaining solution, elementwise} \\
d &= \textstyle\sum_t \alpha_t g_t, \text{ clipped to } \lVert d \rVert \le \text{max\_norm}; \quad \psi_t \leftarrow \psi_t - \mathrm{lr} \, \alpha_t \nabla \ell_t
\end{aligned}
$$

The official code approximates alpha by a sequence of convex problems (cvxpy, at most `optim_niter` = 20). Here
alpha is the exact solution, computed in the compiled step by `solvers.power_fair_weights` (Newton's method with a
line search on the strictly convex potential, 30 iterations) in the variables beta_t = ||g_t|| alpha_t, where the
equation reads C beta = 1 / beta with C the cosine matrix: alpha = beta / ||g_t|| is exactly scale-equivariant.
It starts from the better of beta = 1 (exact for orthogonal gradients; the first step) and the previous step's
alpha (a state variable, like the official code), each rescaled to beta^T C beta = T. The clipping norm ||d|| is
computed from the gradients, not from alpha^T G alpha (which cancels in float32 for anti-collinear gradients).
Measured accuracy (float32 against float64 over the scale battery, `tests/balancers/test_scale_battery.py`),
full-rank problems: max_t |alpha_t / alpha*_t - 1| <= 1e-3 against Newton in
float64 (measured 7.4e-5, on T = 40 with 20 tasks at cosines ~0.95; <= 6e-6 on the others). Where
no positive solution exists (anti-collinear gradients) alpha grows large and the clipping bounds the step. Defaults
as the paper's code: max_norm = 1.0 (0 turns
clipping off), update_weights_every = 1. The heads' gradients are scaled by alpha (the weighted loss
sum_t alpha_t l_t of the official code; the DB-MTL paper lists Nash-MTL among such methods), not clipped.
"""

from keras import ops

from keras_dbmtl.balancers import solvers
from keras_dbmtl.balancers._checks import check_hyperparameters
from keras_dbmtl.balancers.base import Aggregation, Disclaimed, GramianBalancer
from keras_dbmtl.balancers.registry import register


def _better_start(cosines, previous):
    """The warm start (the previous beta) if it is positive and closer to C beta = 1/beta than beta = 1 (the exact
    solution for orthogonal gradients), else 1. Both are rescaled to beta^T C beta = T, which the solution
    satisfies. Before the first step alpha is 0, so the first step starts from 1."""
    num = cosines.shape[-1]
    ones = ops.ones((num,), cosines.dtype)

    def rescaled(beta):
        return beta * ops.sqrt(num / ops.maximum(ops.sum(beta * ops.matmul(cosines, beta)), 1e-30))

    def residual(beta):
        safe = ops.maximum(beta, 1e-30)
        return ops.sum(ops.square(ops.matmul(cosines, safe) * safe - 1.0))        # ||beta * C beta - 1||^2

    warm = rescaled(previous)
    usable = ops.logical_and(ops.all(previous > 0.0), ops.all(ops.isfinite(warm)))
    better = ops.logical_and(usable, residual(warm) < residual(rescaled(ones)))
    return ops.where(better, warm, rescaled(ones))


@register("nash_mtl")
class NashMTL(GramianBalancer):
    """Nash-MTL: the Nash bargaining solution G alpha = 1/alpha. Cost: T backward + O(T^2 P) Gramian.

    Args:
        max_norm: clip the shared direction's norm to this (default 1.0; 0 disables).
        update_weights_every: recompute alpha every this many steps (default 1).
    """

    plain_single_task = Disclaimed(
        "the update is clipped to max_norm=1 (plain with max_norm=0, tested in test_nash_mtl.py)")
    permutation_equivariant = True
    amortisable = "weights from the last refresh; warm start updated on refresh steps"
    representation_level = True

    def __init__(self, max_norm=1.0, update_weights_every=1, loss_transform=None, eps=1e-8, **kwargs):
        super().__init__(loss_transform=loss_transform, eps=eps, **kwargs)
        check_hyperparameters(self, max_norm=(max_norm, "[0, inf)"),
                              update_weights_every=(update_weights_every, "int [1, inf)"))
        self.max_norm = float(max_norm)
        self.update_weights_every = int(update_weights_every)

    def build(self, num_tasks, num_shared_parameters, task_names=None, shared_shapes=None):
        super().build(num_tasks, num_shared_parameters, task_names, shared_shapes)
        self.alpha = self.state_variable((num_tasks,), "alpha")     # warm start; 0: none yet

    def aggregate(self, losses, task_jacobian):
        gramian = task_jacobian.gramian()
        step = ops.cast(self.iterations, "float32")
        self.next_step()
        # G alpha = 1/alpha on the real Gramian (Section 3.1), solved in the variables beta_t = ||g_t|| alpha_t:
        # C beta = 1/beta with C the cosine matrix (G = N C N, N = diag ||g_t||), so alpha = beta / ||g_t|| is exactly
        # scale-equivariant and float32 sees only the cosines, however far apart the gradient norms are.
        # A task with an exactly zero gradient (a dead ReLU branch) is left out of the equation (its alpha would
        # be infinite) and weighted as the mean of the others: `solvers.live_cosines`.
        norms, cosines, live = solvers.live_cosines(gramian)
        previous = ops.convert_to_tensor(self.alpha) * norms                     # warm start (0 before step 1)
        beta = solvers.power_fair_weights(cosines, 1.0, start=_better_start(cosines, previous))
        alpha = solvers.weights_for_dead_tasks(beta / norms, live)
        refresh = ops.logical_and(ops.equal(ops.mod(step, float(self.update_weights_every)), 0.0),
                                  ops.all(ops.isfinite(alpha)))
        alpha = ops.where(refresh, alpha, self.alpha.value)
        self.alpha.assign(alpha)
        weights = alpha
        if self.max_norm > 0.0:
            # ||d|| from the gradients themselves: alpha^T G alpha cancels catastrophically in float32 for
            # (anti-)collinear gradients (1.2 % past max_norm).
            blocks = task_jacobian.weighted_sum_blocks(alpha)
            norm = ops.sqrt(sum(ops.sum(ops.square(block)) for block in blocks))
            weights = alpha * ops.minimum(1.0, self.max_norm / ops.maximum(norm, 1e-30))
        return Aggregation(task_weights=weights, head_weights=alpha)

    def get_config(self):
        config = super().get_config()
        config.update({"max_norm": self.max_norm, "update_weights_every": self.update_weights_every})
        return config
