"""IMTL-G: the gradient balancing half of IMTL (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021).

    u_t = g_t / ||g_t||,   D = [g_1 - g_2, ..., g_1 - g_T],   U = [u_1 - u_2, ..., u_1 - u_T]
    alpha_{2:T} = g_1 U^T (D U^T)^-1,   alpha_1 = 1 - sum_{t>=2} alpha_t      (Section 3, closed form)
    d = sum_t alpha_t g_t                 (d has equal projections d . u_t on every task's unit gradient)

Every product above is an entry of G = J J^T scaled by the norms, so IMTL-G needs only the Gramian. The
(T-1) x (T-1) system is solved with a pseudo-inverse, so degenerate cases (two tasks with the same gradient
direction) give a least-squares answer instead of a failure. Heads receive their own task's gradient.
"""

from keras import ops

from keras_dbmtl.balancers.base import Aggregation, GramianBalancer
from keras_dbmtl.balancers.registry import register


def imtl_g_weights(gramian, eps=1e-8):
    num = gramian.shape[-1]
    if num == 1:
        return ops.ones((1,), gramian.dtype)
    norms = ops.sqrt(ops.maximum(ops.diagonal(gramian), 0.0)) + eps
    unit = gramian / norms[None, :]                                                 # unit[i, j] = g_i . u_j
    g1_u = unit[0, 0] - unit[0, 1:]                                                 # g_1 . (u_1 - u_t)
    d_u = unit[0, 0] - unit[0, 1:][None, :] - unit[1:, 0][:, None] + unit[1:, 1:]   # (g_1 - g_a) . (u_1 - u_b)
    rest = ops.matmul(g1_u[None, :], ops.pinv(d_u))[0]                              # g_1 U^T (D U^T)^-1
    return ops.concatenate([ops.reshape(1.0 - ops.sum(rest), (1,)), rest])


@register("imtl_g")
class IMTLG(GramianBalancer):
    """IMTL-G: closed-form task weights giving an aggregated gradient with equal projections on all tasks.

    Cost: T backward + O(T^2 P) Gramian.
    """

    def aggregate(self, losses, task_jacobian):
        return Aggregation(task_weights=imtl_g_weights(task_jacobian.gramian(), self.eps))
