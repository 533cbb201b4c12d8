"""Dilated ResNet encoders built on keras-hub's `ResNetBackbone`.

keras-hub's `ResNetBackbone` has no dilation option: it always reaches output stride 32. The paper's encoder is
a ResNet whose last two stages trade their stride for dilation (output stride 8, the "à trous" network of
DeepLab and of the reference code's `resnet_dilated`). `DilatedResNetBackbone` is a `ResNetBackbone` subclass
that builds the same graph and then converts the stride-2 convolutions of the last stages:

- the strided 3x3 convolution (and the strided 1x1 shortcut) of a converted stage gets stride 1, and the 3x3
  convolution keeps the dilation of the stage before it (its explicit zero padding grows to match);
- every other 3x3 convolution of the stage gets the new dilation (2 for the third stage, 4 for the fourth at
  output stride 8).

The variables are exactly those of the undilated network (dilation adds no parameter), so ImageNet weights of
a keras-hub preset load unchanged, and in inference mode the output equals the stride-32 network's output
evaluated densely: `dilated(x)[:, ::4, ::4] == resnet(x)` for inputs whose size divides by 32.

```python
import numpy as np
from applications.scene.backbones import build_backbone

backbone = build_backbone("tiny", output_stride=8)       # random weights, no download
features = backbone(np.zeros((1, 32, 32, 3), "float32"))
assert tuple(features.shape) == (1, 4, 4, 256)            # stride 8, 4 x 64 channels
# build_backbone("resnet50", weights="resnet_50_imagenet")  # ImageNet weights (preset name or local directory)
```
"""

import re

import keras
from keras_hub.models import ResNetBackbone

# ResNet layouts in keras-hub's `ResNetBackbone` arguments. "tiny" is a reduced-width bottleneck ResNet for
# tests and smoke runs (keras-hub requires 64 filters in the first stage).
RESNET_CONFIGS = {
    "resnet18": dict(stackwise_num_filters=[64, 128, 256, 512], stackwise_num_blocks=[2, 2, 2, 2],
                     block_type="basic_block"),
    "resnet34": dict(stackwise_num_filters=[64, 128, 256, 512], stackwise_num_blocks=[3, 4, 6, 3],
                     block_type="basic_block"),
    "resnet50": dict(stackwise_num_filters=[64, 128, 256, 512], stackwise_num_blocks=[3, 4, 6, 3],
                     block_type="bottleneck_block"),
    "resnet101": dict(stackwise_num_filters=[64, 128, 256, 512], stackwise_num_blocks=[3, 4, 23, 3],
                      block_type="bottleneck_block"),
    "tiny": dict(stackwise_num_filters=[64, 64, 64, 64], stackwise_num_blocks=[1, 1, 1, 1],
                 block_type="bottleneck_block"),
}
_COMMON = dict(input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_strides=[1, 2, 2, 2])
_STEM_STRIDE = 4  # 7x7 stride-2 convolution, then 3x3 stride-2 max pooling
_LAYER_NAME = re.compile(r"^stack(\d+)_block(\d+)_(\d+)_(conv|pad)$")


def resnet_config(variant):
    """keras-hub `ResNetBackbone` arguments of a named ResNet ("resnet18", "resnet34", "resnet50", ...)."""
    if variant not in RESNET_CONFIGS:
        raise ValueError(f"Unknown backbone {variant!r}; expected one of {sorted(RESNET_CONFIGS)}.")
    return {**_COMMON, **RESNET_CONFIGS[variant]}


def stage_dilations(stackwise_num_strides, output_stride):
    """Per stage: (stride, dilation of its strided conv, dilation of its other 3x3 convs), for an output stride."""
    if output_stride not in (4, 8, 16, 32) or output_stride < _STEM_STRIDE:
        raise ValueError(f"output_stride must be one of 4, 8, 16, 32; got {output_stride}.")
    current, dilation, plan = _STEM_STRIDE, 1, []
    for stride in stackwise_num_strides:
        if current * stride > output_stride:
            plan.append((1, dilation, dilation * stride))
            dilation *= stride
        else:
            current *= stride
            plan.append((stride, dilation, dilation))
    return plan


