"""keras-dbmtl: multi-task learning for Keras 3 with DB-MTL and the other task balancers.

```python
import keras_dbmtl
model = keras_dbmtl.MultiTaskModel(encoder=encoder, heads={"seg": seg_head, "depth": depth_head})
model.compile(optimizer="adam", loss={"seg": ..., "depth": ...}, balancer="dbmtl")
```
"""

from keras_dbmtl import architectures
from keras_dbmtl import balancers
from keras_dbmtl import callbacks
from keras_dbmtl import distributed
from keras_dbmtl import gradients
from keras_dbmtl import losses
from keras_dbmtl import metrics
from keras_dbmtl.model import MultiTaskModel

__version__ = "0.1.0"

__all__ = ["MultiTaskModel", "architectures", "balancers", "callbacks", "distributed", "gradients", "losses", "metrics", "__version__"]
