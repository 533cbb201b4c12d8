r"""MTAdam: multi-task Adam (Malkiel and Wolf, "MTAdam: Automatic Balancing of Multiple Training Loss Terms",
EMNLP 2021).

For every shared variable v and task t (task 0 is the anchor, the first task with a non-zero magnitude):

$$
\begin{aligned}
n_t^v &\leftarrow \lVert g_t^v \rVert \text{ at the first step, then } \beta_3 n_t^v + (1 - \beta_3) \lVert g_t^v \rVert \\
g_t^v &\leftarrow (n_{\mathrm{anchor}}^v / n_t^v) \, g_t^v \qquad \text{Algorithm 1: balance the magnitudes} \\
m_t &\leftarrow \beta_1 m_t + (1 - \beta_1) g_t; \quad u_t \leftarrow \beta_2 u_t + (1 - \beta_2) g_t^2 \qquad \text{one Adam state per task} \\
d &= \frac{1}{1 - \beta_1^k} \textstyle\sum_t m_t \Big/ \max_t\Big(\sqrt{u_t / (1 - \beta_2^k)} + \epsilon\Big) \\
\theta &\leftarrow \theta - \mathrm{lr} \, d
\end{aligned}
$$

Defaults beta = (0.9, 0.999, 0.9), eps = 1e-8 (the paper's). MTAdam is an optimizer; here it is a balancer that
returns d, and the model's optimizer then applies its own rule to d. Compile with
`optimizer=keras.optimizers.SGD(learning_rate=lr)` to get exactly MTAdam's update of the shared variables (the
heads, which have one task each, then get plain SGD rather than MTAdam's Adam; with Adam, the shared variables get
Adam applied to MTAdam's direction). State: m and u (T x P each) and the magnitudes (T x P, each variable's value
repeated over its entries: the balancer does not know the variables' shapes at build time).
Logged weight: the balancing factor n_anchor / n_t averaged over the variables.
"""

from keras import ops

from keras_dbmtl.balancers._checks import check_hyperparameters
from keras_dbmtl.balancers.base import Aggregation, Disclaimed, JacobianBalancer
from keras_dbmtl.balancers.registry import register


@register("mtadam")
class MTAdam(JacobianBalancer):
    """MTAdam: per-task Adam moments on magnitude-balanced task gradients. Cost: T backward.

    Args:
        beta_1, beta_2: Adam's moment rates (defaults 0.9, 0.999).
        beta_3: rate of the gradient-magnitude averages (default 0.9).
        epsilon: Adam's epsilon (default 1e-8).
    """

    plain_single_task = Disclaimed("Adam-normalised direction")
    permutation_equivariant = Disclaimed("anchor task 0")
    amortisable = Disclaimed("element-wise Adam-style moments of each task's gradient")

    def __init__(self, beta_1=0.9, beta_2=0.999, beta_3=0.9, epsilon=1e-8, loss_transform=None, eps=1e-8,
                 **kwargs):
        super().__init__(loss_transform=loss_transform, eps=eps, **kwargs)
        check_hyperparameters(self, beta_1=(beta_1, "[0, 1)"), beta_2=(beta_2, "[0, 1)"),
                              beta_3=(beta_3, "[0, 1)"), epsilon=(epsilon, "(0, inf)"))
        self.beta_1, self.beta_2, self.beta_3 = float(beta_1), float(beta_2), float(beta_3)
        self.epsilon = float(epsilon)

    def build(self, num_tasks, num_shared_parameters, task_names=None, shared_shapes=None):
        super().build(num_tasks, num_shared_parameters, task_names, shared_shapes)
        shape = (num_tasks, num_shared_parameters)
        self.first_moments = self.state_variable(shape, "first_moments")
        self.second_moments = self.state_variable(shape, "second_moments")
        self.magnitudes = self.state_variable(shape, "magnitudes")

    def aggregate(self, losses, task_jacobian):
        k = self.next_step()
        flats = [ops.reshape(block, (self.num_tasks, -1)) for block in task_jacobian.blocks]
        current = ops.concatenate(
            [ops.broadcast_to(ops.sqrt(ops.sum(f * f, axis=1, keepdims=True)), ops.shape(f)) for f in flats], axis=1
        )
        magnitudes = ops.where(k == 1.0, current, self.beta_3 * self.magnitudes + (1.0 - self.beta_3) * current)
        self.magnitudes.assign(magnitudes)
        alive = magnitudes > 1e-10
        anchor = ops.argmax(ops.cast(alive, "int32"), axis=0)                      # first task with a magnitude
        anchor_magnitude = ops.take_along_axis(magnitudes, anchor[None, :], axis=0)
        balance = ops.where(alive, anchor_magnitude / ops.where(alive, magnitudes, 1.0), 1.0)
        gradients = balance * task_jacobian.matrix()
        m = self.beta_1 * self.first_moments + (1.0 - self.beta_1) * gradients
        u = self.beta_2 * self.second_moments + (1.0 - self.beta_2) * gradients * gradients
        self.first_moments.assign(m)
        self.second_moments.assign(u)
        denominator = ops.max(ops.sqrt(u / (1.0 - self.beta_2 ** k)) + self.epsilon, axis=0)
        direction = ops.sum(m, axis=0) / denominator / (1.0 - self.beta_1 ** k)
        return Aggregation(task_weights=ops.mean(balance, axis=1), shared_direction=direction)

    def get_config(self):
        config = super().get_config()
        config.update({"beta_1": self.beta_1, "beta_2": self.beta_2, "beta_3": self.beta_3, "epsilon": self.epsilon})
        return config
