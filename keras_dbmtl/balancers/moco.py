r"""MoCo: multi-objective gradient correction (Fernando et al., "Mitigating Gradient Bias in Multi-objective
Learning: A Provably Convergent Approach", ICLR 2023).

$$
\begin{aligned}
h_t &= \ell_t \, g_t / \lVert g_t \rVert \qquad \text{the authors' code: normalised gradients scaled by the raw loss} \\
y_t &\leftarrow y_t - \beta_k (y_t - h_t) \qquad \text{Algorithm 1: tracking of the task gradients} \\
\lambda &\leftarrow \operatorname{Proj}_{\text{simplex}}\big(\lambda - \gamma_k (Y Y^\top + \rho I) \lambda\big) \\
d &= Y^\top \lambda \\
\beta_k &= \beta / k^{\beta_\sigma}, \quad \gamma_k = \gamma / k^{\gamma_\sigma}
\end{aligned}
$$

Defaults (the authors' code via LibMTL): beta = 0.5, beta_sigma = 0.5, gamma = 0.1, gamma_sigma = 0.5, rho = 0.
The paper projects lam onto the simplex (as here); LibMTL uses a softmax instead. The paper's projection of y_t
onto a ball of radius L_t is omitted, as in the authors' code. State: Y (T x P) and lam (T). Heads receive their
own task's gradient.
"""

import keras
from keras import ops

from keras_dbmtl.balancers import solvers
from keras_dbmtl.balancers._checks import check_hyperparameters
from keras_dbmtl.balancers.base import Aggregation, Disclaimed, JacobianBalancer
from keras_dbmtl.balancers.registry import register


@register("moco")
class MoCo(JacobianBalancer):
    """MoCo: MGDA-like weights on tracked (momentum) task gradients. Cost: T backward.

    Args:
        beta, beta_sigma: tracking rate beta / k^beta_sigma (defaults 0.5, 0.5).
        gamma, gamma_sigma: weight step gamma / k^gamma_sigma (defaults 0.1, 0.5).
        rho: l2 regularisation of lam (default 0.0).
    """

    plain_single_task = Disclaimed("scaled by the raw loss and normalised")
    permutation_equivariant = True
    amortisable = "lambda from the last refresh; tracked gradients and lambda updated on refresh steps"

    def __init__(self, beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=0.0, loss_transform=None,
                 eps=1e-8, **kwargs):
        super().__init__(loss_transform=loss_transform, eps=eps, **kwargs)
        check_hyperparameters(self, beta=(beta, "(0, 1]"), beta_sigma=(beta_sigma, "[0, inf)"),
                              gamma=(gamma, "(0, inf)"), gamma_sigma=(gamma_sigma, "[0, inf)"), rho=(rho, "[0, inf)"))
        self.beta, self.beta_sigma = float(beta), float(beta_sigma)
        self.gamma, self.gamma_sigma = float(gamma), float(gamma_sigma)
        self.rho = float(rho)

    def build(self, num_tasks, num_shared_parameters, task_names=None, shared_shapes=None):
        super().build(num_tasks, num_shared_parameters, task_names, shared_shapes)
        self.tracked = self.state_variable((num_tasks, num_shared_parameters), "tracked")          # Y
        self.lam = self.state_variable((num_tasks,), "lam", initializer=keras.initializers.Constant(1.0 / num_tasks))

    def aggregate(self, losses, task_jacobian):
        k = self.next_step()
        gradients = task_jacobian.matrix()
        norms = ops.sqrt(ops.sum(gradients * gradients, axis=1, keepdims=True))
        h = gradients / (norms + self.eps) * losses.raw[:, None]
        beta_k = self.beta / ops.power(k, self.beta_sigma)
        gamma_k = self.gamma / ops.power(k, self.gamma_sigma)
        tracked = self.tracked - beta_k * (self.tracked - h)
        gram = ops.matmul(tracked, ops.transpose(tracked)) + self.rho * ops.eye(self.num_tasks)
        lam = solvers.simplex_projection(self.lam - gamma_k * ops.matmul(gram, self.lam))
        self.tracked.assign(tracked)
        self.lam.assign(lam)
        return Aggregation(task_weights=lam, shared_direction=ops.matmul(lam[None, :], tracked)[0])

    def get_config(self):
        config = super().get_config()
        config.update({"beta": self.beta, "beta_sigma": self.beta_sigma, "gamma": self.gamma,
                       "gamma_sigma": self.gamma_sigma, "rho": self.rho})
        return config
