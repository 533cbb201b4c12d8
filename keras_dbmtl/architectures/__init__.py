"""Multi-task architectures as Keras layers: the `encoder` of a `keras_dbmtl.MultiTaskModel`.

Each returns a dict task -> features and says which of its sub-layers belong to one task only
(`task_layers()`); wrap each head in a `TaskTower` (`towers(encoder, heads)`) so that it reads its own task's
features:

    MMoE                 Ma et al., KDD 2018: shared experts, one softmax gate per task
    CGC, PLE             Tang et al., RecSys 2020: task and shared experts; PLE stacks several levels
    DSelectK             Hazimeh et al., NeurIPS 2021: MMoE with differentiable top-k gates
    CrossStitchNetwork   Misra et al., CVPR 2016: one column per task, cross-stitch units between stages
    MTAN                 Liu et al., CVPR 2019: task attention modules over shared stages

```python
import keras, keras_dbmtl
from keras_dbmtl import architectures

encoder = architectures.PLE(["a", "b"], num_levels=2, expert_units=(32,))
model = keras_dbmtl.MultiTaskModel(
    encoder=encoder,
    heads=architectures.towers(encoder, {"a": keras.layers.Dense(1), "b": keras.layers.Dense(1)}),
    task_layers=encoder.task_layers(),
)
```
"""

from keras_dbmtl.architectures.base import MultiTaskLayer, TaskTower, towers
from keras_dbmtl.architectures.cgc import CGC
from keras_dbmtl.architectures.cross_stitch import CrossStitch, CrossStitchNetwork
from keras_dbmtl.architectures.dselect_k import DSelectK, DSelectKGate, smooth_step
from keras_dbmtl.architectures.mmoe import MMoE
from keras_dbmtl.architectures.mtan import MTAN
from keras_dbmtl.architectures.ple import PLE

__all__ = ["CGC", "CrossStitch", "CrossStitchNetwork", "DSelectK", "DSelectKGate", "MMoE", "MTAN", "MultiTaskLayer",
           "PLE", "TaskTower", "smooth_step", "towers"]
