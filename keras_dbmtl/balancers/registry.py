"""The name -> class registry behind `compile(balancer="name")`."""

import keras

_REGISTRY = {}


def register(name):
    """Class decorator: registers a balancer under `name` and makes it Keras-serializable."""

    def decorator(cls):
        key = name.lower()
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            raise ValueError(f"A balancer is already registered as {name!r}: {_REGISTRY[key]}")
        _REGISTRY[key] = cls
        cls.registered_name = key
        return keras.saving.register_keras_serializable(package="keras_dbmtl")(cls)

    return decorator


def registered_classes():
    """The registered balancer classes, by name."""
    return [_REGISTRY[name] for name in names()]


def names():
    """The registered balancer names, sorted."""
    return sorted(_REGISTRY)


def get(identifier, **kwargs):
    """A balancer from a registered name, a config dict, or a balancer instance (returned as is).

    Keyword arguments go to the constructor of a named balancer: `get("dbmtl", beta=0.5, beta_sigma=0.5)`.
    """
    from keras_dbmtl.balancers.base import Balancer

    if identifier is None:
        identifier = "ew"
    if kwargs and not isinstance(identifier, str):
        raise ValueError(f"Constructor arguments {sorted(kwargs)} need a balancer name, got {identifier!r}.")
    if isinstance(identifier, Balancer):
        return identifier
    if isinstance(identifier, dict):
        return keras.saving.deserialize_keras_object(identifier)
    if isinstance(identifier, str):
        key = identifier.lower()
        if key not in _REGISTRY:
            raise ValueError(
                f"Unknown balancer {identifier!r}. Registered balancers: {', '.join(names())}. "
                "Pass one of these names or a keras_dbmtl.balancers.Balancer instance."
            )
        return _REGISTRY[key](**kwargs)
    raise ValueError(
        f"Cannot interpret {identifier!r} as a balancer: pass a registered name "
        f"({', '.join(names())}) or a keras_dbmtl.balancers.Balancer instance."
    )
