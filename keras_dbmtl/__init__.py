"""keras-dbmtl: multi-task learning for Keras 3 with DB-MTL and the other task balancers.

```python
import keras_dbmtl
model = keras_dbmtl.MultiTaskModel(encoder=encoder, heads={"seg": seg_head, "depth": depth_head})
model.compile(optimizer="adam", loss={"seg": ..., "depth": ...}, balancer="dbmtl")
```
"""

from keras_dbmtl import architectures
from keras_dbmtl import balancing
from keras_dbmtl import balancers
from keras_dbmtl import callbacks
from keras_dbmtl import distributed
from keras_dbmtl import functional
from keras_dbmtl import gradients
from keras_dbmtl import losses
from keras_dbmtl import metrics
from keras_dbmtl.model import MultiTaskModel

__version__ = "0.1.0"

#: The front doors for a user's own training loop, imported on first use (each needs its backend installed):
#: `keras_dbmtl.jax` (a pure transform for a jitted optax step), `keras_dbmtl.torch` (`Balancer.backward` in a
#: plain PyTorch loop), `keras_dbmtl.tensorflow` (a `tf.GradientTape` loop).
_DOORS = ("jax", "torch", "tensorflow")


def __getattr__(name):
    if name in _DOORS:
        import importlib

        return importlib.import_module(f"keras_dbmtl.{name}")
    raise AttributeError(f"module 'keras_dbmtl' has no attribute {name!r}")


__all__ = ["MultiTaskModel", "architectures", "balancers", "balancing", "callbacks", "distributed", "functional", "gradients", "losses", "metrics", "__version__"]
