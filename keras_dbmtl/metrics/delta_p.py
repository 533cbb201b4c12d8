"""Delta_p (Eq. 3 of the DB-MTL paper): relative gain of an MTL model over STL.

    Delta_p,t = 100% * 1/N_t * sum_i (-1)^{s_t,i} (M_t,i - M_STL_t,i) / M_STL_t,i
    Delta_p   = 1/T * sum_t Delta_p,t

with ``s = 1`` for a lower-is-better metric.  Higher Delta_p is better.

Two entry points:

- :func:`delta_p` / :func:`delta_p_per_task` over a flat dict of results (the
  dict of ``model.evaluate(..., return_dict=True)`` or of one History epoch).
- :class:`DeltaP` (in ``keras_dbmtl.callbacks``), a callback that writes ``val_delta_p`` into the epoch logs
  every epoch, so that History, ``ModelCheckpoint(monitor="val_delta_p",
  mode="max")`` and ``ReduceLROnPlateau(monitor="val_delta_p", mode="max")``
  (the paper's QM9 schedule) see it.

Baselines are given per task, keyed by the metric's log key (without the
``val_`` prefix)::

    baselines = {
        "seg":    {"seg_miou": 53.50, "seg_pixel_acc": 75.39},
        "depth":  {"depth_abs_err": 0.3926, "depth_rel_err": 0.1605},
        "normal": {"normal_angle_mean": 21.99, "normal_angle_median": 15.16,
                   "normal_within_11_25": 39.04, "normal_within_22_5": 65.00,
                   "normal_within_30": 75.16},
    }

A flat ``{key: value}`` dict makes every metric its own task (QM9, Office).
"""

import numbers
import re

import keras

__all__ = ["delta_p", "delta_p_per_task", "default_higher_is_better", "group_baselines", "is_higher_better"]

# Default metric names of keras_dbmtl.metrics -> whether higher is better.
_KNOWN_DIRECTIONS = (
    (re.compile(r"(^|_)miou$"), True),
    (re.compile(r"(^|_)pixel_acc$"), True),
    (re.compile(r"(^|_)within_[0-9_]+$"), True),
    (re.compile(r"(^|_)accuracy$"), True),
    (re.compile(r"(^|_)abs_err$"), False),
    (re.compile(r"(^|_)rel_err$"), False),
    (re.compile(r"(^|_)angle_mean$"), False),
    (re.compile(r"(^|_)angle_median$"), False),
    (re.compile(r"(^|_)mae$"), False),
)


def default_higher_is_better(key):
    """Direction of a log key built from a keras_dbmtl metric's default name.

    ``"seg_miou" -> True``, ``"depth_abs_err" -> False``, ... Raises
    ``ValueError`` for an unknown key (pass ``higher_is_better`` explicitly).
    """
    for pattern, higher in _KNOWN_DIRECTIONS:
        if pattern.search(key):
            return higher
    raise ValueError(
        f"Cannot tell whether higher or lower is better for metric {key!r}: "
        "pass higher_is_better={key: bool, ...} (or one bool for all).")


def group_baselines(baselines):
    """`baselines` as {task: {metric key: float}}: a task given one number is its own metric key."""
    if not baselines:
        raise ValueError("`baselines` is empty.")
    grouped = {}
    for task, value in baselines.items():
        if isinstance(value, dict):
            if not value:
                raise ValueError(f"Task {task!r} has no baseline metric.")
            grouped[task] = {k: float(v) for k, v in value.items()}
        else:
            grouped[task] = {task: float(value)}
    return grouped


def is_higher_better(key, higher_is_better=None):
    """Whether a higher `key` is better: from `higher_is_better` (one bool, or {key: bool}), else the metric's name
    (`default_higher_is_better`)."""
    if isinstance(higher_is_better, bool):
        return higher_is_better
    if higher_is_better is None:
        return default_higher_is_better(key)
    if key in higher_is_better:
        return bool(higher_is_better[key])
    return default_higher_is_better(key)


def _value(results, key):
    value = results[key]
    if isinstance(value, numbers.Number):
        return float(value)
    return float(keras.ops.convert_to_numpy(value))


def _relative_changes(results, baselines, higher_is_better, prefix):
    grouped = group_baselines(baselines)
    missing = [prefix + k for metrics in grouped.values() for k in metrics
               if prefix + k not in results]
    if missing:
        raise KeyError(
            f"Delta_p needs {missing}, which are not in the results "
            f"(available: {sorted(results)}).")
    changes = {}
    for task, metrics in grouped.items():
        changes[task] = []
        for key, base in metrics.items():
            if base == 0:
                raise ValueError(f"Baseline of {key!r} is 0: Delta_p undefined.")
            sign = 1.0 if is_higher_better(key, higher_is_better) else -1.0
            value = _value(results, prefix + key)
            changes[task].append(sign * (value - base) / base)
    return changes


def delta_p_per_task(results, baselines, higher_is_better=None, *, prefix=""):
    """Delta_p,t of every task, in percent: ``{task: float}``.

    Args:
        results: mapping log key -> value (numbers, numpy or backend scalars).
        baselines: ``{task: {key: stl_value}}``, or ``{key: stl_value}`` where
            every metric is its own task.
        higher_is_better: one bool for every metric, or ``{key: bool}``; keys
            not listed (or ``None``) fall back to
            :func:`default_higher_is_better` (keras_dbmtl metric names).
        prefix: prepended to each key when reading ``results`` (``"val_"``).
    """
    changes = _relative_changes(results, baselines, higher_is_better, prefix)
    return {t: 100.0 * sum(c) / len(c) for t, c in changes.items()}


def delta_p(results, baselines, higher_is_better=None, *, prefix="",
            average="task"):
    """Delta_p of Eq. 3 in percent (higher is better).

    ``average="task"`` (default, the paper's Eq. 3 and LibMTL): mean over the
    tasks of the per-task mean.  ``average="metric"``: mean over all metrics
    at once (Nash-MTL's code); the two agree when every task has the same
    number of metrics.  Other arguments as in :func:`delta_p_per_task`.
    """
    changes = _relative_changes(results, baselines, higher_is_better, prefix)
    if average == "task":
        per_task = [sum(c) / len(c) for c in changes.values()]
        return 100.0 * sum(per_task) / len(per_task)
    if average == "metric":
        flat = [x for c in changes.values() for x in c]
        return 100.0 * sum(flat) / len(flat)
    raise ValueError(f"average must be 'task' or 'metric', got {average!r}.")
