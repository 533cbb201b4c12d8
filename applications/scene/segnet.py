"""SegNet with MTAN attention, the model of the paper's Table 6 (the CAGrad / Nash-MTL / LibMTL NYUv2 SegNet).

A shared SegNet (5 encoder stages with 2x2 max pooling that remembers where each maximum was, 5 decoder stages
that un-pool to those positions; 3x3 conv -> BN -> ReLU blocks, widths 64-128-256-512-512) and, per task, MTAN
attention over every encoder and decoder stage. The encoder returns `{task: 64-channel full-resolution
features}`; each task's `ConvHead` (3x3 conv, 1x1 conv) predicts from its own map.

Per task (names `<task>_encoder_attention_<j>`, `<task>_decoder_attention_<j>`) the attention branches are
task-specific (`segnet_task_layers`); the SegNet and the attention's `encoder_block_att_<j>` /
`decoder_block_att_<j>` convolutions are shared. (The reference computes per-task gradients over the whole
encoder, attention included; declaring the branches task-specific updates each from its own task's loss.)
With `attention=False` the encoder is the plain shared SegNet and returns one feature map.

Convolutions use Glorot-normal weights and zero biases (the reference's Xavier-normal initialisation); the
decoder attention's 2x upsampling is bilinear with half-pixel centres (the reference aligns corners).
Image height and width must divide by 32.

```python
import numpy as np
from applications.scene.segnet import build_segnet_encoder, segnet_task_layers

encoder = build_segnet_encoder(["segmentation", "depth"], width=8)
features = encoder(np.zeros((1, 32, 32, 3), "float32"))
assert tuple(features["depth"].shape) == (1, 32, 32, 8)
```
"""

import keras
from keras import ops

from applications.scene.heads import BN


@keras.saving.register_keras_serializable(package="keras_dbmtl_scene")
class MaxPoolWithArgmax(keras.layers.Layer):
    """2x2 / stride-2 max pooling that also returns which of the 4 window positions held the maximum.

    Returns `(pooled, argmax)` with `argmax` in {0, 1, 2, 3} (row-major in the window; the first maximum wins,
    as PyTorch's `MaxPool2d(return_indices=True)`).
    """

    def call(self, inputs):
        windows = _windows(inputs)                                    # (B, H/2, W/2, 4, C)
        argmax = ops.argmax(windows, axis=3)
        pooled = ops.sum(windows * ops.one_hot(argmax, 4, axis=3, dtype=windows.dtype), axis=3)
        return pooled, ops.cast(argmax, "int32")

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        half = lambda d: None if d is None else d // 2  # noqa: E731
        return (b, half(h), half(w), c), (b, half(h), half(w), c)

    def compute_output_spec(self, inputs):
        shape = self.compute_output_shape(inputs.shape)[0]
        return keras.KerasTensor(shape, inputs.dtype), keras.KerasTensor(shape, "int32")


@keras.saving.register_keras_serializable(package="keras_dbmtl_scene")
class MaxUnpool(keras.layers.Layer):
    """Inverse of `MaxPoolWithArgmax`: each value goes back to its window's argmax position, zeros elsewhere."""

    def call(self, inputs):
        values, argmax = inputs
        shape = ops.shape(values)
        spread = ops.expand_dims(values, 3) * ops.one_hot(argmax, 4, axis=3, dtype=values.dtype)
        spread = ops.reshape(spread, (-1, shape[1], shape[2], 2, 2, shape[3]))
        spread = ops.transpose(spread, (0, 1, 3, 2, 4, 5))
        return ops.reshape(spread, (-1, shape[1] * 2, shape[2] * 2, shape[3]))

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape[0]
        double = lambda d: None if d is None else d * 2  # noqa: E731
        return (b, double(h), double(w), c)


