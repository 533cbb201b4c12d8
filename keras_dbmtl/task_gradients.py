"""Variations of the "task gradients" stage: `compile(task_gradients=..., task_gradients_every=k)`.

The exact step of a gradient-level balancer computes, every step, the T x P Jacobian of the task losses with
respect to the shared variables: one forward and T backward passes, (1 + T b) / (1 + b) of an EW step (b: the
cost of a backward pass relative to the forward). Two ways below that floor:

**Amortised** (`task_gradients_every=k`, k > 1). Every k-th step (the refresh steps, the first one included) is
the exact step: the T per-task gradients and the balancer's normal update. On the k - 1 steps in between, the
shared variables get one backward pass of sum_t w_t * loss_t (transformed losses, e.g. log(l_t + eps)) with the
task weights w_t of the last refresh step (for DB-MTL w_t = alpha_k / (||ema_t|| + eps): the direction
sum_t w_t grad_theta log(l_t + eps)); each head gets the gradient of its own transformed loss times its head
weight of the last refresh (1 for most methods). The balancer's state (DB-MTL's EMA, its step counter, MoCo's
tracked gradients, GradVac's targets, Nash-MTL's warm start, random generators, ...) is updated on refresh steps
only, and so are `gradient_statistics` and the logged gradient norms; the logged task weights are the ones the
step applied. Cost per step: ((k - 1)(1 + b) + (1 + T b)) / (k (1 + b)) of EW. The choice between the two
gradient computations is a `cond` on a step counter kept in a variable (`jax.lax.cond` / `tf.cond`; a Python
branch on torch), so the compiled step holds both.

**Representation** (`task_gradients="representation"`; MGDA-UB of Sener & Koltun, the reference library's
`rep_grad`). The per-task gradients are taken with respect to the encoder's output z (shape (B, ...)): the
balancer sees the T x (B * size of z) Jacobian of the task losses with respect to z (backward passes through the
heads only), and the encoder gets one backward pass with the cotangent sum_t w_t dl_t/dz. An approximation of the
parameter-level method; cheap when the heads are small next to the encoder.

Which methods allow which (`check`): amortisation needs a method whose shared direction is a weighted sum of the
task gradients (or of a state built from them, DB-MTL, MoCo) and no learned balancer variables; the
representation level needs a method that reads only the T x T Gramian (a T x P state has no meaning over
representation gradients of different batches) and no learned variables. Each balancer class declares both
(`Balancer.amortisable`, `Balancer.representation_level`: a description or `Disclaimed(reason)`).
"""

import keras
from keras import ops

from keras_dbmtl import gradients as gradient_backends
from keras_dbmtl.balancers import base as balancer_base
from keras_dbmtl.balancers import registry

MODES = ("parameters", "representation")


def amortisable(balancer):
    """Whether `task_gradients_every=k > 1` applies: the class's declaration (`Balancer.amortisable`), or, for an
    undeclared balancer, whether it is a Gramian balancer without learned variables."""
    declared = type(balancer).amortisable
    return _gramian_only(balancer) if declared is None else bool(declared)


def representation_level(balancer):
    """Whether `task_gradients="representation"` applies: the class's declaration, or, undeclared, as above."""
    declared = type(balancer).representation_level
    return _gramian_only(balancer) if declared is None else bool(declared)


def _reason(declared):
    """A disclaimer's reason (a `Disclaimed` is a false str), or the rule applied to an undeclared balancer."""
    return "it is not a Gramian balancer without learned variables" if declared is None else str(declared)


def available(capability):
    """The registered names whose class declares `capability` ("amortisable", "representation_level")."""
    return [cls.registered_name for cls in registry.registered_classes() if getattr(cls, capability)]


def _name(balancer):
    return getattr(type(balancer), "registered_name", type(balancer).__name__)


def _gramian_only(balancer):
    return isinstance(balancer, balancer_base.GramianBalancer) and not balancer.trainable_weights


