"""The per-task trackers of the train and test steps: one metric per kind (loss, weight, gradient norm) holding
the T running means, instead of T `keras.metrics.Mean` objects (on torch each Mean costs two variable updates
and one result per task and step in eager Python)."""

import keras
from keras import ops


class TaskMeans(keras.metrics.Metric):
    """Running means of a (T,) value per step, one per task; `result()` is {f"{task}_{kind}": mean}.

    `update_state(values, mask=None)`: adds `values` (T,) to the totals and one to the counts, only where `mask`
    (a bool scalar or (T,) tensor) when given. A task never counted has mean 0, as a `keras.metrics.Mean`.
    """

    def __init__(self, task_names, kind, **kwargs):
        super().__init__(name=f"task_{kind}", **kwargs)
        self.task_names, self.kind = list(task_names), kind
        self.keys = [f"{task}_{kind}" for task in self.task_names]
        shape = (len(self.task_names),)
        self.total = self.add_variable(shape=shape, initializer="zeros", dtype="float32", name="total")
        self.count = self.add_variable(shape=shape, initializer="zeros", dtype="float32", name="count")

    def update_state(self, values, mask=None):
        values = ops.cast(values, "float32")
        if mask is None:
            self.total.assign_add(values)
            self.count.assign_add(ops.ones_like(values))
            return
        counted = ops.broadcast_to(ops.cast(mask, "float32"), ops.shape(values))
        self.total.assign_add(ops.where(counted > 0, values, ops.zeros_like(values)))
        self.count.assign_add(counted)

    def result(self):
        means = ops.divide_no_nan(ops.convert_to_tensor(self.total), ops.convert_to_tensor(self.count))
        return {key: means[t] for t, key in enumerate(self.keys)}

    def get_config(self):
        return {"task_names": self.task_names, "kind": self.kind}


class TaskSums(TaskMeans):
    """As `TaskMeans`, with the totals as the result: `{f"{task}_{kind}": sum}` (e.g. the steps a task took part
    in, from one 0/1 value per task and step)."""

    def result(self):
        # A copy: on torch the variable's tensor is a view, which validation's reset_state would zero in the logs.
        totals = ops.copy(ops.convert_to_tensor(self.total))
        return {key: totals[t] for t, key in enumerate(self.keys)}
