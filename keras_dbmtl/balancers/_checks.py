"""Argument checks and small helpers shared by the balancer files."""

import math
import numbers
import re


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


_INTERVAL = re.compile(r"^(int )?([\[(])\s*(-?(?:inf|[0-9.e+-]+))\s*,\s*(-?(?:inf|[0-9.e+-]+))\s*([\])])$")


def check_hyperparameters(balancer, **rules):
    """One error style for every balancer's hyperparameters, against the ranges its paper allows.

    Each keyword is `name=(value, allowed)`; `allowed` is an interval such as "[0, 1)", "(0, inf)" or
    "int [1, inf)" (an integer in it), or a tuple of alternatives: allowed values and intervals, e.g.
    `("max", "mean", "(0, inf)")`; a type (`str`) allows any value of it. Raises ValueError naming the balancer,
    the argument, the range and the value.
    """
    for name, (value, allowed) in rules.items():
        alternatives = allowed if isinstance(allowed, tuple) else (allowed,)
        if not any(_matches(value, alternative) for alternative in alternatives):
            raise ValueError(
                f"{type(balancer).__name__}: {name} must be {_describe(alternatives)}; received {name}={value!r}."
            )


def _matches(value, alternative):
    if isinstance(alternative, type):
        return isinstance(value, alternative)
    interval = _INTERVAL.match(alternative) if isinstance(alternative, str) else None
    if interval is None:
        return type(value) is type(alternative) and value == alternative
    integer, left, low, high, right = interval.groups()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    if integer and not (isinstance(value, numbers.Integral) or float(value).is_integer()):
        return False
    value, low, high = float(value), float(low), float(high)
    if math.isnan(value):
        return False
    above = value >= low if left == "[" else value > low
    below = value <= high if right == "]" else value < high
    return above and below


def _describe(alternatives):
    literals = [repr(a) for a in alternatives if not isinstance(a, type) and not _is_interval(a)]
    words = ["one of " + ", ".join(literals)] if len(literals) > 2 else literals
    words += [f"a {a.__name__}" for a in alternatives if isinstance(a, type)]
    for interval in (a for a in alternatives if _is_interval(a)):
        kind = "an integer" if interval.startswith("int ") else "a number"
        words.append(f"{kind} in {interval.removeprefix('int ')}")
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _is_interval(alternative):
    return isinstance(alternative, str) and _INTERVAL.match(alternative) is not None
