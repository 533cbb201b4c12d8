r"""IMTL: impartial multi-task learning (Liu et al., ICLR 2021), the hybrid of IMTL-L and IMTL-G.

$$
\begin{aligned}
\ell_t' &= e^{s_t} \ell_t - s_t \qquad \text{IMTL-L: learnable scales } s_t \\
g_t &= \nabla \ell_t' \qquad \text{task gradients of the scaled losses} \\
d &= \textstyle\sum_t \alpha_t g_t, \quad \alpha \text{ from IMTL-G} \qquad \text{equal projections on the unit task gradients}
\end{aligned}
$$

The scaling is applied in `transform_losses` (after the optional log transform), so the per-task gradients the
model computes are those of the scaled losses, heads get grad l_t', and the scales s_t, trainable variables, get
from the model the gradient of sum_t l_t' (IMTL-L's update), applied by the model's optimizer.
"""

from keras import ops

from keras_dbmtl.balancers.base import Disclaimed
from keras_dbmtl.balancers.imtl_g import IMTLG
from keras_dbmtl.balancers.imtl_l import scaled_losses
from keras_dbmtl.balancers.registry import register


@register("imtl")
class IMTL(IMTLG):
    """IMTL = IMTL-L loss scaling + IMTL-G gradient weighting. Cost: T backward + O(T^2 P) Gramian."""

    plain_single_task = True
    permutation_equivariant = True
    amortisable = Disclaimed("its learned loss scales are trained every step")
    representation_level = Disclaimed("learned balancer variables, trained from the parameter-level task gradients")

    def build(self, num_tasks, num_shared_parameters, task_names=None, shared_shapes=None):
        super().build(num_tasks, num_shared_parameters, task_names, shared_shapes)
        self.scales = self.add_weight(shape=(num_tasks,), initializer="zeros", trainable=True, name="scales")

    def transform_losses(self, task_losses):
        return scaled_losses(super().transform_losses(task_losses), self.scales)

    def untransform_losses(self, transformed_losses):
        unscaled = (transformed_losses + self.scales) * ops.exp(-self.scales)
        return super().untransform_losses(unscaled)
