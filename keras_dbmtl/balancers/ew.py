r"""EW: equal weighting, the plain sum of the task losses.

$$
\begin{aligned}
L &= \textstyle\sum_t \ell_t \qquad \text{the paper's Section 2.1, } \gamma_t = 1
\end{aligned}
$$

With no `loss_transform` it trains exactly like a plain Keras model compiled with the same losses, including
`compile(loss_weights=...)`, which multiplies each raw task loss as in Keras.
"""

from keras import ops

from keras_dbmtl.balancers.base import LossBalancer
from keras_dbmtl.balancers.registry import register


@register("ew")
class EW(LossBalancer):
    """Equal weighting: minimises sum_t loss_t (or sum_t log(loss_t + eps) with `loss_transform="log"`)."""

    plain_single_task = True
    permutation_equivariant = True


    @property
    def accepts_loss_weights(self):
        # A constant factor w on l_t only shifts log(w * l_t) by log(w): no effect under the log transform.
        return self.loss_transform is None

    def combine_losses(self, losses):
        return ops.sum(losses.transformed), ops.ones_like(losses.transformed)
