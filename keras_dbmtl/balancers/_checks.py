"""Argument checks and small helpers shared by the balancer files."""


def reject_log_transform(balancer, why):
    if balancer.loss_transform == "log":
        raise ValueError(
            f"{type(balancer).__name__} {why}: loss_transform='log' would take the logarithm twice. "
            "Use loss_transform=None (the default)."
        )


def resolve_task(task, task_names, num_tasks, what="task"):
    """A task given by name or index -> its index."""
    if task is None:
        return 0
    if isinstance(task, str):
        if task_names is None or task not in task_names:
            raise ValueError(f"Unknown {what} {task!r}; the tasks are {task_names}.")
        return list(task_names).index(task)
    index = int(task)
    if not 0 <= index < num_tasks:
        raise ValueError(f"{what} index {index} is out of range for {num_tasks} tasks.")
    return index
