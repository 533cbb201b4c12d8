"""Aligned-MTL: independent component alignment (Senushkin et al., "Independent Component Alignment for
Multi-Task Learning", CVPR 2023).

    G = J J^T = V Lambda V^T                          (eigendecomposition of the Gramian, rank r)
    B = sqrt(lambda_min) V Lambda^-1/2 V^T            (Algorithm 1: aligns the gradients' principal components;
                                                       (B J)(B J)^T = lambda_min I on the range of G)
    d = sum_t alpha_t g_t,  alpha = B^T 1             (the sum of the aligned, equal-norm, orthogonal gradients)

lambda_min is the smallest non-zero eigenvalue ("min" scale mode of the official code); eigenvalues below
T * float32-eps of the largest are treated as zero (the official rank tolerance). Gramian only. Heads receive
their own task's gradient. Measured accuracy (float32 against float64 over the scale battery,
`tests/balancers/test_scale_battery.py`): ||d - d*|| / ||d*|| <= 5e-2 against float64 `eigh`
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

    def aggregate(self, losses, task_jacobian):
        return Aggregation(task_weights=aligned_weights(task_jacobian.gramian()))
