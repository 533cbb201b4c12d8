"""Task balancers: `get(name)`, `names()`, and one class per method.

```python
import keras_dbmtl
balancer = keras_dbmtl.balancers.get("dbmtl")          # by registered name
balancer = keras_dbmtl.balancers.DBMTL(beta=0.5, beta_sigma=0.5)
balancer = keras_dbmtl.balancers.PCGrad(loss_transform="log")   # the log transform composes with every method
model.compile(optimizer="adam", loss=..., balancer=balancer)
```

`names()` lists the registered methods; each class is exported here under its own name, and its kind is its base
class: `LossBalancer` (1 backward), `GramianBalancer` or `JacobianBalancer` (T backward). The README's table
gives each method's paper, defaults and cost (tests/balancers/test_registry.py checks it against the registry).
"""

from keras_dbmtl.balancers.base import (
    Aggregation, Balancer, Disclaimed, GramianBalancer, JacobianBalancer, LossBalancer, TaskJacobian, TaskLosses,
)
from keras_dbmtl.balancers.registry import get, names, register, registered_classes

# Every module of this package that is not infrastructure holds one method and registers it on import: a new
# balancer is found from its file alone (CONTRIBUTING.md).
_INFRASTRUCTURE = {"base", "registry", "solvers"}


def _import_methods():
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_") and module.name not in _INFRASTRUCTURE:
            importlib.import_module(f"{__name__}.{module.name}")


_import_methods()
globals().update({cls.__name__: cls for cls in registered_classes()})

__all__ = [
    "Aggregation", "Balancer", "Disclaimed", "GramianBalancer", "JacobianBalancer", "LossBalancer", "TaskJacobian", "TaskLosses",
    "get", "names", "register", "registered_classes",
] + sorted(cls.__name__ for cls in registered_classes())
