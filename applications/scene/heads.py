"""Task heads for dense prediction: the DeepLab (ASPP) head of the paper's HPS model, and output layers.

`DeepLabHead` is the reference code's per-task decoder: keras-hub's DeepLabV3 `SpatialPyramidPooling`
(a 1x1 branch, three 3x3 atrous branches at rates 12/24/36, an image-pooling branch, a 1x1 projection with
dropout 0.5), then a 3x3 convolution + batch norm + ReLU and a 1x1 classifier. The prediction is resized
bilinearly by the encoder's output stride back to the input size; a surface-normal head L2-normalises it.

With C input channels, F head channels and K outputs it has (trainable parameters, batch-norm scale and
offset included; no convolution bias except the classifier's):

    (C F) + 3 (9 C F) + (C F) + 5 F F + 9 F F + (F K + K)  +  2 F x 7 batch norms

```python
import numpy as np
from applications.scene.heads import DeepLabHead

head = DeepLabHead(num_outputs=13, channels=16, upsample=8, name="segmentation_head")
logits = head(np.zeros((2, 4, 4, 32), "float32"))
assert tuple(logits.shape) == (2, 32, 32, 13)
```
"""

import keras
from keras import ops
from keras_hub.src.models.deeplab_v3.deeplab_v3_layers import SpatialPyramidPooling

# Batch-norm settings of the reference (PyTorch defaults: momentum 0.1 there is 0.9 here, eps 1e-5).
BN = dict(momentum=0.9, epsilon=1e-5)


@keras.saving.register_keras_serializable(package="keras_dbmtl_scene")
class L2Normalize(keras.layers.Layer):
    """Unit-length vectors along the last axis (surface-normal predictions)."""

    def __init__(self, epsilon=1e-12, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def call(self, inputs):
        squared = ops.sum(ops.square(inputs), axis=-1, keepdims=True)
        return inputs * ops.rsqrt(ops.maximum(squared, self.epsilon))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


def select_task(inputs, task):
    """The head's own feature map: `inputs[task]` when the encoder returns one feature map per task."""
    if isinstance(inputs, dict):
        if task is None or task not in inputs:
            raise ValueError(f"The encoder returned features for tasks {sorted(inputs)}; this head's task is "
                             f"{task!r}. Pass task=<name> when building the head.")
        return inputs[task]
    return inputs


@keras.saving.register_keras_serializable(package="keras_dbmtl_scene")
class DenseTaskHead(keras.layers.Layer):
    """Base of the dense-prediction heads: task selection, resizing and normal L2-normalisation.

    Subclasses create `self.body` (a list of layers applied in order) in `__init__`.

    Args:
        num_outputs: output channels (classes for segmentation, 1 for depth, 3 for normals).
        task: the task whose feature map to take when the encoder returns a dict task -> features.
        upsample: integer factor of the final bilinear resize (the encoder's output stride), 1 for none.
        normalize: L2-normalise the output along channels (surface normals).
    """

    def __init__(self, num_outputs, task=None, upsample=1, normalize=False, **kwargs):
        super().__init__(**kwargs)
        self.num_outputs = int(num_outputs)
        self.task = task
        self.upsample = int(upsample)
        self.normalize = bool(normalize)
        self.resize = (keras.layers.UpSampling2D(self.upsample, interpolation="bilinear", name="resize")
                       if self.upsample > 1 else None)
        self.l2_normalize = L2Normalize(name="l2_normalize") if self.normalize else None
        self.body = []

    def build(self, input_shape):
        shape = tuple(select_task(input_shape, self.task))
        for layer in self.body:
            layer.build(shape)
            shape = tuple(layer.compute_output_shape(shape))
        self.built = True

    def call(self, inputs, training=None):
        x = select_task(inputs, self.task)
        for layer in self.body:  # batch norm and dropout take `training` from the call context
            x = layer(x)
        if self.resize is not None:
            x = self.resize(x)
        if self.l2_normalize is not None:
            x = self.l2_normalize(x)
        return x

    def compute_output_shape(self, input_shape):
        shape = tuple(select_task(input_shape, self.task))
        scale = lambda d: None if d is None else d * self.upsample  # noqa: E731
        return (shape[0], scale(shape[1]), scale(shape[2]), self.num_outputs)

    def get_config(self):
        return {**super().get_config(), "num_outputs": self.num_outputs, "task": self.task,
                "upsample": self.upsample, "normalize": self.normalize}


@keras.saving.register_keras_serializable(package="keras_dbmtl_scene")
class DeepLabHead(DenseTaskHead):
    """ASPP (DeepLabV3) head: SpatialPyramidPooling -> 3x3 conv-BN-ReLU -> 1x1 classifier -> resize.

    Args:
        num_outputs, task, upsample, normalize: see `DenseTaskHead`.
        channels: ASPP and head width (256 in the paper).
        dilation_rates: atrous rates of the ASPP branches ((12, 24, 36) at output stride 8).
        dropout: dropout of the ASPP projection (0.5 as DeepLabV3).
    """

    def __init__(self, num_outputs, task=None, upsample=8, normalize=False, channels=256,
                 dilation_rates=(12, 24, 36), dropout=0.5, **kwargs):
        super().__init__(num_outputs, task=task, upsample=upsample, normalize=normalize, **kwargs)
        self.channels = int(channels)
        self.dilation_rates = tuple(int(r) for r in dilation_rates)
        self.dropout = float(dropout)
        self.body = [
            SpatialPyramidPooling(dilation_rates=list(self.dilation_rates), num_channels=self.channels,
                                  dropout=self.dropout, name="aspp"),
            keras.layers.Conv2D(self.channels, 3, padding="same", use_bias=False, name="conv"),
            keras.layers.BatchNormalization(name="bn", **BN),
            keras.layers.ReLU(name="relu"),
            keras.layers.Conv2D(self.num_outputs, 1, name="classifier"),
        ]

    def get_config(self):
        return {**super().get_config(), "channels": self.channels, "dilation_rates": list(self.dilation_rates),
                "dropout": self.dropout}


@keras.saving.register_keras_serializable(package="keras_dbmtl_scene")
class ConvHead(DenseTaskHead):
    """The SegNet/MTAN prediction layer of the reference: 3x3 conv (same width) -> 1x1 conv to the outputs."""

    def __init__(self, num_outputs, task=None, upsample=1, normalize=False, channels=64, **kwargs):
        super().__init__(num_outputs, task=task, upsample=upsample, normalize=normalize, **kwargs)
        self.channels = int(channels)
        self.body = [keras.layers.Conv2D(self.channels, 3, padding="same", name="conv"),
                     keras.layers.Conv2D(self.num_outputs, 1, name="classifier")]

    def get_config(self):
        return {**super().get_config(), "channels": self.channels}

