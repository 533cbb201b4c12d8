r"""MGDA: multiple-gradient descent (Sener and Koltun, "Multi-Task Learning as Multi-Objective Optimization",
NeurIPS 2018).

$$
\begin{aligned}
n_t &= 1 \mid \lVert g_t \rVert \mid \ell_t \mid \ell_t \lVert g_t \rVert \qquad \text{gradient normaliser: "none" | "l2" | "loss" | "loss+"} \\
w &= \operatorname*{argmin}_{w \in \text{simplex}} \Big\lVert \textstyle\sum_t w_t g_t / n_t \Big\rVert^2 \qquad \text{Eq. 3: the min-norm point of the convex hull} \\
\theta &\leftarrow \theta - \mathrm{lr} \textstyle\sum_t w_t g_t; \quad \psi_t \leftarrow \psi_t - \mathrm{lr} \, w_t \nabla \ell_t
\end{aligned}
$$

As in the paper's code, the weights found on the normalised gradients scale the *raw* task losses (shared
variables and heads alike: the DB-MTL paper lists MGDA among the methods whose weights reach the heads), and the
default normaliser is "loss+" (the paper's configurations). Under `loss_transform="log"` the gradients are already
divided by the losses (grad log l = grad l / l), so the default becomes the equivalent "l2" and "loss"/"loss+"
are rejected.

The min-norm problem is solved on the T x T Gramian by `solvers.min_norm_weights` (FISTA + exact polish on the
support, fixed iterations, inside the compiled step). needs = "gramian": the Jacobian is never concatenated.
No eps is added to the normaliser (an exactly zero one is replaced by 1). A task whose shared gradient is exactly zero
while its loss is not (a dead ReLU branch) makes zero the min-norm point: the shared variables then do not train,
as the method defines it; `stalls_on_zero_gradient` makes `fit` warn once, naming the task (`callbacks.TaskReport`).
(A task without labels in a batch, loss and gradient exactly 0, is left out instead: see `TaskJacobian.labelled`.) Measured accuracy (float32 against float64
over the scale battery, `tests/balancers/test_scale_battery.py`):
$\lVert d - d^* \rVert \le 10^{-4} \max_t \lVert g_t / n_t \rVert$ in every normalisation ($d^*$: NNLS in float64); measured <= 5e-8 except a
rank-deficient "l2" problem (T = 40, P = 6) at 6e-5.
"""

from keras import ops

from keras_dbmtl.balancers import solvers
from keras_dbmtl.balancers._checks import check_hyperparameters
from keras_dbmtl.balancers.base import Aggregation, GramianBalancer
from keras_dbmtl.balancers.registry import register

NORMALIZATIONS = ("none", "l2", "loss", "loss+")


@register("mgda")
class MGDA(GramianBalancer):
    """MGDA: task weights of the min-norm convex combination of the (normalised) task gradients.

    Cost: T backward + O(T^2 P) Gramian.

    Args:
        normalization: "none", "l2", "loss" or "loss+"; None (default) means "loss+", or "l2" under the log
            transform.
        scale_heads: multiply each head's gradient by its task weight (default True, the paper's code).
    """

    plain_single_task = True
    permutation_equivariant = True
    amortisable = "min-norm weights from the last refresh (heads too with scale_heads)"
    representation_level = True

    stalls_on_zero_gradient = True

    def __init__(self, normalization=None, scale_heads=True, loss_transform=None, eps=1e-8, **kwargs):
        super().__init__(loss_transform=loss_transform, eps=eps, **kwargs)
        check_hyperparameters(self, normalization=(normalization, (None,) + NORMALIZATIONS),
                              scale_heads=(scale_heads, (True, False)))
        if loss_transform == "log" and normalization in ("loss", "loss+"):
            raise ValueError(
                f"MGDA(normalization={normalization!r}) with loss_transform='log' divides by the loss twice "
                "(grad log l = grad l / l): use normalization='none' (same as 'loss') or 'l2' (same as 'loss+')."
            )
        self.normalization = normalization
        self.scale_heads = bool(scale_heads)

    @property
    def resolved_normalization(self):
        if self.normalization is not None:
            return self.normalization
        return "l2" if self.loss_transform == "log" else "loss+"

    def aggregate(self, losses, task_jacobian):
        gramian = task_jacobian.gramian()
        norms = ops.sqrt(ops.maximum(ops.diagonal(gramian), 0.0))
        kind = self.resolved_normalization
        if kind == "none":
            normalizer = ops.ones_like(norms)
        elif kind == "l2":
            normalizer = norms
        elif kind == "loss":
            normalizer = losses.transformed
        else:
            normalizer = losses.transformed * norms
        # No eps added (the paper's code divides by the normaliser as is; 1e-8 was a 0.2 % error at ||g|| ~ 1e-5):
        # only an exactly zero normaliser (a zero gradient) is replaced by 1, leaving that vector at zero.
        normalizer = ops.where(ops.equal(normalizer, 0.0), 1.0, normalizer)
        normalized = gramian / (normalizer[:, None] * normalizer[None, :])       # Gramian of g_t / n_t
        weights = solvers.min_norm_weights(normalized, allowed=task_jacobian.labelled)   # Eq. (3)
        return Aggregation(task_weights=weights, head_weights=weights if self.scale_heads else None)

    def get_config(self):
        config = super().get_config()
        config.update({"normalization": self.normalization, "scale_heads": self.scale_heads})
        return config
