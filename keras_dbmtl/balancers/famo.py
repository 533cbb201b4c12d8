r"""FAMO: fast adaptive multitask optimisation (Liu et al., NeurIPS 2023).

Update of the network (one backward; Section 3 of the paper):

$$
\begin{aligned}
z &= \operatorname{softmax}(\xi) \qquad \text{task logits } \xi \text{, state} \\
c &= \big(\textstyle\sum_t z_t / \ell_t\big)^{-1} \qquad \text{a constant: no gradient} \\
L &= c \textstyle\sum_t z_t \log \ell_t \ \Rightarrow \ d = c \sum_t (z_t / \ell_t) \nabla \ell_t \qquad \text{logged weight: } c z_t / \ell_t \\
\xi &\leftarrow \xi - \beta \cdot \operatorname{Adam}\big(J_{\operatorname{softmax}}(\xi)^\top \delta + \gamma \xi\big) \qquad \text{Algorithm 1}
\end{aligned}
$$

Update of the logits, from the decrease of the log-losses delta_t = log l_t(before) - log l_t(after):

    xi <- xi - beta * Adam( J_softmax(xi)^T delta + gamma xi )                 (Algorithm 1)

with the official defaults beta = 0.025 (`weight_learning_rate`) and gamma = 1e-3 (`weight_decay`); the minimum
losses of the paper are 0 (as in the official code).

As in the official code, l_t(after) is the loss of the *same* mini-batch after the optimizer step: the balancer
asks for them in its `after_step` hook, so `MultiTaskModel`'s train step makes that one extra forward pass (training
mode, no gradient) and `update_after_step` uses it; the user's loop is unchanged. The logits and their Adam moments
are state variables. FAMO already takes the log of the losses, so `loss_transform="log"` is rejected.
"""

from keras import ops

from keras_dbmtl.balancers import solvers
from keras_dbmtl.balancers._checks import check_hyperparameters, reject_log_transform
from keras_dbmtl.balancers.base import LossBalancer
from keras_dbmtl.balancers.registry import register


@register("famo")
class FAMO(LossBalancer):
    """FAMO: log-loss weighting with logits adapted to equalise the tasks' loss decrease. Cost: 1 backward.

    Args:
        weight_learning_rate: beta, Adam learning rate of the logits (default 0.025).
        weight_decay: gamma, L2 decay of the logits (default 1e-3).
    """

    plain_single_task = True
    permutation_equivariant = True

    def __init__(self, weight_learning_rate=0.025, weight_decay=1e-3, loss_transform=None, eps=1e-8, **kwargs):
        super().__init__(loss_transform=loss_transform, eps=eps, **kwargs)
        reject_log_transform(self, "already optimises log-losses")
        check_hyperparameters(self, weight_learning_rate=(weight_learning_rate, "(0, inf)"),
                              weight_decay=(weight_decay, "[0, inf)"))
        self.weight_learning_rate = float(weight_learning_rate)
        self.weight_decay = float(weight_decay)

    def build(self, num_tasks, num_shared_parameters, task_names=None, shared_shapes=None):
        super().build(num_tasks, num_shared_parameters, task_names, shared_shapes)
        self.logits = self.state_variable((num_tasks,), "logits")                    # xi
        self.logits_m = self.state_variable((num_tasks,), "logits_m")
        self.logits_v = self.state_variable((num_tasks,), "logits_v")

    def combine_losses(self, losses):
        losses = losses.transformed                        # the raw losses: FAMO rejects the log transform
        z = ops.stop_gradient(ops.softmax(self.logits))
        scaled = losses + self.eps
        c = ops.stop_gradient(1.0 / ops.sum(z / scaled))                          # c = (sum_t z_t / l_t)^-1
        loss = c * ops.sum(z * ops.log(scaled))
        return loss, c * z / ops.stop_gradient(scaled)

    def after_step(self, raw_losses, losses_after):
        """The balancer's hook after the update: FAMO asks for the losses of the same batch again."""
        self.update_after_step(ops.stop_gradient(raw_losses), ops.stop_gradient(losses_after()))

    def update_after_step(self, losses_before, losses_after):
        # delta_t = log l_t(before) - log l_t(after), on the same mini-batch (Algorithm 1 of the FAMO paper).
        delta = ops.log(losses_before + self.eps) - ops.log(losses_after + self.eps)
        z = ops.softmax(self.logits)
        gradient = z * (delta - ops.sum(z * delta))                               # J_softmax(xi)^T delta
        step = self.next_step()
        logits, m, v = solvers.adam_update(
            self.logits, self.logits_m, self.logits_v, gradient, step,
            self.weight_learning_rate, weight_decay=self.weight_decay,
        )
        self.logits.assign(logits)
        self.logits_m.assign(m)
        self.logits_v.assign(v)

    def get_config(self):
        config = super().get_config()
        config.update({"weight_learning_rate": self.weight_learning_rate, "weight_decay": self.weight_decay})
        return config