@keras.saving.register_keras_serializable(package="keras_dbmtl_scene")
class DilatedResNetBackbone(ResNetBackbone):
    """keras-hub `ResNetBackbone` with dilated last stages (output stride 8 or 16; 32 is the plain ResNet).

    Args:
        output_stride: 8 (the paper's encoder), 16 or 32.
        **kwargs: `ResNetBackbone` arguments (see `resnet_config`). Only v1 ResNets ("basic_block",
            "bottleneck_block") and channels-last images are supported; spatial dimensions stay unknown so the
            same model runs on any image size.
    """

    def __init__(self, output_stride=8, **kwargs):
        if kwargs.get("block_type") not in ("basic_block", "bottleneck_block"):
            raise ValueError("DilatedResNetBackbone supports block_type 'basic_block' or 'bottleneck_block', "
                             f"got {kwargs.get('block_type')!r}.")
        if kwargs.get("use_pre_activation"):
            raise ValueError("DilatedResNetBackbone supports ResNet v1 only (use_pre_activation=False).")
        data_format = kwargs.get("data_format") or keras.config.image_data_format()
        if data_format != "channels_last":
            raise ValueError("DilatedResNetBackbone supports channels_last images only.")
        image_shape = tuple(kwargs.pop("image_shape", None) or (None, None, 3))
        kwargs["image_shape"] = (None, None, image_shape[-1])
        plan = stage_dilations(kwargs["stackwise_num_strides"], output_stride)
        super().__init__(**kwargs)
        self.output_stride = output_stride
        self.stage_plan = plan
        for layer in self.layers:
            match = _LAYER_NAME.match(layer.name)
            if match is None:
                continue
            stack, block = int(match.group(1)), int(match.group(2))
            stride, strided_dilation, dilation = plan[stack]
            if stride == kwargs["stackwise_num_strides"][stack]:
                continue  # stage keeps its stride (and has dilation 1)
            strided = block == 0 and (isinstance(layer, keras.layers.ZeroPadding2D) or layer.strides != (1, 1))
            if isinstance(layer, keras.layers.ZeroPadding2D):
                # Explicit "same" padding of the (formerly) strided 3x3 convolution.
                layer.padding = ((strided_dilation,) * 2, (strided_dilation,) * 2)
                continue
            if strided:
                layer.strides = (1, 1)
            if tuple(layer.kernel_size) == (3, 3):
                rate = strided_dilation if strided else dilation
                layer.dilation_rate = (rate, rate)

    @property
    def num_features(self):
        """Channels of the output feature map (2048 for ResNet-50)."""
        expansion = 4 if self.block_type == "bottleneck_block" else 1
        return self.stackwise_num_filters[-1] * expansion

    def stage_outputs(self):
        """Names of the layers that end each stage's blocks: `[[block0_out, block1_out, ...] per stage]`."""
        return [[f"stack{s}_block{b}_out" for b in range(n)] for s, n in enumerate(self.stackwise_num_blocks)]

    def stage_inputs(self):
        """Name of the layer whose output enters each stage (the stem's max pooling, then the stages' ends)."""
        return ["pool1_pool"] + [names[-1] for names in self.stage_outputs()[:-1]]

    def stage_strides(self):
        """Output stride of each stage's output (e.g. [4, 8, 8, 8] at output stride 8)."""
        current, strides = _STEM_STRIDE, []
        for stride, _, _ in self.stage_plan:
            current *= stride
            strides.append(current)
        return strides

    def get_config(self):
        config = super().get_config()
        config["output_stride"] = self.output_stride
        return config


def build_backbone(variant="resnet50", weights=None, output_stride=8, name=None):
    """A `DilatedResNetBackbone`.

    Args:
        variant: "resnet18", "resnet34", "resnet50", "resnet101" or "tiny" (used when `weights` is None).
        weights: None (random initialisation, no download), a keras-hub preset name such as
            "resnet_50_imagenet", or the path of a local preset directory. The preset's architecture wins over
            `variant`.
        output_stride: 8 (paper), 16 or 32.
        name: the model's name (default "dilated_resnet").
    """
    name = name or "dilated_resnet"
    if weights is None:
        return DilatedResNetBackbone(output_stride=output_stride, name=name, **resnet_config(variant))
    source = ResNetBackbone.from_preset(weights)
    config = source.get_config()
    config.update(name=name, output_stride=output_stride)
    backbone = DilatedResNetBackbone.from_config(config)
    backbone.set_weights(source.get_weights())
    return backbone
