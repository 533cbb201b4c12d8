r"""Aligned-MTL: independent component alignment (Senushkin et al., "Independent Component Alignment for
Multi-Task Learning", CVPR 2023).

$$
\begin{aligned}
G &= J J^\top = V \Lambda V^\top \qquad \text{eigendecomposition of the Gramian, rank } r \\
B &= \sqrt{\lambda_{\min}} \, V \Lambda^{-1/2} V^\top \qquad \text{Algorithm 1: aligns the gradients' principal components; }
    (B J)(B J)^\top = \lambda_{\min} I \text{ on the range of } G \\
d &= \textstyle\sum_t \alpha_t g_t, \quad \alpha = B^\top \mathbf{1} \qquad \text{the sum of the aligned, equal-norm, orthogonal gradients}
\end{aligned}
$$

lambda_min is the smallest non-zero eigenvalue ("min" scale mode of the official code); eigenvalues below
T * float32-eps of the largest are treated as zero (the official rank tolerance). Gramian only. Heads receive
their own task's gradient. Measured accuracy (float32 against float64 over the scale battery,
`tests/balancers/test_scale_battery.py`): $\lVert d - d^* \rVert / \lVert d^* \rVert \le 5 \cdot 10^{-2}$ against float64 `eigh`
(measured 1.9e-2, T = 40 with norms spanning 1e4; <= 2e-3 on the other problems). A float32 limit: the scale
sqrt(lambda_min) comes from the smallest kept eigenvalue, which float32 resolves only to ~1e-7 lambda_max.
"""

from keras import ops

from keras_dbmtl.balancers import solvers
from keras_dbmtl.balancers.base import Aggregation, GramianBalancer
from keras_dbmtl.balancers.registry import register


def aligned_weights(gramian):
    inverse_sqrt, eigenvalues, kept = solvers.psd_power(gramian, -0.5)
    smallest = ops.min(ops.where(kept, eigenvalues, ops.max(eigenvalues)))
    alignment = ops.sqrt(ops.maximum(smallest, 0.0)) * inverse_sqrt            # B
    return ops.sum(alignment, axis=0)                                            # alpha = B^T 1


@register("aligned_mtl")
class AlignedMTL(GramianBalancer):
    """Aligned-MTL: the gradient system made orthogonal with equal norms (its smallest singular value).

    Cost: T backward + O(T^2 P) Gramian.
    """

    plain_single_task = True
    permutation_equivariant = True
    amortisable = "weights from the last refresh"
    representation_level = True

    def aggregate(self, losses, task_jacobian):
        return Aggregation(task_weights=aligned_weights(task_jacobian.gramian()))
