r"""STCH: smooth Tchebycheff scalarisation (Lin et al., "Smooth Tchebycheff Scalarization for Multi-Objective
Optimization", ICML 2024), as its authors run it for multi-task learning (their LibMTL extension).

$$
\begin{aligned}
f_t &= \log(\ell_t / z_t) \qquad z_t \text{: nadir-like reference point (below)} \\
L_\mu &= \mu \log \textstyle\sum_t \exp(f_t / \mu) \qquad \text{smooth Tchebycheff, Section 3; } \lambda_t = 1 \\
L &= T \, L_\mu \qquad \text{the authors' scaling}
\end{aligned}
$$

Warm-up, as the authors' code counts it (0-based epochs e: `e < W` log-EW; `e == W` log-EW while averaging the
losses; else STCH): epochs 0 .. W - 1 use sum_t log l_t (EW on log-losses), epoch W (the (W + 1)-th) too, and
its mean losses are z; from epoch W + 1 on the smooth Tchebycheff loss is used. So `warmup_epochs=W` trains
W + 1 epochs on log-EW, as the authors' code does for the same W. Defaults mu = 1, warmup_epochs = 4 (the
authors' MTL code). Logged weight: dL/dl_t.

Epochs are counted by `on_epoch_end` (outside the compiled step; see DWA for why this works on every backend).
STCH already works on log-losses, so `loss_transform="log"` is rejected.
"""

from keras import ops

from keras_dbmtl.balancers._checks import check_hyperparameters, reject_log_transform
from keras_dbmtl.balancers.base import Disclaimed, LossBalancer
from keras_dbmtl.balancers.registry import register


@register("stch")
class STCH(LossBalancer):
    """Smooth Tchebycheff scalarisation of the log-losses after a log-EW warm-up. Cost: 1 backward.

    Args:
        mu: smoothing parameter (default 1.0).
        warmup_epochs: W: epochs 0..W of sum_t log l_t, the last of them (epoch W) estimates z; STCH from
            epoch W + 1, as the authors' code (default 4).
    """

    plain_single_task = Disclaimed("the smoothed Tchebycheff scalarisation of log-losses")
    permutation_equivariant = Disclaimed("state from warm-up epochs")

    def __init__(self, mu=1.0, warmup_epochs=4, loss_transform=None, eps=1e-8, **kwargs):
        super().__init__(loss_transform=loss_transform, eps=eps, **kwargs)
        reject_log_transform(self, "already scalarises log-losses")
        check_hyperparameters(self, mu=(mu, "(0, inf)"), warmup_epochs=(warmup_epochs, "int [0, inf)"))
        self.mu = float(mu)
        self.warmup_epochs = int(warmup_epochs)

    def build(self, num_tasks, num_shared_parameters, task_names=None, shared_shapes=None):
        super().build(num_tasks, num_shared_parameters, task_names, shared_shapes)
        self.epochs_seen = self.state_variable((), "epochs_seen")
        self.loss_sums = self.state_variable((num_tasks,), "loss_sums")
        self.loss_count = self.state_variable((), "loss_count")
        self.reference = self.state_variable((num_tasks,), "reference", initializer="ones")   # z

    def combine_losses(self, losses):
        losses = losses.transformed                        # the raw losses: STCH rejects the log transform
        log_losses = ops.log(losses + self.eps)
        # Epoch W (0-based) accumulates the losses whose mean becomes z (the authors' `epoch == warmup_epoch`).
        collecting = ops.cast(ops.equal(self.epochs_seen, float(self.warmup_epochs)), "float32")
        self.loss_sums.assign(self.loss_sums + collecting * ops.stop_gradient(losses))
        self.loss_count.assign(self.loss_count + collecting)

        warm = ops.sum(log_losses)                                                # sum_t log l_t
        f = log_losses - ops.log(self.reference)                                  # f_t = log(l_t / z_t)
        stch = self.num_tasks * self.mu * ops.logsumexp(f / self.mu)              # smooth Tchebycheff, times T
        in_warmup = self.epochs_seen <= self.warmup_epochs
        loss = ops.where(in_warmup, warm, stch)
        softmax = self.num_tasks * ops.softmax(ops.stop_gradient(f) / self.mu)
        weights = ops.where(in_warmup, 1.0, softmax) / ops.stop_gradient(losses + self.eps)   # dL/dl_t
        return loss, weights

    def on_epoch_end(self, epoch):
        if not self.built:
            return
        if float(ops.convert_to_numpy(self.epochs_seen)) == float(self.warmup_epochs):
            count = ops.maximum(self.loss_count.value, 1.0)
            self.reference.assign(self.loss_sums.value / count)
        self.epochs_seen.assign(self.epochs_seen + 1.0)

    def get_config(self):
        config = super().get_config()
        config.update({"mu": self.mu, "warmup_epochs": self.warmup_epochs})
        return config
