r"""DB-MTL: Dual-Balancing Multi-Task Learning (Lin et al., Algorithm 1).

$$
\begin{aligned}
\ell_t &\leftarrow \log(\ell_t + \epsilon) \qquad \text{Section 3.1, loss-scale balancing} \\
g_t &= \nabla_\theta \log(\ell_t + \epsilon) \qquad \text{Algorithm 1, step 6} \\
\beta_k &= \beta / k^{\beta_\sigma}, \ k = 1, 2, \dots \qquad \text{Section 4.1's grid: } \beta / k^{0.5} \\
\mathrm{ema}_t &= \beta_k \, \mathrm{ema}_t + (1 - \beta_k) \, g_t, \ \mathrm{ema}_t \text{ starts at } 0
    \qquad \text{Eq. 1, step 7; no bias correction} \\
d &= \alpha_k \sum_t \frac{\mathrm{ema}_t}{\lVert \mathrm{ema}_t \rVert + \epsilon} \qquad \text{Eq. 2, step 9} \\
\alpha_k &= \max_t \lVert \mathrm{ema}_t \rVert \qquad \text{Section 3.2; Figure 6 compares others} \\
\theta &\leftarrow \theta - \mathrm{lr} \, d, \ \
    \psi_t \leftarrow \psi_t - \mathrm{lr} \, \nabla_{\psi_t} \log(\ell_t + \epsilon) \qquad \text{steps 10-13}
\end{aligned}
$$

Defaults follow the paper's reference library: `beta=0.9`, `beta_sigma=0.0` (constant beta), `scaling="max"`
(the best alpha in Figure 6), `loss_transform="log"` and `gradient_balancing=True` (both components: the best
row of Table 5). The ablations of Section 4 are options of this class:

- `loss_transform=None`: gradient balancing only (Table 5, row "no log, max-norm");
- `gradient_balancing=False`: log transform only, i.e. EW on log losses (Table 5, row "log, no max-norm");
  this needs no per-task gradients and runs as a loss-level method;
- `beta=0.0`: no EMA, the current gradients are normalised directly;
- `scaling`: alpha_k as `"max"`, `"min"`, `"mean"`, `"median"` of the EMA norms, or a constant float (Figure 6).

The EMA buffers are a (T, P) float32 state variable, `ema_gradients`. Measured accuracy (first step) (float32
against float64 over the scale battery, `tests/balancers/test_scale_battery.py`):
$\lVert d - d^* \rVert \le 3 \cdot 10^{-5} \max(\lVert d^* \rVert, 10^{-3} \max_t \lVert g_t \rVert)$
against Eq. (2) in float64 (measured 1.1e-5, anti-collinear pairs whose directions cancel; 5e-7 otherwise).
"""

from keras import ops

from keras_dbmtl.balancers._checks import check_hyperparameters
from keras_dbmtl.balancers.base import Aggregation, Disclaimed, JacobianBalancer
from keras_dbmtl.balancers.registry import register

SCALINGS = ("max", "min", "mean", "median")


