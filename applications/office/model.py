"""The Table 4 model: a shared ResNet-18 encoder and one linear classifier per domain.

Shared encoder (as LibMTL's Office example): ResNet-18 feature map -> global average pooling ->
Dense(512) (weights N(0, 0.005), bias 0.1) -> BatchNorm -> ReLU -> Dropout(0.5). Heads: one
Dense(num_classes) per domain (logits; PyTorch Linear's default uniform(+-1/sqrt(fan_in)) init).
With ``per_task_inputs=True`` each domain's images go through the encoder on their own, so
BatchNorm statistics and dropout masks are per domain batch, as in LibMTL's multi-input mode.
"""

import keras

from applications import common

# keras_hub.models.ResNetBackbone arguments (ResNet v1, basic blocks; "resnet18" is the
# config of keras_hub's resnet_18_imagenet preset, built here without any download).
BACKBONES = {
    "resnet18": dict(
        input_conv_filters=[64], input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64, 128, 256, 512], stackwise_num_blocks=[2, 2, 2, 2],
        stackwise_num_strides=[1, 2, 2, 2], block_type="basic_block", use_pre_activation=False),
    # for quick runs / tests: two one-block stacks (64, 128 filters), ~0.3 M parameters
    "small": dict(
        input_conv_filters=[64], input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64, 128], stackwise_num_blocks=[1, 1],
        stackwise_num_strides=[1, 2], block_type="basic_block", use_pre_activation=False),
}


def _torch_linear_init(seed=None):
    # PyTorch nn.Linear default: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    return keras.initializers.VarianceScaling(
        scale=1.0 / 3.0, mode="fan_in", distribution="uniform", seed=seed)


def build_backbone(backbone="resnet18", weights=None, image_size=None):
    """The ResNet feature extractor (a keras_hub ResNetBackbone, output (B, h, w, C)).

    ``weights``: None (random init, no download), a keras_hub preset name such as
    ``"resnet_18_imagenet"`` (downloaded by keras_hub) or a local preset directory (one saved
    with ``backbone.save_to_preset(dir)``); with weights the preset's own config is used.
    """
    import keras_hub

    if weights:
        try:
            net = keras_hub.models.ResNetBackbone.from_preset(weights)
        except Exception as e:  # no network, wrong name, ...
            raise RuntimeError(
                f"Could not load ResNet weights from preset {weights!r}: {e}. Use a keras_hub "
                "preset name (needs a download) or a local preset directory, or weights=None "
                "(--weights none) for a random initialisation.") from e
        return net
    if backbone not in BACKBONES:
        raise ValueError(f"Unknown backbone {backbone!r}; expected one of {sorted(BACKBONES)}")
    shape = (image_size, image_size, 3) if image_size else (None, None, 3)
    if keras.config.image_data_format() == "channels_first":
        shape = (3,) + shape[:2]
    return keras_hub.models.ResNetBackbone(image_shape=shape, **BACKBONES[backbone])


def build_encoder(backbone="resnet18", weights=None, image_size=224, hidden_dim=512, dropout=0.5,
                  seed=None):
    """Shared encoder: ResNet -> GAP -> Dense(hidden) -> BN -> ReLU -> Dropout, as one Model."""
    net = build_backbone(backbone, weights, image_size)
    if keras.config.image_data_format() == "channels_first":
        inputs = keras.Input((3, image_size, image_size), name="image")
    else:
        inputs = keras.Input((image_size, image_size, 3), name="image")
    x = net(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="avgpool")(x)
    x = keras.layers.Dense(
        hidden_dim, name="hidden",
        kernel_initializer=keras.initializers.RandomNormal(0.0, 0.005, seed=seed),
        bias_initializer=keras.initializers.Constant(0.1))(x)
    # torch BatchNorm1d: momentum 0.1 (= keras 0.9), eps 1e-5
    x = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name="hidden_bn")(x)
    x = keras.layers.ReLU(name="hidden_relu")(x)
    x = keras.layers.Dropout(dropout, seed=seed, name="hidden_dropout")(x)
    return keras.Model(inputs, x, name="office_encoder")


def build_heads(domains, num_classes, seed=None):
    """One linear Dense(num_classes) (logits) per domain."""
    return {
        d: keras.layers.Dense(num_classes, name=f"head_{d}",
                              kernel_initializer=_torch_linear_init(seed),
                              bias_initializer=_torch_linear_init(seed))
        for d in domains
    }


def build_office_model(domains, num_classes, backbone="resnet18", weights=None, image_size=224,
                       hidden_dim=512, dropout=0.5, seed=None):
    """A ``keras_dbmtl.MultiTaskModel`` (per_task_inputs=True) over ``domains``, not compiled."""
    from keras_dbmtl.model import MultiTaskModel

    encoder = build_encoder(backbone, weights, image_size, hidden_dim, dropout, seed)
    heads = build_heads(domains, num_classes, seed)
    return MultiTaskModel(encoder=encoder, heads=heads, per_task_inputs=True)


def shared_classifier(model):
    """A plain Keras Model image -> {domain: logits of every head}, sharing ``model``'s encoder and
    heads. Evaluates one domain's split at a time (whatever its size) with a single compiled
    predict function for all domains; read the entry of the domain the images come from."""
    enc = model.encoder
    inputs = keras.Input(tuple(enc.inputs[0].shape[1:]), name="image")
    features = enc(inputs)
    outputs = {d: head(features) for d, head in model.heads.items()}
    return keras.Model(inputs, outputs, name="office_classifier")


def add_weight_decay(layers, weight_decay):
    """PyTorch-style coupled weight decay on every trainable variable of ``layers``
    (``applications.common.add_weight_decay``)."""
    common.add_weight_decay([v for layer in layers for v in layer.trainable_variables], weight_decay)
