"""Task gradients with torch autograd: one graph, `torch.autograd.grad` per task (retain_graph)."""

import torch

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
    return aux, _grad(loss, variables, retain_graph=False)


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
    return TaskGradients(aux, task_losses.detach(), shared_blocks, task_grads, extra_grads, regularization_grads)
