r"""IMTL-G: the gradient balancing half of IMTL (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021).

$$
\begin{aligned}
u_t &= g_t / \lVert g_t \rVert, \quad D = [g_1 - g_2, \dots, g_1 - g_T], \quad U = [u_1 - u_2, \dots, u_1 - u_T] \\
\alpha_{2:T} &= g_1 U^\top (D U^\top)^{-1}, \quad \alpha_1 = 1 - \textstyle\sum_{t \ge 2} \alpha_t \qquad \text{Section 3, closed form} \\
d &= \textstyle\sum_t \alpha_t g_t \qquad d \text{ has equal projections } d \cdot u_t \text{ on every task's unit gradient}
\end{aligned}
$$

Every product above is an entry of G = J J^T scaled by the norms, so IMTL-G needs only the Gramian: the same
alpha is alpha = N^-1 C^+ 1 / (1^T N^-1 C^+ 1) (C the cosine matrix, N = diag ||g_t||; see `imtl_g_weights`),
computed with an `eigh` pseudo-inverse of C, so degenerate cases (two tasks with the same gradient direction)
give a least-squares answer instead of a failure. Heads receive their own task's gradient.

Measured accuracy (float32, `tests/balancers/test_scale_battery.py`: full-rank Jacobians, T = 2..40, norms
1e-6..1e6 spanning 1e4 within a problem): $\lVert d - d^* \rVert / \lVert d^* \rVert \le 0.3$ against the paper's conditions solved in
float64: measured <= 3e-4 on all problems but one, 0.13 on T = 40 with 20 nearly collinear tasks (cosines
~0.95) and norms spanning 1e4. This is float32's
limit on an ill-conditioned cosine matrix (C^+ amplifies its rounding); the previous form (the paper's system
solved as written) was off by 100x on the same problems, and its eps = 1e-8 in the norms was a 1 % error for a
gradient of norm 1e-6, which is gone.
"""

from keras import ops

from keras_dbmtl.balancers import solvers
from keras_dbmtl.balancers.base import Aggregation, GramianBalancer
from keras_dbmtl.balancers.registry import register


def imtl_g_weights(gramian, eps=1e-8):
    """The closed form, in terms of the cosine matrix C (G = N C N, N = diag ||g_t||): d . u_t equal for all t
    with d = J^T alpha and sum_t alpha_t = 1 means G alpha = c N 1, i.e. alpha = N^-1 C^+ 1 / (1^T N^-1 C^+ 1).
    The same alpha as the paper's (T-1) x (T-1) system when G is invertible, but float32 only sees the cosines:
    the paper's system, solved as written, was off by 100 % with gradient norms spanning 1e4. `eps` is unused (no
    eps is added to the norms; kept for the signature)."""
    num = gramian.shape[-1]
    if num == 1:
        return ops.ones((1,), gramian.dtype)
    norms = ops.maximum(ops.sqrt(ops.maximum(ops.diagonal(gramian), 0.0)), 1e-30)
    cosines = gramian / norms[:, None] / norms[None, :]                           # U U^T
    pinv, _, _ = solvers.psd_power(cosines, -1.0)
    raw = ops.sum(pinv, axis=1) / norms                                             # N^-1 C^+ 1
    total = ops.sum(raw)
    return raw / ops.where(ops.equal(total, 0.0), 1.0, total)


@register("imtl_g")
class IMTLG(GramianBalancer):
    """IMTL-G: closed-form task weights giving an aggregated gradient with equal projections on all tasks.

    Cost: T backward + O(T^2 P) Gramian.
    """

    plain_single_task = True
    permutation_equivariant = True
    amortisable = "closed-form weights from the last refresh"
    representation_level = True

    def aggregate(self, losses, task_jacobian):
        return Aggregation(task_weights=imtl_g_weights(task_jacobian.gramian(), self.eps))
