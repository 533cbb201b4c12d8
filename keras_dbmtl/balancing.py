"""The balancing core: what every front door calls, written once with `keras.ops`.

One balanced step, whatever trains the network (`MultiTaskModel.fit`, a user's JAX/optax step, a plain PyTorch
or TensorFlow loop):

    raw task losses (T,)
      -> `balancer.task_losses(raw)`: `TaskLosses(raw, transformed)`      the loss transform (log under DB-MTL)
      -> the task Jacobian of `transformed` on the shared variables      the caller's autodiff
         (one (T, *shape) block per shared variable) and each task's
         own gradients (of its transformed loss, on its own variables)
      -> `balance(balancer, losses, shared_blocks, task_gradients)`     this module
      -> `Balanced(shared, heads, task_weights, head_weights, jacobian)`: one direction per shared variable,
         each task's own gradients times its head weight                 the caller's optimizer

A loss-level balancer (`uses_task_gradients = False`) needs no Jacobian: `combine_losses(losses)` gives the
scalar to differentiate once and the task weights (`combine`).

What a front door reads of a balancer (the protocol; `keras_dbmtl.balancers.base.Balancer` implements it):

    build(num_tasks, num_shared_parameters, task_names, shared_shapes)    state, sized once; then `num_tasks`,
                                            `task_names`, `shared_shapes` say what it was built for
    uses_task_gradients                     gradient level (True: `aggregate`) or loss level (`combine_losses`)
    task_losses(raw) -> TaskLosses (`transform_losses(raw)`: its transformed part);  invalid_losses(raw) -> (T,) bool
    aggregate(losses, task_jacobian) -> Aggregation   |   combine_losses(losses) -> (loss, weights)
    trainable_variables                     learned balancer parameters (UW, IMTL, IMTL-L, GradNorm): they get
                                            the gradient of sum_t transformed_t and the network's optimizer
    after_step(raw, losses_after), on_epoch_end(epoch)                   hooks (FAMO, DWA)
    variables, non_trainable_variables, built                            its state, as a Keras layer's (the step
                                            snapshots it to skip an unusable step and between amortised refreshes)
    accepts_loss_weights, loss_transform    read by `MultiTaskModel.compile` only (`loss_weights=`)
    name, get_config / from_config          `compile`: a fresh copy of an object already in another model

Nothing else: `keras_dbmtl/train_step.py` and the doors read these members and no others.
"""

import collections
import collections.abc
import math

from keras import ops

from keras_dbmtl.balancers import base as balancer_base
from keras_dbmtl.balancers import registry

#: The balanced step: `shared`, one direction per shared variable (the shapes of the Jacobian's blocks);
#: `heads`, for each task, its own gradients times its head weight; `task_weights` (T,) to log; `head_weights`
#: (T,) or None (all ones); `jacobian`, the step's `TaskJacobian`; `unowned`, for each of `unowned_blocks`,
#: sum_t h_t row_t (empty without).
Balanced = collections.namedtuple("Balanced", ["shared", "heads", "task_weights", "head_weights", "jacobian",
                                               "unowned"], defaults=((),))


def resolve(balancer, **kwargs):
    """A balancer object from a registered name (with its hyperparameters as `kwargs`) or a `Balancer`."""
    if isinstance(balancer, balancer_base.Balancer):
        if kwargs:
            raise TypeError(f"Hyperparameters {sorted(kwargs)} were given with a balancer object; set them when "
                            f"creating it, or pass its name: {type(balancer).__name__}({', '.join(kwargs)}=...).")
        return balancer
    if isinstance(balancer, str):
        return registry.get(balancer, **kwargs)
    raise TypeError(f"balancer must be a registered name ({', '.join(registry.names())}) or a "
                    f"keras_dbmtl.balancers.Balancer object, not {type(balancer).__name__}.")


def build(balancer, tasks, shared_shapes):
    """Sizes the balancer's state for `tasks` (the task names, or their number) and shared variables of
    `shared_shapes` (once)."""
    shapes = [tuple(int(d) for d in shape) for shape in shared_shapes]
    names = None if isinstance(tasks, int) else list(tasks)
    if not balancer.built:
        balancer.build(len(names) if names is not None else tasks, sum(math.prod(shape) for shape in shapes),
                       names, shared_shapes=shapes)
    return balancer


