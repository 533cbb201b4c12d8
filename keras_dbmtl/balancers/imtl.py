"""IMTL: impartial multi-task learning (Liu et al., ICLR 2021), the hybrid of IMTL-L and IMTL-G.

    l_t' = exp(s_t) l_t - s_t                                 (IMTL-L: learnable scales s_t)
    g_t  = grad l_t'                                          (task gradients of the scaled losses)
    d    = sum_t alpha_t g_t,  alpha from IMTL-G              (equal projections on the unit task gradients)

The scaling is applied in `transform_losses` (after the optional log transform), so the per-task gradients the
model computes are those of the scaled losses, heads get grad l_t', and the scales s_t, trainable variables, get
from the model the gradient of sum_t l_t' (IMTL-L's update), applied by the model's optimizer.
"""

from keras import ops

from keras_dbmtl.balancers.imtl_g import IMTLG
from keras_dbmtl.balancers.imtl_l import scaled_losses
from keras_dbmtl.balancers.registry import register


@register("imtl")
class IMTL(IMTLG):
    """IMTL = IMTL-L loss scaling + IMTL-G gradient weighting. Cost: T backward + O(T^2 P) Gramian."""

    def build(self, num_tasks, num_shared_parameters, task_names=None, shared_shapes=None):
        super().build(num_tasks, num_shared_parameters, task_names, shared_shapes)
        self.scales = self.add_weight(shape=(num_tasks,), initializer="zeros", trainable=True, name="scales")

    def transform_losses(self, task_losses):
        return scaled_losses(super().transform_losses(task_losses), self.scales)

    def untransform_losses(self, transformed_losses):
        unscaled = (transformed_losses + self.scales) * ops.exp(-self.scales)
        return super().untransform_losses(unscaled)
