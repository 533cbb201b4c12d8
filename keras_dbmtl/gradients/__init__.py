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

import keras
from keras import ops


class TaskGradients:
    """What `task_gradients` returns (gradients of the global batch, one entry per variable).

    Attributes:
        aux: the forward's auxiliary output.
        task_losses: the (T,) losses that were differentiated.
        shared_blocks: one (T, *shape) block per shared variable: the task Jacobian.
        task_gradients: for each task, the gradients of its own variables.
        extra_gradients: gradients of sum_t task_losses[t] for the extra variables (a balancer's learned ones).
        regularization_gradients: gradients of the regularisation loss for shared + task + extra variables, or
            None entries when the forward had no regularisation loss.
    """

    def __init__(self, aux, task_losses, shared_blocks, task_gradients, extra_gradients, regularization_gradients):
        self.aux = aux
        self.task_losses = task_losses
        self.shared_blocks = shared_blocks
        self.task_gradients = task_gradients
        self.extra_gradients = extra_gradients
        self.regularization_gradients = regularization_gradients


def backend_module(name=None):
    """The module of primitives for `name` (default: the running Keras backend)."""
    name = name or keras.backend.backend()
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


# ---------------------------------------------------------------------- primitives, looked up at call time
def global_losses(task_losses):
    return backend_module().global_losses(task_losses)


def optimizer_gradients(grads):
    return backend_module().optimizer_gradients(grads)


def num_replicas():
    return backend_module().num_replicas()


def replica_mean(values):
    return backend_module().replica_mean(values)


def replica_rank():
    return backend_module().replica_rank()


def broadcast_from_root(tensors, root=0):
    return backend_module().broadcast_from_root(list(tensors), root)


def init_process_group(backend="gloo", **kwargs):
    return backend_module().init_process_group(backend, **kwargs)


def snapshot(variables):
    return backend_module().snapshot(list(variables))


def keep_where(flag, variables, previous):
    backend_module().keep_where(flag, list(variables), list(previous))


def skips_by_branch():
    return backend_module().skips_by_branch()


def all_finite(tensors):
    """Whether every entry of every tensor is finite. The backend's own version where it has one (torch: one fused
    max-abs call); else one sum per tensor (a NaN or inf entry, or a sum that overflows float32, makes it
    non-finite) and one reduction of the sums."""
    tensors = list(tensors)
    own = getattr(backend_module(), "all_finite", None)
    if own is not None:
        return own(tensors)
    sums = ops.stack([ops.sum(ops.cast(g, "float32")) for g in tensors])
    return ops.all(ops.isfinite(sums))


def branches_in_python():
    return backend_module().branches_in_python()


def run_step(step, args, state_groups):
    return backend_module().run_step(step, args, state_groups)


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


def task_gradients(forward, shared_variables, task_variables, extra_variables=(), vectorize=None, amortise=None):
    """forward() -> (task_losses (T,), regularization_loss, aux), run once. Returns `TaskGradients`.

    Task-specific variables reach only their own task's loss, so one pull of sum_t l_t gives every head its own
    gradient (and the extra variables the gradient of the sum).

    `amortise=(refresh, weights)`: the shared Jacobian only where `refresh` (a bool scalar tensor; zeros
    elsewhere), and else one pull of sum_t weights[t] * task_losses[t] for the shared variables
    (`TaskGradients.combined_shared`; zeros on refresh steps): a `cond`, so only one of the two runs.
    """
    module = backend_module()
    vectorize = default_vectorize(module) if vectorize is None else vectorize
    shared, groups, extra = list(shared_variables), [list(g) for g in task_variables], list(extra_variables)
    everything = shared + [v for group in groups for v in group] + extra
    has_regularization = []

    def outputs():
        losses, regularization, aux = forward()
        has_regularization.append(not isinstance(regularization, (int, float)))
        return (losses, ops.cast(regularization, losses.dtype)), aux

    (losses, regularization), aux, pull = module.pullback(outputs, everything)
    combined = None
    if amortise is None:
        shared_blocks = _jacobian_blocks(pull, losses, regularization, len(shared), vectorize)
    else:
        shared_blocks, combined = _amortised_shared(pull, losses, regularization, shared, vectorize, *amortise)
    own = pull((ops.ones_like(losses), ops.zeros_like(regularization)), range(len(shared), len(everything)))
    if has_regularization[0]:
        reg_grads = pull((ops.zeros_like(losses), ops.ones_like(regularization)), range(len(everything)))
    else:
        reg_grads = [None] * len(everything)
    sizes = [len(shared)] + [len(g) for g in groups] + [len(extra)] + [len(everything)]
    combined_list = [] if combined is None else list(combined)
    reduced = _replica_mean_keeping_nones(list(shared_blocks) + list(own) + list(reg_grads) + combined_list)
    parts = _split(reduced, sizes + [len(combined_list)])
    result = TaskGradients(aux, losses, parts[0], parts[1:-3], parts[-3], parts[-2])
    result.combined_shared = None if combined is None else parts[-1]
    return result


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
                             vectorize=None):
    """Per-task gradients of the representation (MGDA-UB; keras_dbmtl.task_gradients).

    encode() -> the representation z, run once (one graph through the encoder); decode(z) -> (task_losses (T,),
    regularization_loss, aux), run once. Returns `TaskGradients` whose `shared_blocks` is one (T, *z.shape) block,
    the Jacobian of the task losses with respect to z (backward passes through the heads only), and whose
    `to_shared(cotangent)` gives the shared variables' gradients of <cotangent, z> (one backward pass through the
    encoder). Heads, extra and regularisation gradients as in `task_gradients`. One replica only.
    """
    module = backend_module()
    if num_replicas() > 1:
        raise ValueError("task_gradients='representation' runs on one replica only: use task_gradients="
                         "'parameters' with data parallelism.")
    vectorize = default_vectorize(module) if vectorize is None else vectorize
    shared, groups, extra = list(shared_variables), [list(g) for g in task_variables], list(extra_variables)
    (z,), _, pull_encoder = module.pullback(lambda: ((encode(),), None), shared)
    everything = shared + [v for group in groups for v in group] + extra
    has_regularization = []

    def outputs(representation):
        losses, regularization, aux = decode(representation)
        has_regularization.append(not isinstance(regularization, (int, float)))
        return (losses, ops.cast(regularization, losses.dtype)), aux

    (losses, regularization), aux, pull = module.pullback(outputs, everything, inputs=[z])
    blocks = _jacobian_blocks(pull, losses, regularization, 0, vectorize, indices=[len(everything)])
    own = pull((ops.ones_like(losses), ops.zeros_like(regularization)), range(len(shared), len(everything)))
    if has_regularization[0]:
        reg_grads = pull((ops.zeros_like(losses), ops.ones_like(regularization)), range(len(everything)))
    else:
        reg_grads = [None] * len(everything)
    parts = _split(list(own), [len(g) for g in groups] + [len(extra)])
    result = TaskGradients(aux, losses, list(blocks), parts[:-1], parts[-1], list(reg_grads))

    def to_shared(cotangent):
        return pull_encoder((ops.cast(cotangent, z.dtype),), range(len(shared)))

    result.to_shared = to_shared
    return result
