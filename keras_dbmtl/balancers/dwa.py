r"""DWA: dynamic weight average (Liu, Johns and Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019).

$$
\begin{aligned}
r_t(k-1) &= L_t(k-1) / L_t(k-2) \qquad \text{Eq. 7: descending rate} \\
w_t(k) &= \frac{T \exp(r_t(k-1) / \tau)}{\sum_i \exp(r_i(k-1) / \tau)}, \quad w_t(1) = w_t(2) = 1 \\
L &= \textstyle\sum_t w_t(k) \, \ell_t
\end{aligned}
$$

L_t(k) is task t's average training loss over epoch k (the raw loss, also under `loss_transform="log"`), tau = 2.

State (all Keras variables, saved with the model): the running sum and count of the current epoch's losses,
the last two epoch averages, the number of finished epochs and the current weights. `combine_losses`
accumulates inside the compiled step; `on_epoch_end` (called by `MultiTaskModel.fit` after the epoch, outside the
compiled step) rolls the averages and computes the next epoch's weights. On JAX the model's variables are synced
back from the stateless training state before epoch-end callbacks run, and the next epoch re-reads them, so the
assignments made here take effect on every backend (tested). Without an epoch boundary (custom loops calling
`train_on_batch` only) the weights stay 1.
"""

from keras import ops

from keras_dbmtl.balancers._checks import check_hyperparameters
from keras_dbmtl.balancers.base import LossBalancer
from keras_dbmtl.balancers.registry import register


@register("dwa")
class DWA(LossBalancer):
    """Dynamic weight average over epochs. Cost: 1 backward.

    Args:
        temperature: tau (default 2.0, the paper's).
    """

    plain_single_task = True
    permutation_equivariant = True

    def __init__(self, temperature=2.0, loss_transform=None, eps=1e-8, **kwargs):
        super().__init__(loss_transform=loss_transform, eps=eps, **kwargs)
        check_hyperparameters(self, temperature=(temperature, "(0, inf)"))
        self.temperature = float(temperature)

    def build(self, num_tasks, num_shared_parameters, task_names=None, shared_shapes=None):
        super().build(num_tasks, num_shared_parameters, task_names, shared_shapes)
        self.loss_sums = self.state_variable((num_tasks,), "loss_sums")
        self.loss_count = self.state_variable((), "loss_count")
        self.epoch_losses = self.state_variable((2, num_tasks), "epoch_losses")  # [L(k-1), L(k-2)]
        self.epochs_seen = self.state_variable((), "epochs_seen")
        self.current_weights = self.state_variable((num_tasks,), "current_weights", initializer="ones")

    def combine_losses(self, losses):
        raw = ops.stop_gradient(losses.raw)
        self.loss_sums.assign(self.loss_sums + raw)
        self.loss_count.assign(self.loss_count + 1.0)
        weights = ops.convert_to_tensor(self.current_weights)
        return ops.sum(weights * losses.transformed), weights

    def on_epoch_end(self, epoch):
        if not self.built or float(ops.convert_to_numpy(self.loss_count)) == 0.0:
            return
        average = self.loss_sums.value / self.loss_count.value                    # L_t(k)
        losses = ops.stack([average, self.epoch_losses.value[0]])
        self.epoch_losses.assign(losses)
        self.epochs_seen.assign(self.epochs_seen + 1.0)
        self.loss_sums.assign(ops.zeros((self.num_tasks,)))
        self.loss_count.assign(0.0)
        if float(ops.convert_to_numpy(self.epochs_seen)) >= 2.0:
            rate = losses[0] / (losses[1] + self.eps)                             # Eq. (7): r_t
            self.current_weights.assign(self.num_tasks * ops.softmax(rate / self.temperature))

    def get_config(self):
        config = super().get_config()
        config["temperature"] = self.temperature
        return config
