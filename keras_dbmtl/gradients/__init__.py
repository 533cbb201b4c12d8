"""The backend contract: a few primitives per backend, and the assembly of task gradients written once.

Each backend module (`keras_dbmtl/gradients/<backend>.py`) provides these primitives, and nothing else the model
uses; this is the only place that asks which backend runs (`backend_module`):

    pullback(forward, variables) -> (outputs, aux, pull)
        Runs forward() -> (outputs: tuple of tensors, aux) once; `pull(cotangents, indices, batched=False)`
        returns the gradients of sum_i <cotangents[i], outputs[i]> with respect to `variables[j]` for j in
        `indices` (zeros where unconnected). With `batched=True` each cotangent has a leading axis of size B and
        the result is one (B, *shape) block per variable (the backend's vectorised map); with
        `batched="sequential"` (backends with SEQUENTIAL_ROWS = True) the same blocks, the B rows pulled one after
        another in a loop the compiler keeps sequential (JAX: `lax.map`), so that one backward pass's
        temporaries are alive at a time (except where the backward pass holds a convolution: XLA:CPU runs one
        ~30x slower in a loop body, so JAX and TensorFlow unroll those rows);
    replica_mean(values): the mean over the data-parallel replicas of a list of tensors (one all-reduce);
    global_losses(task_losses): inside the differentiated forward, losses whose value is the global batch's and
        whose gradient is the replica's own share; optimizer_gradients(grads): what `optimizer.apply` gets;
    num_replicas(), replica_rank(), broadcast_from_root(tensors, root), init_process_group(backend, **kwargs);
    snapshot(variables), keep_where(flag, variables, previous), skips_by_branch(): how a skipped step keeps the
        previous values (a select on JAX, on an accelerator with torch and under tf.distribute; a branch on
        TensorFlow with one replica (tf.cond) and on torch on the CPU, where it costs no device sync);
    all_finite(tensors) (optional; a keras.ops default otherwise): one bool, whether every gradient entry is
        finite (torch: one fused call);
    branches_in_python(): whether the step runs eagerly, so that a Python branch on a flag runs one side only
        (torch; the compiled backends select or use `ops.cond`);
    run_step(step, args, state_groups): the train/test step in the form the Keras trainer of the backend calls
        it (JAX: a pure function of the state, through a `StatelessScope`; the others: `step(data)`);
    DEFAULT_VECTORIZE: whether the T x P Jacobian is computed with the vectorised pull by default on the CPU
        (measured fastest per backend, benchmarks/jacobian.py); on_gpu() (torch, JAX): whether the step runs on a
        GPU, where `default_vectorize` picks the vectorised pull.

Built on them, here: `loss_gradients` (one backward of a scalar) and `task_gradients` (the per-task Jacobian of the
shared variables, each head's own gradient, the balancer's and the regularisation gradients), both already
averaged over the replicas, so the balancer sees the global batch, runs identically on every replica and its state
stays the same everywhere.
"""

import collections
import functools

import keras
from keras import ops


_FIELDS = ("aux", "task_losses", "shared_blocks", "task_gradients", "extra_gradients", "regularization_gradients",
           "combined_shared", "refresh", "to_shared", "labelled", "combined", "task_weights", "unowned_blocks")


class TaskGradients(collections.namedtuple("TaskGradients", _FIELDS, defaults=(None,) * 10)):
    """The step's one gradients record (gradients of the global batch; one entry per variable).

    Gradient level (`task_gradients`, `representation_gradients`):
        aux: the forward's auxiliary output (the train step's `Forward`).
        task_losses: the (T,) losses that were differentiated.
        shared_blocks: one (T, *shape) block per shared variable: the task Jacobian (representation level: one
            (T, *z.shape) block, the Jacobian with respect to the representation z).
        task_gradients: for each task, the gradients of its own variables.
        extra_gradients: gradients of sum_t task_losses[t] for the extra variables (a balancer's learned ones).
        regularization_gradients: gradients of the regularisation loss for shared + task + extra variables, or
            None entries when the forward had no regularisation loss.
        combined_shared, refresh: with `amortise` (task_gradients_every > 1), the shared gradient of
            sum_t w_t task_losses[t] and whether this step computed the blocks instead (keras_dbmtl.task_gradients).
        to_shared: representation level: `to_shared(cotangent)`, the shared variables' gradients of
            <cotangent, z> (one backward pass through the encoder).
        labelled: (T,) bool, False for a task without labels in the batch (set by the step's usability check).
        unowned_blocks: (T, *shape) blocks of the variables outside the shared ones whose task is unknown (a
            subclassed model's), or None; each gets sum_t h_t row_t (`keras_dbmtl.balancing.balance`).
    Loss level (`loss_gradients`, wrapped by the train step):
        combined: the gradient of the balancer's combined loss for every step variable.
        task_weights: the balancer's (T,) task weights.
    """

    __slots__ = ()

    def tensors(self):
        """Every gradient tensor of the record."""
        groups = [self.combined or [], self.shared_blocks or [], self.unowned_blocks or [],
                  *(self.task_gradients or []),
                  self.extra_gradients or [], self.regularization_gradients or [], self.combined_shared or []]
        return [g for group in groups for g in group if g is not None]

    def map(self, fn):
        """The same record with `fn` applied to every gradient tensor (losses, flags and weights unchanged)."""
        def each(values):
            return None if values is None else [None if g is None else fn(g) for g in values]

        own = None if self.task_gradients is None else [each(group) for group in self.task_gradients]
        return self._replace(combined=each(self.combined), shared_blocks=each(self.shared_blocks),
                             unowned_blocks=each(self.unowned_blocks),
                             task_gradients=own, extra_gradients=each(self.extra_gradients),
                             regularization_gradients=each(self.regularization_gradients),
                             combined_shared=each(self.combined_shared))


