"""The torch primitives of the backend contract (keras_dbmtl/gradients/__init__.py): one autograd graph,
`torch.autograd.grad` per pull (retain_graph).

Data parallelism over processes (`keras_dbmtl.distributed`): when `torch.distributed` is initialised with more
than one process, each process runs the train step on its own shard of the global batch and the gradients
returned here are those of the global batch: the task losses and every gradient (the per-task blocks of the shared
variables, the heads', the balancer's and the regularisation gradients) are averaged over the processes with one
flattened `all_reduce` per dtype, before the balancer sees them. Non-linear functions of the losses (the log
transform, loss-level combinations) are made exact by the model's forward pass, which gives the task losses the
value of their replica mean (`keras_dbmtl.gradients.global_losses`). Without an initialised process group, every
function here is the identity.
"""

import torch
import torch.distributed as dist

DEFAULT_VECTORIZE = False


def on_gpu():
    from keras.src.backend.torch.core import get_device

    return str(get_device()).startswith("cuda")      # vectorised there (benchmarks/RESULTS_gpu.md)


def pullback(forward, variables, inputs=()):
    """One forward pass, one autograd graph; each pull is a `torch.autograd.grad` that keeps the graph. Index
    len(variables) + j of a pull is the gradient of inputs[j] (fed to forward as new leaves)."""
    leaves = [x.detach().requires_grad_(True) for x in inputs]
    outputs, aux = forward(*leaves)
    outputs = tuple(outputs)
    tensors = [v.value for v in variables] + leaves

    def pull(cotangents, indices, batched=False):
        chosen = [tensors[i] for i in indices]
        pairs = [(o, c) for o, c in zip(outputs, cotangents) if o.requires_grad]
        if not chosen or not pairs:
            return [_zeros(t, cotangents[0], batched) for t in chosen]
        grads = torch.autograd.grad(
            [o for o, _ in pairs], chosen, grad_outputs=[c for _, c in pairs], retain_graph=True,
            allow_unused=True, is_grads_batched=batched,
        )
        return [_zeros(t, cotangents[0], batched) if g is None else g for g, t in zip(grads, chosen)]

    return outputs, aux, pull


def _zeros(tensor, cotangent, batched):
    shape = ((cotangent.shape[0],) if batched else ()) + tuple(tensor.shape)
    return torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)


def skips_by_branch():
    """On the CPU a Python branch on the flag costs nothing and spares copying every variable before the step
    and selecting after it; on an accelerator it would be a host round trip (a device sync) every step: a select
    there."""
    from keras.src.backend.torch.core import get_device

    return str(get_device()).startswith("cpu")


def branches_in_python():
    return True


def all_finite(tensors):
    """Whether every entry of every tensor is finite: one fused max-abs per tensor (`_foreach_norm` with ord=inf,
    NaN and inf propagate), one reduction of the T results."""
    with torch.no_grad():
        norms = torch._foreach_norm([t.detach() for t in tensors], ord=float("inf"))
        return torch.isfinite(torch.stack(norms)).all()


def run_step(step, args, state_groups):
    return step(args[0])


# ---------------------------------------------------------------------- data parallelism (torch.distributed)
def _is_distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def num_replicas():
    """The number of processes of the default process group; 1 when torch.distributed is not initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def replica_rank():
    """This process's rank in the default process group; 0 when torch.distributed is not initialised."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def replica_mean(values):
    """The mean over the processes of a tensor or a list of tensors (one flattened all_reduce per dtype),
    identical on every process; identity on one process.

    No gradient flows through it: use `keras_dbmtl.gradients.global_losses` inside a differentiated forward.
    """
    if not _is_distributed():
        return values
    if isinstance(values, (list, tuple)):
        return _replica_mean_list(list(values))
    return _replica_mean_list([torch.as_tensor(values)])[0]


def global_losses(task_losses):
    """Inside the differentiated forward: task losses whose value is the replica mean (the global batch's loss with
    equal shards and mean-reduced losses) and whose gradient is the local one; the identity on one process."""
    if not _is_distributed():
        return task_losses
    return task_losses + (replica_mean(task_losses.detach()) - task_losses).detach()


def optimizer_gradients(grads):
    return grads   # already the global-batch gradients: every process applies the same update


def _flat_collective(tensors, collective):
    """Runs `collective(flat)` (in place) on one flattened buffer per dtype of `tensors` (None entries kept) and
    returns the tensors rebuilt from the buffers."""
    result = list(tensors)
    by_dtype = {}
    for i, t in enumerate(result):
        if t is not None:
            by_dtype.setdefault(t.dtype, []).append(i)
    for indices in by_dtype.values():
        flat = torch.cat([result[i].detach().reshape(-1) for i in indices]).contiguous()
        flat = collective(flat)
        start = 0
        for i in indices:
            size = result[i].numel()
            result[i] = flat[start : start + size].reshape(result[i].shape)
            start += size
    return result


def _replica_mean_list(tensors):
    """Replica means of a list of tensors (None entries kept) with one flattened all_reduce per dtype."""
    if not _is_distributed():
        return tensors
    world = dist.get_world_size()

    def mean(flat):
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)   # gloo has no AVG
        return flat / world

    return _flat_collective(tensors, mean)


def broadcast_from_root(tensors, root=0):
    """Copies of `tensors` holding process `root`'s values, one flattened broadcast per dtype; identity on one
    process."""
    tensors = [torch.as_tensor(t).detach() for t in tensors]
    if not _is_distributed():
        return tensors

    def broadcast(flat):
        dist.broadcast(flat, src=root)
        return flat

    return _flat_collective(tensors, broadcast)


def init_process_group(backend="gloo", **kwargs):
    """`torch.distributed.init_process_group` from the environment torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT), unless a process group already exists. Returns (rank, world_size)."""
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, **kwargs)
    return dist.get_rank(), dist.get_world_size()


def snapshot(variables):
    with torch.no_grad():
        return torch._foreach_mul([v.value for v in variables], 1)      # one call: copies of every tensor


def keep_where(flag, variables, previous):
    # In place (what KerasVariable.assign does on torch), without its per-call checks: one op per variable.
    with torch.no_grad():
        for v, old in zip(variables, previous):
            value = v.value
            torch.where(flag, value, old, out=value)