def split_flat(flat, shapes):
    """A flat (P,) tensor as one tensor per shape."""
    pieces, start = [], 0
    for shape in shapes:
        size = math.prod(int(d) for d in shape)
        pieces.append(ops.reshape(flat[start : start + size], tuple(shape)))
        start += size
    return pieces


def balance(balancer, losses, shared_blocks, task_gradients=None, labelled=None, gradient_statistics=None,
            unowned_blocks=None):
    """The gradient-level balance of one step.

    Args:
        balancer: a built gradient-level balancer.
        losses: `TaskLosses` (raw and transformed, (T,) float32).
        shared_blocks: the task Jacobian of the transformed losses, one (T, *shape) tensor per shared variable.
        task_gradients: for each task, the gradients of its transformed loss on its own variables (or None).
        labelled: None, or (T,) bool: False for a task without labels in this batch (`TaskJacobian.labelled`).
        gradient_statistics: a `keras_dbmtl.metrics.GradientStatistics` to update with the Gramian, or None.
        unowned_blocks: (T, *shape) blocks of non-shared variables whose task is unknown (a subclassed model's):
            each gets sum_t h_t row_t, its own task's gradient times the head weight when one task reaches it.

    Returns:
        `Balanced`: the shared direction `d = w^T J` (or the balancer's own flat direction, split per variable)
        and each head's gradients times its head weight.
    """
    num_tasks = int(shared_blocks[0].shape[0])
    jacobian = balancer_base.TaskJacobian(shared_blocks, num_tasks, labelled)
    if gradient_statistics is not None:
        gradient_statistics.update_state(jacobian.gramian())
    aggregation = balancer.aggregate(losses, jacobian)
    if aggregation.shared_direction is None:
        shared = jacobian.weighted_sum_blocks(aggregation.task_weights)
    else:
        shared = split_flat(aggregation.shared_direction, [block.shape[1:] for block in jacobian.blocks])
    heads = [list(group) for group in (task_gradients or [[] for _ in range(num_tasks)])]
    if aggregation.head_weights is not None:
        heads = [[g * ops.cast(aggregation.head_weights[t], g.dtype) for g in group] for t, group in enumerate(heads)]
    unowned = []
    if unowned_blocks:
        weights = ops.ones((num_tasks,), "float32") if aggregation.head_weights is None else aggregation.head_weights
        unowned = [ops.tensordot(ops.cast(weights, block.dtype), block, axes=1) for block in unowned_blocks]
    return Balanced(shared, heads, aggregation.task_weights, aggregation.head_weights, jacobian, unowned)


def combine(balancer, losses):
    """The loss-level balance: (scalar loss to differentiate once, (T,) task weights)."""
    return balancer.combine_losses(losses)


def named_losses(losses, door):
    """(names, values, keyed) of a door's `losses`: a dict {task: scalar} (its keys, in order) or a sequence of
    scalars (named task0, task1, ...). `door` names the call in the errors (e.g. "backward")."""
    if isinstance(losses, collections.abc.Mapping):
        names, values, keyed = [str(k) for k in losses], list(losses.values()), True
    elif isinstance(losses, (list, tuple)):
        names, values, keyed = [f"task{i}" for i in range(len(losses))], list(losses), False
    else:
        raise TypeError(f"losses must be a dict {{task: scalar tensor}} or a list of scalar tensors, not "
                        f"{type(losses).__name__}.")
    if not values:
        raise ValueError(f"losses is empty: {door} needs one loss per task.")
    return names, values, keyed


def check_same_tasks(names, keyed, first_names, first_keyed, door):
    """A door's later call has the first call's form (dict or list) and task names (None: this is the first)."""
    if first_keyed is not None and keyed != first_keyed:
        raise TypeError("losses were a " + ("dict" if first_keyed else "list") + " at the first call: keep the "
                        "same form at every call.")
    if first_names is not None and names != list(first_names):
        if keyed:
            raise ValueError(f"The task names changed from {list(first_names)} (the first call) to {names}: pass "
                             "the same keys, in the same order, at every call.")
        raise ValueError(f"{door} got {len(names)} losses; the first call had {len(first_names)}.")