def check(balancer, mode, every, model=None):
    """Raises a ValueError naming the mistake when `mode` / `every` do not apply to `balancer` or, when given, to
    `model` (without one, e.g. a command line checking its arguments before any model exists, the balancer only)."""
    if mode not in MODES:
        raise ValueError(f"task_gradients must be one of {MODES}; received {mode!r}.")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"task_gradients_every must be a positive integer (1: every step); received {every!r}.")
    name = _name(balancer)
    if mode == "parameters" and every == 1:
        return
    if not balancer.uses_task_gradients:
        raise ValueError(
            f"task_gradients={mode!r}, task_gradients_every={every} change how per-task gradients are computed; "
            f"balancer {name!r} is loss-level and computes none (one backward pass per step already). Remove them."
        )
    if every > 1 and not amortisable(balancer):
        why = _reason(type(balancer).amortisable)
        raise ValueError(
            f"task_gradients_every={every} is not available for balancer {name!r} ({why}). It is available "
            f"for {available('amortisable')}; use task_gradients_every=1 with {name!r}."
        )
    if mode == "representation":
        if every > 1:
            raise ValueError("task_gradients='representation' already costs about one backward pass through the "
                             "encoder; use it with task_gradients_every=1.")
        if not representation_level(balancer):
            why = _reason(type(balancer).representation_level)
            raise ValueError(
                f"task_gradients='representation' is not available for balancer {name!r} ({why}). Available "
                f"for {available('representation_level')}."
            )
        if model is None:
            return
        if any(getattr(layer, "activity_regularizer", None) is not None
               for layer in model.encoder._flatten_layers(include_self=True)):
            raise ValueError(
                "task_gradients='representation' does not support activity regularizers inside the encoder (their "
                "loss is not a function of the representation). Remove them or use task_gradients='parameters'."
            )
        if model.per_task_inputs or model.task_layers:
            raise ValueError(
                "task_gradients='representation' needs one shared representation for every task: it is not "
                "available with per_task_inputs=True or task_layers. Use task_gradients='parameters'."
            )


class AmortisedSchedule(keras.layers.Layer):
    """The state of `task_gradients_every=k`: the step counter, and the task and head weights of the last
    refresh step. A layer only so that the model tracks (saves, threads through JAX) its variables."""

    def __init__(self, every, num_tasks, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.every = int(every)
        self.num_tasks = int(num_tasks)
        self.step = self.add_weight(shape=(), dtype="int32", initializer="zeros", trainable=False, name="step")
        self.weights_applied = self.add_weight(shape=(num_tasks,), initializer="ones", trainable=False,
                                               name="task_weights")
        self.head_weights = self.add_weight(shape=(num_tasks,), initializer="ones", trainable=False,
                                            name="head_weights")
        self.built = True

    def refresh(self):
        """The schedule's decision for this step: whether it computes the per-task gradients (bool scalar)."""
        return ops.equal(ops.mod(ops.convert_to_tensor(self.step), self.every), 0)

    def stored(self):
        """(task weights, head weights) of the last refresh step, (T,) each: what the steps in between apply."""
        return ops.convert_to_tensor(self.weights_applied), ops.convert_to_tensor(self.head_weights)

    def commit(self, refresh, task_weights, head_weights=None):
        """Ends the step: on a refresh step (`refresh` a bool scalar tensor, or a Python bool where the step
        branches in Python) stores the balancer's fresh `task_weights` and `head_weights` (None: all ones); advances
        the counter. Returns the task weights the step applied."""
        fresh_weights = ops.cast(task_weights, "float32")
        fresh_heads = (ops.ones((self.num_tasks,), "float32") if head_weights is None
                       else ops.cast(head_weights, "float32"))
        stored_weights, stored_heads = self.stored()
        applied = ops.where(refresh, fresh_weights, stored_weights)
        self.weights_applied.assign(applied)
        self.head_weights.assign(ops.where(refresh, fresh_heads, stored_heads))
        self.step.assign_add(ops.cast(1, "int32"))
        return applied

    def get_config(self):
        return {"every": self.every, "num_tasks": self.num_tasks, "name": self.name}


def step_cost(every, num_tasks, backward_cost):
    """Cost of one step relative to EW: ((k - 1)(1 + b) + (1 + T b)) / (k (1 + b))."""
    k, t, b = every, num_tasks, backward_cost
    return ((k - 1) * (1 + b) + (1 + t * b)) / (k * (1 + b))
