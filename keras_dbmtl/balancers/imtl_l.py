r"""IMTL-L: the loss balancing half of IMTL (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021).

$$
\begin{aligned}
L &= \textstyle\sum_t \big[ e^{s_t} \ell_t - s_t \big] \qquad \text{Section 3 of the paper}
\end{aligned}
$$

The scales s_t (initialised to 0) are trainable variables updated by the model's optimizer with the network:
one gradient step on s per iteration, as in the paper. Logged weight: exp(s_t). The DB-MTL paper's
Proposition 3.1 shows that the exact minimiser over s turns this into the log transform.
"""

from keras import ops

from keras_dbmtl.balancers.base import LossBalancer
from keras_dbmtl.balancers.registry import register


def scaled_losses(losses, scales):
    """exp(s_t) l_t - s_t (IMTL-L's transformed loss)."""
    return ops.exp(scales) * losses - scales


@register("imtl_l")
class IMTLL(LossBalancer):
    """IMTL-L: learnable loss scales s_t, loss exp(s_t) l_t - s_t. Cost: 1 backward."""

    plain_single_task = True
    permutation_equivariant = True

    def build(self, num_tasks, num_shared_parameters, task_names=None, shared_shapes=None):
        super().build(num_tasks, num_shared_parameters, task_names, shared_shapes)
        self.scales = self.add_weight(shape=(num_tasks,), initializer="zeros", trainable=True, name="scales")

    def combine_losses(self, losses):
        loss = ops.sum(scaled_losses(losses.transformed, self.scales))
        return loss, ops.stop_gradient(ops.exp(self.scales))
