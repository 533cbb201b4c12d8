r"""UW: uncertainty weighting (Kendall, Gal and Cipolla, CVPR 2018).

$$
\begin{aligned}
L &= \textstyle\sum_t \Big[ \frac{\ell_t}{2 \sigma_t^2} + \log \sigma_t \Big] \qquad \text{Eq. 7, regression likelihood} \\
&= \textstyle\sum_t \Big[ \frac{\ell_t}{2 e^{s_t}} + \frac{s_t}{2} \Big], \quad s_t = \log \sigma_t^2 \text{ learnable} \qquad \text{the paper's stable form}
\end{aligned}
$$

The log-variances s_t are trainable variables updated by the model's optimizer together with the network (the
model differentiates L with respect to them). As in LibMTL (the DB-MTL paper's library), every task uses the
regression form and s_t starts at -0.5 (`initial_log_variance`). Logged weight: 1 / (2 exp(s_t)).
"""

import keras
from keras import ops

from keras_dbmtl.balancers._checks import check_hyperparameters
from keras_dbmtl.balancers.base import Disclaimed, LossBalancer
from keras_dbmtl.balancers.registry import register


@register("uw")
class UW(LossBalancer):
    """Uncertainty weighting with learnable log-variances s_t = log sigma_t^2. Cost: 1 backward.

    Args:
        initial_log_variance: initial s_t (default -0.5, LibMTL's).
    """

    plain_single_task = Disclaimed("weight 1 / (2 exp(s)) with s = -0.5 at start")
    permutation_equivariant = True

    def __init__(self, initial_log_variance=-0.5, loss_transform=None, eps=1e-8, **kwargs):
        super().__init__(loss_transform=loss_transform, eps=eps, **kwargs)
        check_hyperparameters(self, initial_log_variance=(initial_log_variance, "(-inf, inf)"))
        self.initial_log_variance = float(initial_log_variance)

    def build(self, num_tasks, num_shared_parameters, task_names=None, shared_shapes=None):
        super().build(num_tasks, num_shared_parameters, task_names, shared_shapes)
        self.log_variances = self.add_weight(
            shape=(num_tasks,), initializer=keras.initializers.Constant(self.initial_log_variance),
            trainable=True, name="log_variances",
        )

    def combine_losses(self, losses):
        weights = 0.5 * ops.exp(-self.log_variances)                            # 1 / (2 sigma_t^2)
        loss = ops.sum(weights * losses.transformed + 0.5 * self.log_variances)  # Eq. (7)
        return loss, ops.stop_gradient(weights)

    def get_config(self):
        config = super().get_config()
        config["initial_log_variance"] = self.initial_log_variance
        return config
