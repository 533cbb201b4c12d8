"""Figures of a multi-task training run: learning curves per task, task weights, gradient norms, cosine heat map.

Each function takes a source of epoch logs: a `keras.callbacks.History`, its `.history` dict, or the path of a
JSON file holding such a dict (directly, under "history", or under "runs"[run]["history"] as the applications
write it), and writes one PNG (matplotlib, no display needed; install `matplotlib`).

```python
from keras_dbmtl import plotting
paths = plotting.plot_task_balance(history, "figures/", monitor=monitor)   # the four figures
```
"""

import itertools
import json
import os

import numpy as np


def _figure(width=6.0, height=4.0):
    try:
        from matplotlib.figure import Figure
    except ImportError as error:       # pragma: no cover - matplotlib is installed with the applications extra
        raise ImportError("keras_dbmtl.plotting needs matplotlib: pip install matplotlib") from error
    return Figure(figsize=(width, height), dpi=100)


def load_history(source, run=0):
    """dict key -> list of floats from a History, a dict, or a JSON file (see the module docstring)."""
    if hasattr(source, "history") and isinstance(source.history, dict):
        source = source.history
    if isinstance(source, (str, os.PathLike)):
        with open(source, encoding="utf-8") as handle:
            source = json.load(handle)
    if isinstance(source, dict) and "runs" in source and isinstance(source["runs"], list):
        source = source["runs"][run]
    if isinstance(source, dict) and isinstance(source.get("history"), dict):
        source = source["history"]
    if not isinstance(source, dict):
        raise ValueError("Expected a keras History, a dict of epoch logs or a JSON file holding one; received "
                         f"{type(source).__name__}.")
    result = {}
    for key, values in source.items():
        try:
            result[key] = [float(v) for v in values]
        except (TypeError, ValueError):
            continue
    return result


def task_names(history):
    """The tasks of a MultiTaskModel's logs: every `<task>_loss` key but `loss` and the `val_` ones."""
    return sorted(k[: -len("_loss")] for k in history if k.endswith("_loss") and not k.startswith("val_"))


def _save(figure, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.tight_layout()
    figure.savefig(path)
    return path


def _per_task_plot(history, path, tasks, suffix, title, ylabel, log_scale):
    figure = _figure()
    axis = figure.add_subplot(1, 1, 1)
    drawn = 0
    for task in tasks:
        values = history.get(f"{task}_{suffix}")
        if values:
            axis.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=task)
            drawn += 1
    if not drawn:
        raise ValueError(f"No '<task>_{suffix}' values in the logs (keys: {sorted(history)[:20]}).")
    if log_scale:
        axis.set_yscale("log")
    axis.set(xlabel="epoch", ylabel=ylabel, title=title)
    axis.legend()
    return _save(figure, path)


def plot_learning_curves(source, path, tasks=None):
    """One panel per task: training and (if logged) validation loss per epoch, log scale."""
    history = load_history(source)
    tasks = tasks or task_names(history)
    figure = _figure(4.0 * len(tasks), 3.5)
    for k, task in enumerate(tasks):
        axis = figure.add_subplot(1, len(tasks), k + 1)
        for key, label in ((f"{task}_loss", "train"), (f"val_{task}_loss", "validation")):
            if history.get(key):
                axis.plot(range(1, len(history[key]) + 1), history[key], label=label)
        axis.set_yscale("log")
        axis.set(xlabel="epoch", ylabel="loss", title=task)
        axis.legend()
    return _save(figure, path)


def plot_task_weights(source, path, tasks=None):
    """Each task's weight (epoch mean of the balancer's weights) per epoch."""
    history = load_history(source)
    return _per_task_plot(history, path, tasks or task_names(history), "weight", "Task weights", "weight", False)


def plot_gradient_norms(source, path, tasks=None):
    """Each task's gradient norm on the shared variables per epoch, log scale."""
    history = load_history(source)
    return _per_task_plot(history, path, tasks or task_names(history), "gradient_norm", "Task gradient norms",
                          "gradient norm (shared variables)", True)


def cosine_matrix(source, epoch=-1, tasks=None):
    """(tasks, T x T cosines) of one epoch, from a `TaskBalanceMonitor` or from the `cosine_<a>_<b>` logs."""
    if hasattr(source, "cosines") and hasattr(source, "model"):
        if not source.cosines:
            raise ValueError("The TaskBalanceMonitor has no epoch recorded yet (fit with it first).")
        return list(tasks or source.model.task_names), np.asarray(source.cosines[epoch])
    history = load_history(source)
    tasks = list(tasks or task_names(history))
    matrix = np.eye(len(tasks))
    for i, j in itertools.combinations(range(len(tasks)), 2):
        key = f"cosine_{tasks[i]}_{tasks[j]}"
        if key not in history:
            raise ValueError(f"No '{key}' in the logs: fit with keras_dbmtl.callbacks.TaskBalanceMonitor (for more "
                             "than `pair_logs_up_to` tasks, pass the monitor itself).")
        matrix[i, j] = matrix[j, i] = history[key][epoch]
    return tasks, matrix


def plot_cosine_heatmap(source, path, epoch=-1, tasks=None):
    """Heat map of the pairwise cosines of the task gradients (red: conflicting, blue: aligned)."""
    tasks, matrix = cosine_matrix(source, epoch, tasks)
    figure = _figure(3.0 + 0.6 * len(tasks), 2.4 + 0.5 * len(tasks))
    axis = figure.add_subplot(1, 1, 1)
    image = axis.imshow(matrix, vmin=-1.0, vmax=1.0, cmap="RdBu")
    axis.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    axis.set_yticks(range(len(tasks)), tasks)
    if len(tasks) <= 12:
        for i, j in itertools.product(range(len(tasks)), repeat=2):
            axis.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=8)
    axis.set_title("Cosine of task gradients" + ("" if epoch == -1 else f" (epoch {epoch + 1})"))
    figure.colorbar(image, ax=axis)
    return _save(figure, path)


def plot_task_balance(source, directory, monitor=None, prefix=""):
    """All four figures into `directory`; returns dict name -> path (the heat map only with cosines logged)."""
    history = load_history(source)
    paths = {
        "learning_curves": plot_learning_curves(history, os.path.join(directory, f"{prefix}learning_curves.png")),
        "task_weights": plot_task_weights(history, os.path.join(directory, f"{prefix}task_weights.png")),
    }
    if any(k.endswith("_gradient_norm") for k in history):
        paths["gradient_norms"] = plot_gradient_norms(history, os.path.join(directory, f"{prefix}gradient_norms.png"))
    if monitor is not None or any(k.startswith("cosine_") for k in history):
        paths["cosine_heatmap"] = plot_cosine_heatmap(monitor if monitor is not None else history,
                                                      os.path.join(directory, f"{prefix}cosine_heatmap.png"))
    return paths
