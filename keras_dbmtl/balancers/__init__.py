"""Task balancers: `get(name)`, `names()`, and one class per method.

```python
import keras_dbmtl
balancer = keras_dbmtl.balancers.get("dbmtl")          # by registered name
balancer = keras_dbmtl.balancers.DBMTL(beta=0.5, beta_sigma=0.5)
model.compile(optimizer="adam", loss=..., balancer=balancer)
```
"""

from keras_dbmtl.balancers.base import Aggregation, Balancer, TaskJacobian
from keras_dbmtl.balancers.registry import get, names, register
from keras_dbmtl.balancers.ew import EW
from keras_dbmtl.balancers.dbmtl import DBMTL

__all__ = ["Aggregation", "Balancer", "TaskJacobian", "get", "names", "register", "EW", "DBMTL"]
