"""Task gradients with torch autograd: one graph, `torch.autograd.grad` per task (retain_graph).

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

from keras_dbmtl.gradients import TaskGradients

DEFAULT_VECTORIZE = False


def _grad(output, variables, retain_graph=True, **kwargs):
    tensors = [v.value for v in variables]
    if not tensors:
        return []
    grads = torch.autograd.grad(output, tensors, retain_graph=retain_graph, allow_unused=True, **kwargs)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, tensors)]


def loss_gradients(forward, variables):
    loss, aux = forward()
    return aux, _replica_mean_list(_grad(loss, variables, retain_graph=False))


def task_gradients(forward, shared_variables, task_variables, extra_variables, vectorize):
    num_tasks = len(task_variables)
    task_losses, regularization_loss, aux = forward()
    task_flat = [v for group in task_variables for v in group]
    if vectorize:
        eye = torch.eye(num_tasks, dtype=task_losses.dtype, device=task_losses.device)
        tensors = [v.value for v in shared_variables]
        grads = torch.autograd.grad(
            task_losses, tensors, grad_outputs=eye, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
        shared_blocks = [
            torch.zeros((num_tasks,) + tuple(t.shape), dtype=t.dtype, device=t.device) if g is None else g
            for g, t in zip(grads, tensors)
        ]
        own = _grad(task_losses.sum(), task_flat)
        task_grads, start = [], 0
        for group in task_variables:
            task_grads.append(own[start : start + len(group)])
            start += len(group)
    else:
        rows, task_grads = [], []
        for t in range(num_tasks):
            grads = _grad(task_losses[t], shared_variables + task_variables[t])
            rows.append(grads[: len(shared_variables)])
            task_grads.append(grads[len(shared_variables) :])
        shared_blocks = [torch.stack([row[i] for row in rows]) for i in range(len(shared_variables))]
    extra_grads = _grad(task_losses.sum(), extra_variables) if extra_variables else []
    everything = shared_variables + task_flat + extra_variables
    if isinstance(regularization_loss, torch.Tensor) and regularization_loss.requires_grad:
        regularization_grads = _grad(regularization_loss, everything)
    else:
        regularization_grads = [None] * len(everything)
    if _is_distributed():
        # One all_reduce for everything the balancer and the update use: global-batch gradients on every replica.
        sizes = [len(g) for g in task_grads]
        reduced = _replica_mean_list(
            [task_losses.detach()] + shared_blocks + [g for group in task_grads for g in group] + extra_grads
            + regularization_grads
        )
        task_losses, reduced = reduced[0], reduced[1:]
        shared_blocks, reduced = reduced[: len(shared_blocks)], reduced[len(shared_blocks) :]
        task_grads = []
        for size in sizes:
            task_grads.append(reduced[:size])
            reduced = reduced[size:]
        extra_grads, regularization_grads = reduced[: len(extra_grads)], reduced[len(extra_grads) :]
    return TaskGradients(aux, task_losses.detach(), shared_blocks, task_grads, extra_grads, regularization_grads)


# ---------------------------------------------------------------------- data parallelism (torch.distributed)
def _is_distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def num_replicas():
    """The number of processes of the default process group; 1 when torch.distributed is not initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def replica_rank():
    """This process's rank in the default process group; 0 when torch.distributed is not initialised."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def replica_mean(x):
    """The mean of `x` over the processes (an all_reduce), identical on every process; identity on one process.

    No gradient flows through it: use `keras_dbmtl.gradients.global_losses` inside a differentiated forward.
    """
    if not _is_distributed():
        return x
    return _replica_mean_list([torch.as_tensor(x)])[0]


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
