"""MTAN (Liu et al., CVPR 2019) on the dilated ResNet: one attention branch per task over a shared backbone.

The reference (LibMTL's `MTAN` for ResNet encoders) splits every ResNet stage into "all blocks but the last"
(output `u_i`) and "the last block" (output `p_i`). For each task and stage `i`:

    mask_i = attention_i(u_0)                                  (i = 0)
    mask_i = attention_i(concat(u_i, a_{i-1}))                 (i > 0)
    a_i    = block_att_i(mask_i * p_i)        (i < 3; max-pooled by 2 after stage 0, and whenever the
    a_3    = mask_3 * p_3                      next stage is coarser)

`attention_i` is 1x1 conv -> BN -> ReLU -> 1x1 conv -> BN -> sigmoid (task-specific: layers named
`<task>_attention_<i>`); `block_att_i` is a residual block (bottleneck or basic like the backbone) with a 1x1
projection shortcut, shared by the tasks (`block_att_<i>`). The encoder returns `{task: a_3}`, one feature map
per task (2048 channels at stride 8 for ResNet-50); each DeepLab head takes its own task's map.

Which variables are whose: the backbone and the `block_att_*` blocks are shared (balanced); the attention
branches belong to their task (`mtan_task_layers`). The reference builds the per-task attention list as
`ModuleList([module] * T)`, which repeats one module T times, so its "task-specific" attention is in fact shared
by all tasks; here every task has its own, as in the MTAN paper.

```python
import numpy as np
from applications.scene.backbones import build_backbone
from applications.scene.mtan import build_mtan_encoder, mtan_task_layers

tasks = ["segmentation", "depth"]
encoder = build_mtan_encoder(tasks, build_backbone("tiny"))
features = encoder(np.zeros((1, 32, 32, 3), "float32"))
assert sorted(features) == sorted(tasks) and tuple(features["depth"].shape) == (1, 4, 4, 256)
assert mtan_task_layers(tasks)["depth"] == [f"depth_attention_{i}" for i in range(4)]
```
"""

import keras

from applications.scene.heads import BN


def attention_branch(in_channels, mid_channels, out_channels, name):
    """1x1 conv -> BN -> ReLU -> 1x1 conv -> BN -> sigmoid (a soft mask)."""
    return keras.Sequential([
        keras.Input((None, None, in_channels)),
        keras.layers.Conv2D(mid_channels, 1, name="conv_1"),
        keras.layers.BatchNormalization(name="bn_1", **BN),
        keras.layers.ReLU(name="relu"),
        keras.layers.Conv2D(out_channels, 1, name="conv_2"),
        keras.layers.BatchNormalization(name="bn_2", **BN),
        keras.layers.Activation("sigmoid", name="sigmoid"),
    ], name=name)


def residual_block(in_channels, filters, block_type, name):
    """A stride-1 ResNet block with a 1x1 projection shortcut (the reference's `_conv_layer`)."""
    expansion = 4 if block_type == "bottleneck_block" else 1
    inputs = keras.Input((None, None, in_channels))
    shortcut = keras.layers.Conv2D(filters * expansion, 1, use_bias=False, name="shortcut_conv")(inputs)
    shortcut = keras.layers.BatchNormalization(name="shortcut_bn", **BN)(shortcut)
    if block_type == "bottleneck_block":
        kernels = [(filters, 1), (filters, 3), (filters * expansion, 1)]
    else:
        kernels = [(filters, 3), (filters, 3)]
    x = inputs
    for k, (width, size) in enumerate(kernels):
        x = keras.layers.Conv2D(width, size, padding="same", use_bias=False, name=f"conv_{k + 1}")(x)
        x = keras.layers.BatchNormalization(name=f"bn_{k + 1}", **BN)(x)
        if k < len(kernels) - 1:
            x = keras.layers.ReLU(name=f"relu_{k + 1}")(x)
    x = keras.layers.Add(name="add")([shortcut, x])
    x = keras.layers.ReLU(name="out")(x)
    return keras.Model(inputs, x, name=name)


def mtan_task_layers(tasks, num_stages=4):
    """task_layers for `keras_dbmtl.MultiTaskModel`: each task's attention branches."""
    return {task: [f"{task}_attention_{i}" for i in range(num_stages)] for task in tasks}


def build_mtan_encoder(tasks, backbone, name="mtan_encoder"):
    """The MTAN encoder over a `DilatedResNetBackbone`: returns `{task: features}`.

    Args:
        tasks: task names.
        backbone: a `DilatedResNetBackbone`.
    """
    expansion = 4 if backbone.block_type == "bottleneck_block" else 1
    channels = [f * expansion for f in backbone.stackwise_num_filters]
    strides = backbone.stage_strides()
    # (output of all blocks but the last, output of the last block) per stage. A one-block stage's "all but the
    # last" is its input, max-pooled to the stage's resolution (the reference needs two blocks or more).
    taps, entry_stride = [], 4
    for i, (names, entry) in enumerate(zip(backbone.stage_outputs(), backbone.stage_inputs())):
        if len(names) > 1:
            before_last = backbone.get_layer(names[-2]).output
        else:
            before_last = backbone.get_layer(entry).output
            if entry_stride < strides[i]:
                before_last = keras.layers.MaxPooling2D(strides[i] // entry_stride, name=f"stage_{i}_entry_pool")(
                    before_last)
        taps.append((before_last, backbone.get_layer(names[-1]).output))
        entry_stride = strides[i]
    num_stages = len(taps)
    block_att = [residual_block(channels[i], channels[i + 1] // expansion, backbone.block_type, f"block_att_{i}")
                 for i in range(num_stages - 1)]
    outputs = {}
    for task in tasks:
        attended, attended_stride = None, None
        for i, (before_last, last) in enumerate(taps):
            if i == 0:
                mask_input = before_last
                in_channels = before_last.shape[-1]
            else:
                while attended_stride < strides[i]:
                    attended = keras.layers.MaxPooling2D(2, name=f"{task}_pool_{i}_{attended_stride}")(attended)
                    attended_stride *= 2
                mask_input = keras.layers.Concatenate(name=f"{task}_concat_{i}")([before_last, attended])
                in_channels = before_last.shape[-1] + channels[i]
            mask = attention_branch(in_channels, channels[i] // expansion, channels[i],
                                    f"{task}_attention_{i}")(mask_input)
            attended = keras.layers.Multiply(name=f"{task}_mask_{i}")([mask, last])
            attended_stride = strides[i]
            if i < num_stages - 1:
                attended = block_att[i](attended)
            if i == 0:
                attended = keras.layers.MaxPooling2D(2, name=f"{task}_pool_0")(attended)
                attended_stride *= 2
        outputs[task] = attended
    return keras.Model(backbone.input, outputs, name=name)