def backend_module(name=None):
    """The module of primitives for `name` (default: the running Keras backend)."""
    return _backend_module(name or keras.backend.backend())


@functools.lru_cache(maxsize=None)
def _backend_module(name):
    if name == "tensorflow":
        from keras_dbmtl.gradients import tensorflow as module
    elif name == "torch":
        from keras_dbmtl.gradients import torch as module
    elif name == "jax":
        from keras_dbmtl.gradients import jax as module
    else:
        raise ValueError(
            f"keras-dbmtl supports the tensorflow, torch and jax backends; KERAS_BACKEND is {name!r}."
        )
    return module


# ---------------------------------------------------------------------- primitives, the backend chosen once
#: The running backend's module of primitives, chosen once at import, as Keras chooses its backend.
PRIMITIVES = backend_module()

# Thin calls into the module (its attributes read at call time, so that a test or benchmark can patch one).


def global_losses(task_losses):
    return PRIMITIVES.global_losses(task_losses)


def optimizer_gradients(grads):
    return PRIMITIVES.optimizer_gradients(grads)


def num_replicas():
    return PRIMITIVES.num_replicas()


def replica_mean(values):
    return PRIMITIVES.replica_mean(values)


def replica_rank():
    return PRIMITIVES.replica_rank()


def skips_by_branch():
    return PRIMITIVES.skips_by_branch()


def branches_in_python():
    return PRIMITIVES.branches_in_python()


def run_step(step, args, state_groups):
    return PRIMITIVES.run_step(step, args, state_groups)


def broadcast_from_root(tensors, root=0):
    return PRIMITIVES.broadcast_from_root(list(tensors), root)


def init_process_group(backend="gloo", **kwargs):
    return PRIMITIVES.init_process_group(backend, **kwargs)


def snapshot(variables):
    return PRIMITIVES.snapshot(list(variables))


def keep_where(flag, variables, previous):
    PRIMITIVES.keep_where(flag, list(variables), list(previous))


def all_finite(tensors):
    """Whether every entry of every tensor is finite. The backend's own version where it has one (torch: one fused
    max-abs call); else one sum per tensor (a NaN or inf entry, or a sum that overflows float32, makes it
    non-finite) and one reduction of the sums."""
    tensors = list(tensors)
    own = getattr(PRIMITIVES, "all_finite", None)
    if own is not None:
        return own(tensors)
    sums = ops.stack([ops.sum(ops.cast(g, "float32")) for g in tensors])
    return ops.all(ops.isfinite(sums))


# ---------------------------------------------------------------------- assembly, written once
def default_vectorize(module=None):
    """`compile(vectorize_jacobian=None)`: the vectorised Jacobian on a GPU with torch or JAX (measured faster
    there, benchmarks/RESULTS_gpu.md: JAX QM9 DB-MTL/EW 2.99 vectorised vs 5.14 looped, torch dense-T11 1.48 vs
    2.36), else the backend's `DEFAULT_VECTORIZE` (looped: measured faster on the CPU)."""
    module = module or backend_module()
    on_gpu = getattr(module, "on_gpu", None)
    return True if on_gpu is not None and on_gpu() else module.DEFAULT_VECTORIZE


def _replica_mean_keeping_nones(values):
    present = [v for v in values if v is not None]
    if not present or num_replicas() == 1:
        return list(values)
    reduced = iter(replica_mean(present))
    return [None if v is None else next(reduced) for v in values]


