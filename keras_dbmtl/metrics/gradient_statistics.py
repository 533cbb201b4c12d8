"""`GradientStatistics`: the task gradients' Gramian, cosines and conflicts, averaged over an epoch.

Fed by `MultiTaskModel` (its `gradient_statistics` attribute) with the T x T Gramian G = J J^T of the per-task
gradients on the shared variables at every applied step (the Gramian the logged gradient norms come from, so it
costs T x T work per step). Per step it forms

    cos_ij = G_ij / sqrt(G_ii G_jj)     (0 where a task's gradient is zero)
    conflicts = #{i < j : cos_ij < 0}

and `result()` gives their means over the steps so far: {"gramian", "cosine", "conflicting_pairs", "steps"}.
The gradients are those the balancer sees (of the transformed losses, e.g. log L_t for DB-MTL); cosines and
conflicts do not depend on a positive scale per task, so they are also those of the raw losses.
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_dbmtl")
class GradientStatistics(keras.metrics.Metric):
    """Epoch means of the task-gradient Gramian, pairwise cosines and number of conflicting pairs."""

    def __init__(self, num_tasks, name="gradient_statistics", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_tasks = int(num_tasks)
        shape = (self.num_tasks, self.num_tasks)
        self.gramian_sum = self.add_variable(shape=shape, initializer="zeros", name="gramian_sum")
        self.cosine_sum = self.add_variable(shape=shape, initializer="zeros", name="cosine_sum")
        self.conflicts_sum = self.add_variable(shape=(), initializer="zeros", name="conflicts_sum")
        self.steps = self.add_variable(shape=(), initializer="zeros", name="steps")

    @staticmethod
    def cosines(gramian):
        gramian = ops.cast(gramian, "float32")
        norms = ops.sqrt(ops.maximum(ops.diagonal(gramian), 0.0))
        denominator = ops.expand_dims(norms, 1) * ops.expand_dims(norms, 0)
        safe = ops.where(denominator > 0.0, denominator, 1.0)
        return ops.where(denominator > 0.0, ops.clip(gramian / safe, -1.0, 1.0), 0.0)

    def update_state(self, gramian):
        gramian = ops.cast(gramian, "float32")
        cosine = self.cosines(gramian)
        conflicts = ops.sum(ops.cast(cosine < 0.0, "float32")) / 2.0
        self.gramian_sum.assign_add(gramian)
        self.cosine_sum.assign_add(cosine)
        self.conflicts_sum.assign_add(conflicts)
        self.steps.assign_add(1.0)

    def result(self):
        steps = ops.maximum(self.steps, 1.0)
        return {"gramian": self.gramian_sum / steps, "cosine": self.cosine_sum / steps,
                "conflicting_pairs": self.conflicts_sum / steps, "steps": self.steps}

    def get_config(self):
        return {**super().get_config(), "num_tasks": self.num_tasks}
