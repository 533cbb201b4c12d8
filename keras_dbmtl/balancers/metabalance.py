r"""MetaBalance: adapting the gradient magnitudes of auxiliary tasks (He et al., "MetaBalance: Improving
Multi-Task Recommendations via Adapting Gradient Magnitudes of Auxiliary Tasks", WWW 2022).

For every shared variable v (a weight tensor) and task t, with `target` the task the others are balanced to:

$$
\begin{aligned}
m_t^v &\leftarrow \beta m_t^v + (1 - \beta) \lVert g_t^v \rVert \qquad \text{moving average of the magnitude} \\
g_t^v &\leftarrow r \, (m_{\mathrm{target}}^v / m_t^v) \, g_t^v + (1 - r) \, g_t^v \qquad \text{Algorithm 1, relax factor } r \\
d^v &= \textstyle\sum_t g_t^v
\end{aligned}
$$

Defaults r = 0.7, beta = 0.9 (the paper's). The paper has one target task and auxiliary tasks; its optimizer
takes the first loss as the target, so does this class by default (`target=0`, or a task name). The moving
averages start at 0 as in the official code and are a state variable of shape (T, P), each variable's value
repeated over its entries (the balancer is built before it sees the variables' shapes; a (T, number of shared
variables) state would need the model to pass those shapes to `build`). Needs the
per-variable gradient blocks (a `JacobianBalancer`; the direction is formed block by block). Heads receive their
own task's gradient (the official optimizer also rescales the auxiliary heads, by 1 - r, an artefact of heads
having no target-task gradient; not reproduced). Logged weight: the scale factor averaged over the variables.
"""

from keras import ops

from keras_dbmtl.balancers._checks import check_hyperparameters, resolve_task
from keras_dbmtl.balancers.base import Aggregation, Disclaimed, JacobianBalancer
from keras_dbmtl.balancers.registry import register


@register("metabalance")
class MetaBalance(JacobianBalancer):
    """MetaBalance: every task's gradient magnitude pulled towards the target task's, per shared variable.

    Cost: T backward.

    Args:
        relax_factor: r in [0, 1) (default 0.7).
        beta: moving-average rate of the magnitudes (default 0.9).
        target: the target task, by index or name (default 0, the first).
    """

    plain_single_task = True
    permutation_equivariant = Disclaimed("target task 0")
    amortisable = Disclaimed("element-wise magnitude balancing")

    def __init__(self, relax_factor=0.7, beta=0.9, target=0, loss_transform=None, eps=1e-8, **kwargs):
        super().__init__(loss_transform=loss_transform, eps=eps, **kwargs)
        check_hyperparameters(self, relax_factor=(relax_factor, "[0, 1]"), beta=(beta, "[0, 1)"),
                              target=(target, ("int [0, inf)", str)))
        self.relax_factor = float(relax_factor)
        self.beta = float(beta)
        self.target = target

    def build(self, num_tasks, num_shared_parameters, task_names=None, shared_shapes=None):
        self.target_index = resolve_task(self.target, task_names, num_tasks, "target task")
        super().build(num_tasks, num_shared_parameters, task_names, shared_shapes)
        self.magnitudes = self.state_variable((num_tasks, num_shared_parameters), "magnitudes")

    def aggregate(self, losses, task_jacobian):
        flats = [ops.reshape(block, (self.num_tasks, -1)) for block in task_jacobian.blocks]
        norms = [ops.sqrt(ops.sum(flat * flat, axis=1, keepdims=True)) for flat in flats]        # ||g_t^v||
        current = ops.concatenate([ops.broadcast_to(n, ops.shape(f)) for n, f in zip(norms, flats)], axis=1)
        averages = self.beta * self.magnitudes + (1.0 - self.beta) * current                     # m_t^v
        self.magnitudes.assign(averages)
        ratio = averages[self.target_index][None, :] / (averages + self.eps)                     # m_target / m_t
        scales = self.relax_factor * ratio + (1.0 - self.relax_factor)
        direction = ops.sum(scales * task_jacobian.matrix(), axis=0)
        per_variable = ops.stack([s[:, 0] for s in self._split(scales, flats)], axis=1)
        return Aggregation(task_weights=ops.mean(per_variable, axis=1), shared_direction=direction)

    @staticmethod
    def _split(matrix, flats):
        pieces, start = [], 0
        for flat in flats:
            size = flat.shape[1]
            pieces.append(matrix[:, start:start + size])
            start += size
        return pieces

    def get_config(self):
        config = super().get_config()
        config.update({"relax_factor": self.relax_factor, "beta": self.beta, "target": self.target})
        return config