def _split(values, sizes):
    groups, start = [], 0
    for size in sizes:
        groups.append(list(values[start : start + size]))
        start += size
    return groups


def loss_gradients(forward, variables):
    """forward() -> (scalar loss, aux). Returns (aux, gradients of the loss), averaged over the replicas."""
    variables = list(variables)
    (loss,), aux, pull = backend_module().pullback(lambda: _one_output(forward()), variables)
    grads = pull((ops.ones_like(loss),), range(len(variables)))
    return aux, _replica_mean_keeping_nones(grads)


def _one_output(result):
    loss, aux = result
    return (loss,), aux


def _layout(shared_variables, task_variables, unowned_variables, extra_variables):
    """The step's variables in the order of every gradient list (shared, each task's own, unowned, extra), and
    the indices of the unowned ones (Jacobian rows) and of the owned and extra ones (one pull of the sum)."""
    shared, groups = list(shared_variables), [list(g) for g in task_variables]
    unowned, extra = list(unowned_variables), list(extra_variables)
    owned = [v for group in groups for v in group]
    everything = shared + owned + unowned + extra
    first_unowned = len(shared) + len(owned)
    after_unowned = first_unowned + len(unowned)
    unowned_indices = list(range(first_unowned, after_unowned))
    own_indices = list(range(len(shared), first_unowned)) + list(range(after_unowned, len(everything)))
    return shared, groups, unowned, extra, everything, unowned_indices, own_indices


def _differentiable(forward):
    """`forward(*inputs) -> (task_losses, regularization_loss, aux)` as the pullback's `outputs(*inputs) ->
    ((losses, regularization), aux)`, and a list that records whether there was a regularisation loss."""
    has_regularization = []

    def outputs(*inputs):
        losses, regularization, aux = forward(*inputs)
        has_regularization.append(not isinstance(regularization, (int, float)))
        return (losses, ops.cast(regularization, losses.dtype)), aux

    return outputs, has_regularization


def _own_and_regularization(pull, losses, regularization, own_indices, num_variables, regularized):
    """One pull of sum_t l_t for the variables at `own_indices` (each task's own, the extra ones), and the
    regularisation loss's gradients of every variable (None entries without one)."""
    own = pull((ops.ones_like(losses), ops.zeros_like(regularization)), own_indices)
    if not regularized:
        return own, [None] * num_variables
    return own, pull((ops.zeros_like(losses), ops.ones_like(regularization)), range(num_variables))


def task_gradients(forward, shared_variables, task_variables, extra_variables=(), vectorize=None, amortise=None,
                   unowned_variables=()):
    """forward() -> (task_losses (T,), regularization_loss, aux), run once. Returns `TaskGradients`.

    Task-specific variables reach only their own task's loss, so one pull of sum_t l_t gives every head its own
    gradient (and the extra variables the gradient of the sum).

    `unowned_variables` (a subclassed model's variables outside the shared ones, whose task no graph says): their
    (T, *shape) Jacobian blocks, from the same pulls as the shared blocks (`TaskGradients.unowned_blocks`).

    `amortise=(refresh, weights)`: the shared Jacobian only where `refresh` (a bool scalar tensor; zeros
    elsewhere), and else one pull of sum_t weights[t] * task_losses[t] for the shared variables
    (`TaskGradients.combined_shared`; zeros on refresh steps): a `cond`, so only one of the two runs.
    """
    module = backend_module()
    vectorize = default_vectorize(module) if vectorize is None else vectorize
    shared, groups, unowned, extra, everything, unowned_indices, own_indices = _layout(
        shared_variables, task_variables, unowned_variables, extra_variables)
    if amortise is not None and unowned:
        raise ValueError("task_gradients_every > 1 needs each non-shared variable's task: not available with "
                         "variables outside shared_variables whose task is unknown (a subclassed model).")
    outputs, has_regularization = _differentiable(forward)
    (losses, regularization), aux, pull = module.pullback(outputs, everything)
    combined = None
    if amortise is None:
        blocks = _jacobian_blocks(pull, losses, regularization, len(shared), vectorize,
                                  indices=list(range(len(shared))) + unowned_indices)
        shared_blocks, unowned_blocks = list(blocks[:len(shared)]), list(blocks[len(shared):])
    else:
        shared_blocks, combined = _amortised_shared(pull, losses, regularization, shared, vectorize, *amortise)
        unowned_blocks = []
    own, reg_grads = _own_and_regularization(pull, losses, regularization, own_indices, len(everything),
                                             has_regularization[0])
    sizes = [len(shared), len(unowned)] + [len(g) for g in groups] + [len(extra)] + [len(everything)]
    combined_list = [] if combined is None else list(combined)
    reduced = _replica_mean_keeping_nones(list(shared_blocks) + unowned_blocks + list(own) + list(reg_grads)
                                          + combined_list)
    parts = _split(reduced, sizes + [len(combined_list)])
    return TaskGradients(aux, losses, parts[0], parts[2:-3], parts[-3], parts[-2],
                         combined_shared=None if combined is None else parts[-1],
                         refresh=None if amortise is None else amortise[0],
                         unowned_blocks=parts[1] if unowned else None)


