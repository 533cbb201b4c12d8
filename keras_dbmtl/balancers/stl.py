r"""STL: single-task learning through the multi-task model, for the STL baselines of every application.

$$
\begin{aligned}
L &= \ell_{\mathrm{task}} \qquad \text{weight 1 on the chosen task, 0 on the others}
\end{aligned}
$$

The other heads receive no gradient (their losses are still computed and logged). `STL(task="depth")` picks the
task by name (or index); `balancers.get("stl")` trains the first task.
"""

from keras import ops

from keras_dbmtl.balancers._checks import check_hyperparameters, resolve_task
from keras_dbmtl.balancers.base import Disclaimed, LossBalancer
from keras_dbmtl.balancers.registry import register


@register("stl")
class STL(LossBalancer):
    """Trains one task only. Cost: 1 backward.

    Args:
        task: the task's name or index (default: the first task).
    """

    plain_single_task = True
    permutation_equivariant = Disclaimed("one chosen task")

    def __init__(self, task=None, loss_transform=None, eps=1e-8, **kwargs):
        super().__init__(loss_transform=loss_transform, eps=eps, **kwargs)
        check_hyperparameters(self, task=(task, (None, "int [0, inf)", str)))
        self.task = task

    def build(self, num_tasks, num_shared_parameters, task_names=None, shared_shapes=None):
        self.task_index = resolve_task(self.task, task_names, num_tasks)
        super().build(num_tasks, num_shared_parameters, task_names, shared_shapes)

    def combine_losses(self, losses):
        weights = ops.one_hot(self.task_index, self.num_tasks, dtype="float32")
        return losses.transformed[self.task_index], weights

    def get_config(self):
        config = super().get_config()
        config["task"] = self.task
        return config
