"""Small helpers shared by the model, the backends and `keras_dbmtl.distributed`."""


def is_dict(value):
    """A dict or a mapping-like object (Keras' tracked dicts)."""
    return isinstance(value, dict) or (hasattr(value, "keys") and hasattr(value, "items"))


def unique(variables):
    """`variables` without repeats (by identity), first occurrences in order."""
    seen, result = set(), []
    for v in variables:
        if id(v) not in seen:
            seen.add(id(v))
            result.append(v)
    return result
