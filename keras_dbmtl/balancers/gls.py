"""GLS: geometric loss strategy (Chennupati et al., "MultiNet++", CVPR Workshops 2019).

    L = (prod_t l_t)^(1/T) = exp( (1/T) sum_t log l_t )                      (the geometric loss of Section 3)
    dL/dl_t = L / (T l_t)                                                    (the effective task weight, logged)

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

    def __init__(self, loss_transform=None, eps=1e-8, **kwargs):
        super().__init__(loss_transform=loss_transform, eps=eps, **kwargs)
        reject_log_transform(self, "takes the geometric mean, i.e. already averages log-losses")

    def combine_losses(self, losses):
        num_tasks = ops.cast(ops.shape(losses.transformed)[0], "float32")
        loss = ops.exp(ops.mean(ops.log(losses.transformed)))                 # (prod_t l_t)^(1/T)
        weights = ops.stop_gradient(loss / (num_tasks * losses.transformed))   # dL/dl_t
        return loss, weights
