"""Cross-stitch networks (Misra et al., CVPR 2016) on dilated ResNets: one ResNet column per task.

As in the reference (LibMTL's `Cross_stitch` for ResNet encoders): every task has its own ResNet (stem and four
stages); between consecutive stages a cross-stitch unit mixes the columns linearly,

    input of stage i+1 of task t = sum_j alpha_i[t, j] * output of stage i of task j,

with one learnable T x T matrix `alpha_i` per junction (3 junctions for 4 stages). The reference initialises
every `alpha` to ones; `self_weight` / `other_weight` give the paper's 0.9 / 0.1 instead. The encoder returns
`{task: features}` (the last stage of each column).

Which variables are whose: the columns belong to their task (`cross_stitch_task_layers`: `<task>_stem`,
`<task>_stage_<i>`), the cross-stitch units are the shared variables the balancer acts on. The reference
instead treats the whole encoder (all columns) as shared; pass `task_layers=None` to `MultiTaskModel` for that.

```python
import numpy as np
from applications.scene.backbones import build_backbone
from applications.scene.cross_stitch import build_cross_stitch_encoder, cross_stitch_task_layers

tasks = ["segmentation", "depth"]
encoder = build_cross_stitch_encoder(tasks, lambda name: build_backbone("tiny", name=name))
features = encoder(np.zeros((1, 32, 32, 3), "float32"))
assert tuple(features["segmentation"].shape) == (1, 4, 4, 256)
assert cross_stitch_task_layers(tasks)["depth"][0] == "depth_stem"
```
"""

import keras

from keras_dbmtl import architectures


@keras.saving.register_keras_serializable(package="keras_dbmtl_scene")
class CrossStitch(architectures.CrossStitch):
    """The library's cross-stitch unit (`keras_dbmtl.architectures.CrossStitch`: linear mixing of T same-shaped
    feature maps with a learnable T x T matrix) with the reference's initialisation (1, 1), registered under its
    earlier name so that saved scene models still load."""

    def __init__(self, num_tasks, self_weight=1.0, other_weight=1.0, **kwargs):
        super().__init__(num_tasks, self_weight=self_weight, other_weight=other_weight, **kwargs)


def cross_stitch_task_layers(tasks, num_stages=4):
    """task_layers for `keras_dbmtl.MultiTaskModel`: each task's ResNet column."""
    return {task: [f"{task}_stem"] + [f"{task}_stage_{i}" for i in range(num_stages)] for task in tasks}


def split_stages(backbone, prefix):
    """A ResNet backbone cut into sub-models: the stem (to the max pooling), then one per stage."""
    starts = [backbone.get_layer(name).output for name in backbone.stage_inputs()]
    ends = [backbone.get_layer(names[-1]).output for names in backbone.stage_outputs()]
    parts = [keras.Model(backbone.input, starts[0], name=f"{prefix}_stem")]
    parts += [keras.Model(start, end, name=f"{prefix}_stage_{i}") for i, (start, end) in enumerate(zip(starts, ends))]
    return parts


def build_cross_stitch_encoder(tasks, make_backbone, self_weight=1.0, other_weight=1.0,
                               name="cross_stitch_encoder"):
    """The cross-stitch encoder: returns `{task: features}`.

    Args:
        tasks: task names.
        make_backbone: callable(name) -> a new `DilatedResNetBackbone` (one per task, e.g. ImageNet weights).
        self_weight, other_weight: initial diagonal / off-diagonal cross-stitch weights (reference: 1 and 1).
    """
    tasks = list(tasks)
    columns = {task: split_stages(make_backbone(f"{task}_resnet"), task) for task in tasks}
    inputs = keras.Input((None, None, 3), name="image")
    features = [columns[task][0](inputs) for task in tasks]
    num_stages = len(columns[tasks[0]]) - 1
    for i in range(num_stages):
        if i > 0:
            features = CrossStitch(len(tasks), self_weight, other_weight, name=f"cross_stitch_{i - 1}")(features)
        features = [columns[task][i + 1](x) for task, x in zip(tasks, features)]
    return keras.Model(inputs, dict(zip(tasks, features)), name=name)
