r"""ConFIG: conflict-free inverse gradients (Liu et al., "ConFIG: Towards Conflict-free Training of Physics
Informed Neural Networks", ICLR 2025).

$$
\begin{aligned}
U &= [g_1 / \lVert g_1 \rVert, \dots, g_T / \lVert g_T \rVert]^\top \qquad \text{unit task gradients, } T \times P \\
g_v &= U^{+} \mathbf{1}_T \qquad \text{the direction with equal cosine to every task; min-norm} \\
g_u &= g_v / \lVert g_v \rVert \\
d &= \big(\textstyle\sum_t g_t \cdot g_u\big) \, g_u \qquad \text{length: the sum of the projections}
\end{aligned}
$$

U^+ 1 = U^T (U U^T)^+ 1 and U U^T is the cosine matrix of the Gramian, so ConFIG needs only the Gramian:
g_v = sum_t a_t g_t with a = diag(1/||g||) (U U^T)^+ 1. The pseudo-inverse uses `eigh` (eigenvalues below
T * float32-eps of the largest are dropped, as torch.linalg.pinv). Heads receive their own task's gradient.
No eps in the norms (scale-free). Where U^+ 1 = 0 (an exactly anti-collinear pair) no direction exists and d = 0.
Measured accuracy (float32 against float64 over the scale battery, `tests/balancers/test_scale_battery.py`):
$\lVert d - d^* \rVert / \lVert d^* \rVert \le 2 \cdot 10^{-2}$ against a float64 SVD pseudo-inverse (measured 5.5e-3 at T = 40, where the cosine
matrix's smallest eigenvalue is ~1e-3: float32's limit; 3e-4 at T = 5).
"""

from keras import ops

from keras_dbmtl.balancers import solvers
from keras_dbmtl.balancers.base import Aggregation, GramianBalancer
from keras_dbmtl.balancers.registry import register


def config_weights(gramian, eps=1e-8):
    norms = ops.maximum(ops.sqrt(ops.maximum(ops.diagonal(gramian), 0.0)), 1e-30)  # (no eps: scale-free)
    cosines = gramian / norms[:, None] / norms[None, :]                         # U U^T
    pinv, _, _ = solvers.psd_power(cosines, -1.0)
    coefficients = ops.sum(pinv, axis=1)                                          # U^+ 1 = U^T coefficients
    # ||U^+ 1||^2 = 1^T C^+ 1 is >= 1 when the unit gradients are independent, and 0 when 1 is orthogonal to the
    # range of C (e.g. an exactly anti-collinear pair): there g_v = 0, no direction exists, and d = 0.
    defined = ops.sum(coefficients) > 1e-4
    a = coefficients / norms                                                      # g_v = sum_t a_t g_t
    gv_norm = ops.maximum(ops.sqrt(ops.maximum(ops.sum(a * ops.matmul(gramian, a)), 0.0)), 1e-30)
    length = ops.sum(ops.matmul(gramian, a)) / gv_norm                             # sum_t g_t . g_u
    return ops.where(defined, a * length / gv_norm, 0.0)                           # d = length * g_u


@register("config")
class ConFIG(GramianBalancer):
    """ConFIG: equal-cosine direction, scaled by the sum of the task projections.

    Cost: T backward + O(T^2 P) Gramian.
    """

    plain_single_task = True
    permutation_equivariant = True
    amortisable = "weights from the last refresh"
    representation_level = True

    def aggregate(self, losses, task_jacobian):
        return Aggregation(task_weights=config_weights(task_jacobian.gramian(), self.eps))