def _windows(x):
    shape = ops.shape(x)
    x = ops.reshape(x, (-1, shape[1] // 2, 2, shape[2] // 2, 2, shape[3]))
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
    return ops.reshape(x, (-1, shape[1] // 2, shape[2] // 2, 4, shape[3]))


def _conv_block(channels, name, repeats=1):
    """`repeats` x (3x3 conv -> BN -> ReLU)."""
    layers = []
    for r in range(repeats):
        layers += [keras.layers.Conv2D(channels, 3, padding="same", kernel_initializer="glorot_normal",
                                       name=f"conv_{r}"),
                   keras.layers.BatchNormalization(name=f"bn_{r}", **BN),
                   keras.layers.ReLU(name=f"relu_{r}")]
    return keras.Sequential(layers, name=name)


def _attention(mid_channels, out_channels, name):
    return keras.Sequential([
        keras.layers.Conv2D(mid_channels, 1, kernel_initializer="glorot_normal", name="conv_1"),
        keras.layers.BatchNormalization(name="bn_1", **BN),
        keras.layers.ReLU(name="relu"),
        keras.layers.Conv2D(out_channels, 1, kernel_initializer="glorot_normal", name="conv_2"),
        keras.layers.BatchNormalization(name="bn_2", **BN),
        keras.layers.Activation("sigmoid", name="sigmoid"),
    ], name=name)


def segnet_filters(width=64):
    """Stage widths: (64, 128, 256, 512, 512) for width 64."""
    return [width, 2 * width, 4 * width, 8 * width, 8 * width]


def segnet_task_layers(tasks, num_stages=5):
    """task_layers for `keras_dbmtl.MultiTaskModel`: each task's encoder and decoder attention branches."""
    return {task: [f"{task}_{part}_attention_{j}" for part in ("encoder", "decoder") for j in range(num_stages)]
            for task in tasks}


def build_segnet_encoder(tasks, width=64, attention=True, name="segnet_mtan_encoder"):
    """SegNet (+ per-task MTAN attention when `attention`): returns `{task: features}` or one feature map."""
    f = segnet_filters(width)
    inputs = keras.Input((None, None, 3), name="image")

    # Shared SegNet.
    encoder_block = [_conv_block(f[0], "encoder_block_0")] + [_conv_block(f[i + 1], f"encoder_block_{i + 1}")
                                                              for i in range(4)]
    conv_block_enc = [_conv_block(f[0], "conv_block_enc_0"), _conv_block(f[1], "conv_block_enc_1")]
    conv_block_enc += [_conv_block(f[i], f"conv_block_enc_{i}", repeats=2) for i in range(2, 5)]
    decoder_block = [_conv_block(f[0], "decoder_block_0")] + [_conv_block(f[i], f"decoder_block_{i + 1}")
                                                              for i in range(4)]
    conv_block_dec = [_conv_block(f[0], "conv_block_dec_0"), _conv_block(f[0], "conv_block_dec_1")]
    conv_block_dec += [_conv_block(f[i - 1], f"conv_block_dec_{i}", repeats=2) for i in range(2, 5)]

    enc_in, enc_out, indices = [], [], []
    x = inputs
    for i in range(5):
        enc_in.append(encoder_block[i](x))
        enc_out.append(conv_block_enc[i](enc_in[i]))
        x, argmax = MaxPoolWithArgmax(name=f"pool_{i}")(enc_out[i])
        indices.append(argmax)
    unpooled, dec_out = [], []
    for i in range(5):
        unpooled.append(MaxUnpool(name=f"unpool_{i}")([x, indices[-i - 1]]))
        x = conv_block_dec[-i - 1](decoder_block[-i - 1](unpooled[i]))
        dec_out.append(x)
    if not attention:
        return keras.Model(inputs, x, name=name)

    # Shared parts of the attention paths.
    encoder_block_att = [_conv_block(f[i + 1], f"encoder_block_att_{i}") for i in range(4)]
    encoder_block_att.append(_conv_block(f[4], "encoder_block_att_4"))
    decoder_block_att = [_conv_block(f[0], "decoder_block_att_0")]
    decoder_block_att += [_conv_block(f[i], f"decoder_block_att_{i + 1}") for i in range(3)]
    decoder_block_att.append(_conv_block(f[4], "decoder_block_att_4"))

    outputs = {}
    for task in tasks:
        a = None
        for j in range(5):
            mask_input = enc_in[j] if j == 0 else keras.layers.Concatenate(
                name=f"{task}_encoder_concat_{j}")([enc_in[j], a])
            mask = _attention(f[j], f[j], f"{task}_encoder_attention_{j}")(mask_input)
            a = keras.layers.Multiply(name=f"{task}_encoder_mask_{j}")([mask, enc_out[j]])
            a = encoder_block_att[j](a)
            a = keras.layers.MaxPooling2D(2, name=f"{task}_encoder_pool_{j}")(a)
        for j in range(5):
            a = keras.layers.UpSampling2D(2, interpolation="bilinear", name=f"{task}_decoder_up_{j}")(a)
            a = decoder_block_att[-j - 1](a)
            mask_input = keras.layers.Concatenate(name=f"{task}_decoder_concat_{j}")([unpooled[j], a])
            out_channels = f[max(3 - j, 0)]
            mask = _attention(out_channels, out_channels, f"{task}_decoder_attention_{4 - j}")(mask_input)
            a = keras.layers.Multiply(name=f"{task}_decoder_mask_{j}")([mask, dec_out[j]])
        outputs[task] = a
    return keras.Model(inputs, outputs, name=name)