@register("dbmtl")
class DBMTL(JacobianBalancer):
    """Dual-Balancing MTL: log-transformed losses, EMA task gradients normalised and rescaled by alpha_k.

    Args:
        beta: EMA coefficient in [0, 1).
        beta_sigma: decay exponent: beta_k = beta / k**beta_sigma (0 keeps beta constant).
        scaling: alpha_k: "max" (paper), "min", "mean", "median" of the EMA norms, or a positive float.
        loss_transform: "log" (paper) or None (gradient balancing only).
        gradient_balancing: False turns off the EMA/normalisation (log transform only).
        eps: epsilon of both the log transform and the normalisation.
    """

    plain_single_task = Disclaimed("log transform and EMA (d = (1 - beta) g at step 1)")
    permutation_equivariant = True
    amortisable = "w_t = alpha / (||ema_t|| + eps) from the last refresh; EMA and step counter on refresh steps"

    def __init__(
        self,
        beta=0.9,
        beta_sigma=0.0,
        scaling="max",
        loss_transform="log",
        gradient_balancing=True,
        eps=1e-8,
        **kwargs,
    ):
        super().__init__(loss_transform=loss_transform, eps=eps, **kwargs)
        check_hyperparameters(self, beta=(beta, "[0, 1)"), beta_sigma=(beta_sigma, "[0, inf)"),
                              scaling=(scaling, SCALINGS + ("(0, inf)",)),
                              gradient_balancing=(gradient_balancing, (True, False)))
        self.beta = float(beta)
        self.beta_sigma = float(beta_sigma)
        self.scaling = scaling if isinstance(scaling, str) else float(scaling)
        self.gradient_balancing = bool(gradient_balancing)

    @property
    def uses_task_gradients(self):
        # gradient_balancing=False (log transform only) runs as a loss-level method: no per-task gradients.
        return self.gradient_balancing

    def build(self, num_tasks, num_shared_parameters, task_names=None, shared_shapes=None):
        super().build(num_tasks, num_shared_parameters, task_names, shared_shapes)
        if self.gradient_balancing:
            self.ema_gradients = self.state_variable((num_tasks, num_shared_parameters), "ema_gradients")

    # Log transform only: EW on the transformed losses (Table 5, row 2).
    def combine_losses(self, losses):
        return ops.sum(losses.transformed), ops.ones_like(losses.transformed)

    def _alpha(self, ema_norms, labelled):
        """alpha_k over the tasks with labels in this batch (all tasks when `labelled` is None)."""
        if not isinstance(self.scaling, str):
            return ops.convert_to_tensor(self.scaling, "float32")
        if labelled is None:
            labelled = ops.ones_like(ema_norms, dtype="bool")
        inf = float("inf")
        count = ops.maximum(ops.sum(ops.cast(labelled, "int32")), 1)
        if self.scaling == "max":
            return ops.max(ops.where(labelled, ema_norms, 0.0))
        if self.scaling == "min":
            return ops.min(ops.where(labelled, ema_norms, inf))
        if self.scaling == "mean":
            return ops.sum(ops.where(labelled, ema_norms, 0.0)) / ops.cast(count, "float32")
        ordered = ops.sort(ops.where(labelled, ema_norms, inf))             # the labelled tasks first
        low, high = ops.take(ordered, (count - 1) // 2), ops.take(ordered, count // 2)
        return (low + high) / 2.0

    def aggregate(self, losses, task_jacobian):
        gradients = task_jacobian.matrix()                                   # g_t, (T, P)
        labelled = task_jacobian.labelled
        k = self.next_step()
        beta_k = self.beta / ops.power(k, self.beta_sigma)                   # beta / k^beta_sigma
        previous = ops.convert_to_tensor(self.ema_gradients)
        ema = beta_k * previous + (1.0 - beta_k) * gradients                # Eq. (1)
        if labelled is not None:                                             # a task without labels: EMA kept
            ema = ops.where(labelled[:, None], ema, previous)
        self.ema_gradients.assign(ema)
        ema_norms = ops.sqrt(ops.sum(ops.square(ema), axis=1))               # ||ema_t||
        alpha = self._alpha(ema_norms, labelled)                             # alpha_k
        task_weights = alpha / (ema_norms + self.eps)                        # Eq. (2): alpha / (||ema_t|| + eps)
        if labelled is not None:                                             # ... and no part of the direction
            task_weights = ops.where(labelled, task_weights, 0.0)
        direction = ops.matmul(task_weights[None, :], ema)[0]                # sum_t weight_t * ema_t
        return Aggregation(task_weights=task_weights, shared_direction=direction)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "beta": self.beta,
                "beta_sigma": self.beta_sigma,
                "scaling": self.scaling,
                "gradient_balancing": self.gradient_balancing,
            }
        )
        return config
