r"""GradNorm: gradient normalisation (Chen et al., ICML 2018).

$$
\begin{aligned}
w_t &= T \operatorname{softmax}(s)_t \qquad \text{learnable weights, } \textstyle\sum_t w_t = T \text{ (LibMTL's parametrisation)} \\
G_t &= \lVert w_t g_t \rVert, \quad \bar G = \operatorname{mean}_t G_t \qquad g_t \text{: task gradient of the shared variables} \\
r_t &= \frac{\ell_t / \ell_t(0)}{\operatorname{mean}_i \ell_i / \ell_i(0)} \qquad \text{relative inverse training rate; } \ell(0) \text{: the first step's losses} \\
L_{\mathrm{grad}} &= \textstyle\sum_t \big| G_t - [\bar G \, r_t^\alpha] \big| \qquad \text{Eq. 2; the bracket is a constant} \\
&\theta, \psi \leftarrow \text{descent on } \textstyle\sum_t w_t \ell_t; \quad s \leftarrow \text{descent on } L_{\mathrm{grad}}
\end{aligned}
$$

alpha = 1.5 (the paper's NYUv2 value, LibMTL's default). The weights multiply the task losses (shared and head
gradients alike). GradNorm measures G_t on the last shared layer; like LibMTL this uses all shared variables.
The losses in r_t are the raw losses (also under `loss_transform="log"`).

The logits s are a trainable variable updated by the model's optimizer, as in the paper (same optimizer as the
network). Deviation, documented: the model gives a balancer's trainable variables the gradient of
sum_t transformed_losses[t], computed before `aggregate`; to make that gradient equal dL_grad/ds, the balancer adds
(s - stop_gradient(s)) . c to the transformed losses (value unchanged, shared/head gradients unchanged), where c is
dL_grad/ds computed analytically in `aggregate` and kept in a state variable. The optimizer therefore applies the
L_grad gradient of step k at step k + 1 (one step late). A model hook returning the balancer's own gradients
(e.g. `Aggregation.extra_gradients`) would remove the delay.
"""

from keras import ops

from keras_dbmtl.balancers._checks import check_hyperparameters
from keras_dbmtl.balancers.base import Aggregation, Disclaimed, GramianBalancer
from keras_dbmtl.balancers.registry import register


@register("gradnorm")
class GradNorm(GramianBalancer):
    """GradNorm: weights learned so that the weighted gradient norms follow the tasks' training rates.

    Cost: T backward + O(T^2 P) Gramian.

    Args:
        alpha: strength of the restoring force (default 1.5).
    """

    plain_single_task = True
    permutation_equivariant = True
    amortisable = Disclaimed("its learned weights are trained from the task gradients of every step")
    representation_level = Disclaimed("learned balancer variables, trained from the parameter-level task gradients")

    def __init__(self, alpha=1.5, loss_transform=None, eps=1e-8, **kwargs):
        super().__init__(loss_transform=loss_transform, eps=eps, **kwargs)
        check_hyperparameters(self, alpha=(alpha, "[0, inf)"))
        self.alpha = float(alpha)

    def build(self, num_tasks, num_shared_parameters, task_names=None, shared_shapes=None):
        super().build(num_tasks, num_shared_parameters, task_names, shared_shapes)
        self.logits = self.add_weight(shape=(num_tasks,), initializer="zeros", trainable=True, name="logits")
        self.logit_gradient = self.state_variable((num_tasks,), "logit_gradient")          # c = dL_grad/ds
        self.initial_losses = self.state_variable((num_tasks,), "initial_losses")          # l(0)

    def transform_losses(self, task_losses):
        losses = super().transform_losses(task_losses)
        carrier = (self.logits - ops.stop_gradient(self.logits)) * ops.stop_gradient(self.logit_gradient)
        return losses + carrier                                                  # same value; d/ds = c

    def aggregate(self, losses, task_jacobian):
        first = ops.equal(self.iterations, 0)
        self.next_step()
        z = ops.softmax(ops.convert_to_tensor(self.logits))
        weights = self.num_tasks * z                                              # w_t
        norms = task_jacobian.norms()                                             # ||g_t||
        weighted_norms = weights * norms                                          # G_t
        raw = losses.raw
        initial = ops.where(first, raw, self.initial_losses.value)
        self.initial_losses.assign(initial)
        ratio = raw / (initial + self.eps)
        rate = ratio / ops.mean(ratio)                                            # r_t
        target = ops.stop_gradient(ops.mean(weighted_norms) * ops.power(rate, self.alpha))
        d_weights = ops.sign(weighted_norms - target) * norms                      # dL_grad/dw_t (Eq. 2)
        self.logit_gradient.assign(self.num_tasks * z * (d_weights - ops.sum(z * d_weights)))   # chain rule
        return Aggregation(task_weights=weights, head_weights=weights)

    def get_config(self):
        config = super().get_config()
        config["alpha"] = self.alpha
        return config
