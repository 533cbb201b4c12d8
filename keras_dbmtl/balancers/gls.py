r"""GLS: geometric loss strategy (Chennupati et al., "MultiNet++", CVPR Workshops 2019).

$$
\begin{aligned}
L &= \Big(\textstyle\prod_t \ell_t\Big)^{1/T} = \exp\Big(\tfrac{1}{T} \textstyle\sum_t \log \ell_t\Big) \qquad \text{the geometric loss of Section 3} \\
\partial L / \partial \ell_t &= L / (T \ell_t) \qquad \text{the effective task weight, logged}
\end{aligned}
$$

The product is computed in log space (same value and gradient, no overflow/underflow of the product).
GLS is already invariant to the scale of each loss, so `loss_transform="log"` is rejected.
"""

from keras import ops

from keras_dbmtl.balancers._checks import reject_log_transform
from keras_dbmtl.balancers.base import LossBalancer
from keras_dbmtl.balancers.registry import register


@register("gls")
class GLS(LossBalancer):
    """Geometric mean of the task losses. No hyperparameters. Cost: 1 backward."""

    plain_single_task = True
    permutation_equivariant = True

    def __init__(self, loss_transform=None, eps=1e-8, **kwargs):
        super().__init__(loss_transform=loss_transform, eps=eps, **kwargs)
        reject_log_transform(self, "takes the geometric mean, i.e. already averages log-losses")

    def combine_losses(self, losses):
        num_tasks = ops.cast(ops.shape(losses.transformed)[0], "float32")
        loss = ops.exp(ops.mean(ops.log(losses.transformed)))                 # (prod_t l_t)^(1/T)
        weights = ops.stop_gradient(loss / (num_tasks * losses.transformed))   # dL/dl_t
        return loss, weights
