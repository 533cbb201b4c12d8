r"""RLW: random loss weighting (Lin et al., "Reasonable Effectiveness of Random Weighting", TMLR 2022).

$$
\begin{aligned}
\lambda &\sim p(\lambda), \quad w = \operatorname{softmax}(\lambda) \qquad \text{Section 3 of the paper} \\
L &= \textstyle\sum_t w_t \ell_t \qquad \text{new weights at every step}
\end{aligned}
$$

`distribution="normal"` (the paper's default and LibMTL's: lambda ~ N(0, I)) or `"uniform"` (U(0, 1)), both
followed by a softmax, so the weights sum to 1. The samples come from a `keras.random.SeedGenerator` owned by the
balancer, whose state is a variable: it is saved with the model and threaded through the JAX stateless step.
"""

import keras
from keras import ops

from keras_dbmtl.balancers._checks import check_hyperparameters
from keras_dbmtl.balancers.base import Disclaimed, LossBalancer
from keras_dbmtl.balancers.registry import register

DISTRIBUTIONS = ("normal", "uniform")


@register("rlw")
class RLW(LossBalancer):
    """Random loss weights w = softmax(lambda), lambda ~ N(0, I) redrawn every step. Cost: 1 backward.

    Args:
        distribution: "normal" (default) or "uniform".
        seed: seed of the balancer's `SeedGenerator` (None: random).
    """

    plain_single_task = True
    permutation_equivariant = Disclaimed("random weights")

    def __init__(self, distribution="normal", seed=None, loss_transform=None, eps=1e-8, **kwargs):
        super().__init__(loss_transform=loss_transform, eps=eps, **kwargs)
        check_hyperparameters(self, distribution=(distribution, DISTRIBUTIONS))
        self.distribution = distribution
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def combine_losses(self, losses):
        shape = (self.num_tasks,)
        if self.distribution == "normal":
            lam = keras.random.normal(shape, seed=self.seed_generator)           # lambda ~ N(0, I)
        else:
            lam = keras.random.uniform(shape, seed=self.seed_generator)
        weights = ops.softmax(lam)                                              # w = softmax(lambda)
        return ops.sum(weights * losses.transformed), weights

    def get_config(self):
        config = super().get_config()
        config.update({"distribution": self.distribution, "seed": self.seed})
        return config