def _amortised_shared(pull, losses, regularization, shared, vectorize, refresh, weights):
    """(Jacobian blocks, combined gradient) of the shared variables: the blocks where `refresh`, the one pull of
    sum_t weights[t] * losses[t] elsewhere; the other entry holds zeros of its shape."""
    num_tasks = int(losses.shape[0])

    def exact():
        blocks = _jacobian_blocks(pull, losses, regularization, len(shared), vectorize)
        return list(blocks), [ops.zeros(v.shape, dtype=b.dtype) for v, b in zip(shared, blocks)]

    def amortised():
        cotangent = ops.cast(weights, losses.dtype)
        grads = pull((cotangent, ops.zeros_like(regularization)), range(len(shared)))
        return [ops.zeros((num_tasks,) + tuple(g.shape), dtype=g.dtype) for g in grads], list(grads)

    return ops.cond(refresh, exact, amortised)


def _jacobian_blocks(pull, losses, regularization, num_shared, vectorize, indices=None):
    """One (T, *shape) block per shared variable (or per pulled index): row t is the gradient of loss t."""
    num_tasks = int(losses.shape[0])
    indices = list(range(num_shared) if indices is None else indices)
    eye = ops.eye(num_tasks, dtype=losses.dtype)
    batched = True if vectorize else ("sequential" if getattr(backend_module(), "SEQUENTIAL_ROWS", False) else False)
    if batched:
        zeros = ops.zeros((num_tasks,), dtype=regularization.dtype)
        return pull((eye, zeros), indices, batched=batched)
    zero = ops.zeros_like(regularization)
    rows = [pull((eye[t], zero), indices) for t in range(num_tasks)]
    return [ops.stack([row[i] for row in rows]) for i in range(len(indices))]


def representation_gradients(encode, decode, shared_variables, task_variables, extra_variables=(),
                             vectorize=None, unowned_variables=()):
    """Per-task gradients of the representation (MGDA-UB; keras_dbmtl.task_gradients).

    encode() -> the representation z, run once (one graph through the encoder); decode(z) -> (task_losses (T,),
    regularization_loss, aux), run once. Returns `TaskGradients` whose `shared_blocks` is one (T, *z.shape) block,
    the Jacobian of the task losses with respect to z (backward passes through the heads only), and whose
    `to_shared(cotangent)` gives the shared variables' gradients of <cotangent, z> (one backward pass through the
    encoder). `unowned_variables` (decoder variables several tasks use, e.g. a tower after the branch): their
    (T, *shape) Jacobian blocks from the same pulls (`unowned_blocks`). Heads, extra and regularisation
    gradients as in `task_gradients`. One replica only.
    """
    module = backend_module()
    if num_replicas() > 1:
        raise ValueError("task_gradients='representation' runs on one replica only: use task_gradients="
                         "'parameters' with data parallelism.")
    vectorize = default_vectorize(module) if vectorize is None else vectorize
    shared, groups, unowned, extra, everything, unowned_indices, own_indices = _layout(
        shared_variables, task_variables, unowned_variables, extra_variables)
    (z,), _, pull_encoder = module.pullback(lambda: ((encode(),), None), shared)
    outputs, has_regularization = _differentiable(decode)
    (losses, regularization), aux, pull = module.pullback(outputs, everything, inputs=[z])
    blocks = _jacobian_blocks(pull, losses, regularization, 0, vectorize,
                              indices=[len(everything)] + unowned_indices)
    own, reg_grads = _own_and_regularization(pull, losses, regularization, own_indices, len(everything),
                                             has_regularization[0])
    parts = _split(list(own), [len(g) for g in groups] + [len(extra)])

    def to_shared(cotangent):
        return pull_encoder((ops.cast(cotangent, z.dtype),), range(len(shared)))

    return TaskGradients(aux, losses, [blocks[0]], parts[:-1], parts[-1], list(reg_grads), to_shared=to_shared,
                         unowned_blocks=list(blocks[1:]) if unowned else None)
