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
        # one variable, one update per step: [sum of G (T*T), sum of cos (T*T), sum of conflicts, steps]
        self.totals = self.add_variable(shape=(2 * self.num_tasks ** 2 + 2,), initializer="zeros", name="totals")

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
        counts = ops.stack([conflicts, ops.ones_like(conflicts)])
        self.totals.assign_add(ops.concatenate([ops.reshape(gramian, (-1,)), ops.reshape(cosine, (-1,)), counts]))

    @staticmethod
    def split_totals(totals, num_tasks):
        """(gramian sum, cosine sum, conflicts sum, steps) from the `totals` vector."""
        size, shape = num_tasks * num_tasks, (num_tasks, num_tasks)
        return (ops.reshape(totals[:size], shape), ops.reshape(totals[size:2 * size], shape), totals[2 * size],
                totals[2 * size + 1])

    def result(self):
        gramian, cosine, conflicts, steps = self.split_totals(ops.convert_to_tensor(self.totals), self.num_tasks)
        denominator = ops.maximum(steps, 1.0)
        return {"gramian": gramian / denominator, "cosine": cosine / denominator,
                "conflicting_pairs": conflicts / denominator, "steps": steps}

    def get_config(self):
        return {**super().get_config(), "num_tasks": self.num_tasks}
