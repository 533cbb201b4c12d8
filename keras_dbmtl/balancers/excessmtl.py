r"""ExcessMTL: robust multi-task learning with excess risks (He et al., ICML 2024).

$$
\begin{aligned}
H_t &\leftarrow H_t + g_t \odot g_t \qquad \text{AdaGrad accumulator, per entry} \\
e_t &= g_t^\top \operatorname{diag}\big(1 / \sqrt{H_t + 10^{-7}}\big) \, g_t \qquad \text{Algorithm 1: the excess-risk estimate} \\
e_t &\leftarrow e_t / e_t(1) \qquad \text{relative to the first step's estimate} \\
w_t &\leftarrow w_t \exp(\eta e_t), \quad w \leftarrow T w / \textstyle\sum_t w_t \qquad \text{exponentiated-gradient update, from step 2} \\
L &= \textstyle\sum_t w_t \ell_t \qquad \text{shared variables and heads}
\end{aligned}
$$

eta = 0.01 (`robust_step_size`, the authors' default). State: H (T x P), e(1), w. Needs the Jacobian
(elementwise). The weights multiply the task losses, so the heads are scaled too (as the official weighted loss).
"""

from keras import ops

from keras_dbmtl.balancers._checks import check_hyperparameters
from keras_dbmtl.balancers.base import Aggregation, JacobianBalancer
from keras_dbmtl.balancers.registry import register


@register("excessmtl")
class ExcessMTL(JacobianBalancer):
    """ExcessMTL: weights grow with each task's estimated excess risk. Cost: T backward.

    Args:
        robust_step_size: eta (default 0.01).
    """

    plain_single_task = True
    permutation_equivariant = True
    amortisable = "weights from the last refresh (shared and heads); squared sums updated on refresh steps"

    def __init__(self, robust_step_size=0.01, loss_transform=None, eps=1e-8, **kwargs):
        super().__init__(loss_transform=loss_transform, eps=eps, **kwargs)
        check_hyperparameters(self, robust_step_size=(robust_step_size, "(0, inf)"))
        self.robust_step_size = float(robust_step_size)

    def build(self, num_tasks, num_shared_parameters, task_names=None, shared_shapes=None):
        super().build(num_tasks, num_shared_parameters, task_names, shared_shapes)
        self.squared_sums = self.state_variable((num_tasks, num_shared_parameters), "squared_sums")   # H
        self.initial_risks = self.state_variable((num_tasks,), "initial_risks")
        self.current_weights = self.state_variable((num_tasks,), "current_weights", initializer="ones")

    def aggregate(self, losses, task_jacobian):
        first = ops.equal(self.iterations, 0)
        self.next_step()
        gradients = task_jacobian.matrix()
        squared = self.squared_sums + gradients * gradients
        self.squared_sums.assign(squared)
        risks = ops.sum(gradients * gradients / ops.sqrt(squared + 1e-7), axis=1)       # e_t
        initial = ops.where(first, risks, self.initial_risks.value)
        self.initial_risks.assign(initial)
        updated = self.current_weights * ops.exp(self.robust_step_size * risks / (initial + 1e-30))
        updated = self.num_tasks * updated / ops.sum(updated)
        weights = ops.where(first, self.current_weights.value, updated)
        self.current_weights.assign(weights)
        return Aggregation(task_weights=weights, head_weights=weights)

    def get_config(self):
        config = super().get_config()
        config["robust_step_size"] = self.robust_step_size
        return config
