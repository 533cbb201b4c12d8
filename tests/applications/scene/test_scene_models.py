"""Scene models: dilation, parameter counts against closed forms, output shapes, shared vs task variables."""

import keras
import numpy as np
import pytest

from applications.scene.backbones import build_backbone, resnet_config
from applications.scene.cross_stitch import CrossStitch, build_cross_stitch_encoder
from applications.scene.heads import ConvHead, DeepLabHead
from applications.scene.models import build_scene_model
from applications.scene.segnet import MaxPoolWithArgmax, MaxUnpool, build_segnet_encoder

NYU_TASKS = {"segmentation": 13, "depth": 1, "normal": 3}


def shapes_only():
    """Variables created in this scope get shapes but are never initialised: counting needs no values (and
    skips JAX's per-shape compilation of the initialisers)."""
    return keras.StatelessScope(initialize_variables=False)


def count(variables):
    return sum(int(np.prod(v.shape)) for v in variables)


def ids(variables):
    return {id(v) for v in variables}


def conv_bn(cin, cout, k):
    """Trainable parameters of conv (with bias) + batch norm (scale, offset)."""
    return k * k * cin * cout + cout + 2 * cout


def attention(cin, mid, cout):
    """1x1 conv -> BN -> ReLU -> 1x1 conv -> BN (MTAN attention branch)."""
    return conv_bn(cin, mid, 1) + conv_bn(mid, cout, 1)


def deeplab_head(c, f, k):
    """ASPP (1x1, three 3x3 atrous, pooling branch, 1x1 projection over 5 f channels), 3x3 conv, classifier.
    Convolutions without bias except the classifier; 7 batch norms of f channels."""
    return c * f + 3 * 9 * c * f + c * f + 5 * f * f + 9 * f * f + (f * k + k) + 7 * 2 * f


@pytest.fixture(scope="module")
def resnet50():
    with shapes_only():
        return build_backbone("resnet50")


def test_resnet50_size_and_dilation(resnet50):
    # torchvision's resnet50 without its classifier: 25,557,032 - 2,049,000 parameters; plus 53,120 BN statistics
    assert count(resnet50.trainable_variables) == 23_508_032
    assert resnet50.count_params() == 23_561_152
    assert resnet50.num_features == 2048
    out = resnet50(keras.KerasTensor((1, 64, 96, 3)))
    assert tuple(out.shape) == (1, 8, 12, 2048)  # output stride 8
    conv = resnet50.get_layer
    assert conv("stack1_block0_2_conv").strides == (2, 2)  # third stage keeps its stride
    assert conv("stack2_block0_2_conv").strides == (1, 1) and conv("stack2_block0_2_conv").dilation_rate == (1, 1)
    assert conv("stack2_block0_0_conv").strides == (1, 1)
    assert all(conv(f"stack2_block{b}_2_conv").dilation_rate == (2, 2) for b in range(1, 6))
    assert conv("stack3_block0_2_conv").dilation_rate == (2, 2)
    assert all(conv(f"stack3_block{b}_2_conv").dilation_rate == (4, 4) for b in (1, 2))


def test_dilated_equals_dense_strided_resnet():
    """In inference mode the dilated network is the stride-32 ResNet evaluated densely (à trous)."""
    import keras_hub

    dilated = build_backbone("tiny", output_stride=8)
    plain = keras_hub.models.ResNetBackbone(**resnet_config("tiny"))
    plain.set_weights(dilated.get_weights())
    x = np.random.default_rng(0).random((2, 64, 64, 3), dtype=np.float32)
    dense = keras.ops.convert_to_numpy(dilated(x, training=False))
    strided = keras.ops.convert_to_numpy(plain(x, training=False))
    assert dense.shape == (2, 8, 8, 256) and strided.shape == (2, 2, 2, 256)
    np.testing.assert_allclose(dense[:, ::4, ::4], strided, atol=1e-5)
    assert np.abs(dense[:, 1::4, 1::4] - strided).max() > 1e-3  # the in-between positions are new


def test_deeplab_head_size_and_output():
    with shapes_only():
        head = DeepLabHead(13, channels=256, name="paper_head")
        head.build((None, None, None, 2048))
    assert count(head.trainable_variables) == deeplab_head(2048, 256, 13)  # 16,128,781
    small = DeepLabHead(3, channels=8, upsample=8, normalize=True)
    y = keras.ops.convert_to_numpy(small(np.random.default_rng(1).random((2, 3, 5, 24), dtype=np.float32)))
    assert count(small.trainable_variables) == deeplab_head(24, 8, 3)
    assert y.shape == (2, 24, 40, 3)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), 1.0, atol=1e-5)
    conv = ConvHead(13, channels=8)
    conv.build((None, None, None, 8))
    assert count(conv.trainable_variables) == 9 * 8 * 8 + 8 + 8 * 13 + 13


def test_hps_model_split():
    with shapes_only():
        model = build_scene_model(NYU_TASKS, arch="hps", backbone="tiny", head_channels=8)
        out = model(keras.KerasTensor((2, 32, 40, 3)))
    assert {t: tuple(v.shape) for t, v in out.items()} == {
        "segmentation": (2, 32, 40, 13), "depth": (2, 32, 40, 1), "normal": (2, 32, 40, 3)}
    assert ids(model.shared_variables()) == ids(model.encoder.trainable_variables)
    for task, k in NYU_TASKS.items():
        assert count(model.task_variables()[task]) == deeplab_head(256, 8, k)


def test_mtan_model_split():
    with shapes_only():
        model = build_scene_model(NYU_TASKS, arch="mtan", backbone="tiny", head_channels=8)
        out = model(keras.KerasTensor((1, 32, 32, 3)))
    assert {t: tuple(v.shape) for t, v in out.items()} == {
        "segmentation": (1, 32, 32, 13), "depth": (1, 32, 32, 1), "normal": (1, 32, 32, 3)}
    encoder = model.encoder
    # tiny ResNet: stem 64 channels, 4 one-block bottleneck stages of 4 x 64 channels; attention mid = 64
    per_task = attention(64, 64, 256) + 3 * attention(256 + 256, 64, 256)
    shared = ids(model.shared_variables())
    for task, k in NYU_TASKS.items():
        own = model.task_variables()[task]
        attention_vars = [v for i in range(4) for v in encoder.get_layer(f"{task}_attention_{i}").trainable_variables]
        assert count(attention_vars) == per_task
        assert count(own) == per_task + deeplab_head(256, 8, k)
        assert not ids(own) & shared
    block_att = [v for i in range(3) for v in encoder.get_layer(f"block_att_{i}").trainable_variables]
    bottleneck = 256 * 256 + 2 * 256 + 256 * 64 + 2 * 64 + 9 * 64 * 64 + 2 * 64 + 64 * 256 + 2 * 256
    assert count(block_att) == 3 * bottleneck and ids(block_att) <= shared
    all_encoder = ids(encoder.trainable_variables)
    task_owned = set().union(*(ids(model.task_variables()[t]) for t in NYU_TASKS))
    assert shared == all_encoder - task_owned


def test_cross_stitch_split_and_wiring():
    tasks = ["segmentation", "depth"]
    columns = {}

    def make_backbone(name):
        columns[name] = build_backbone("tiny", name=name)
        return columns[name]

    # With identity cross-stitch units every task's features are its own column's output.
    encoder = build_cross_stitch_encoder(tasks, make_backbone, self_weight=1.0, other_weight=0.0)
    x = np.random.default_rng(2).random((1, 32, 32, 3), dtype=np.float32)
    features = encoder(x, training=False)
    for task in tasks:
        np.testing.assert_allclose(keras.ops.convert_to_numpy(features[task]),
                                   keras.ops.convert_to_numpy(columns[f"{task}_resnet"](x, training=False)),
                                   atol=1e-5)
    with shapes_only():
        model = build_scene_model({"segmentation": 7, "depth": 1}, arch="cross_stitch", backbone="tiny",
                                  head_channels=8)
        model.build((None, 32, 32, 3))
    shared = model.shared_variables()
    assert count(shared) == 3 * 2 * 2  # three 2 x 2 cross-stitch matrices
    assert {v.path.split("/")[0] for v in shared} == {"cross_stitch_0", "cross_stitch_1", "cross_stitch_2"}
    column = count(columns["segmentation_resnet"].trainable_variables)
    for task, k in (("segmentation", 7), ("depth", 1)):
        assert count(model.task_variables()[task]) == column + deeplab_head(256, 8, k)
    assert not ids(model.task_variables()["segmentation"]) & ids(model.task_variables()["depth"])


def test_cross_stitch_unit_mixes_linearly():
    unit = CrossStitch(3)
    xs = [np.full((1, 2, 2, 1), v, np.float32) for v in (1.0, 10.0, 100.0)]
    out = unit(xs)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(unit.alpha), np.ones((3, 3)))  # reference init
    assert all(np.allclose(keras.ops.convert_to_numpy(o), 111.0) for o in out)
    alpha = np.array([[0.9, 0.1, 0.0], [0.0, 0.5, 0.5], [1.0, 2.0, 3.0]], np.float32)
    unit.alpha.assign(alpha)
    out = [float(keras.ops.convert_to_numpy(o)[0, 0, 0, 0]) for o in unit(xs)]
    np.testing.assert_allclose(out, alpha @ np.array([1.0, 10.0, 100.0]), rtol=1e-6)


def test_max_pool_with_argmax_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    x = rng.integers(0, 3, (2, 4, 6, 5)).astype(np.float32)  # many ties
    pooled, argmax = MaxPoolWithArgmax()(x)
    restored = keras.ops.convert_to_numpy(MaxUnpool()([pooled, argmax]))
    t_pooled, t_indices = torch.nn.functional.max_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), 2,
                                                         return_indices=True)
    t_restored = torch.nn.functional.max_unpool2d(t_pooled, t_indices, 2)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(pooled), t_pooled.permute(0, 2, 3, 1).numpy())
    np.testing.assert_array_equal(restored, t_restored.permute(0, 2, 3, 1).numpy())


def test_segnet_size_and_split():
    w = 64  # the paper's widths (shapes only, no initialisation)
    f = [w, 2 * w, 4 * w, 8 * w, 8 * w]
    with shapes_only():
        plain = build_segnet_encoder(["segmentation"], width=w, attention=False)

    def c(cin, cout):
        return conv_bn(cin, cout, 3)

    encoder = c(3, f[0]) + c(f[0], f[0]) + c(f[0], f[1]) + c(f[1], f[1])
    encoder += sum(c(f[i - 1], f[i]) + 2 * c(f[i], f[i]) for i in (2, 3, 4))
    decoder = c(f[0], f[0]) + c(f[0], f[0]) + c(f[1], f[0]) + c(f[0], f[0])
    decoder += sum(c(f[i], f[i - 1]) + 2 * c(f[i - 1], f[i - 1]) for i in (2, 3, 4))
    assert count(plain.trainable_variables) == encoder + decoder

    with shapes_only():
        model = build_scene_model(NYU_TASKS, arch="segnet", segnet_width=w)
        out = model(keras.KerasTensor((1, 32, 64, 3)))
    assert {t: tuple(v.shape) for t, v in out.items()} == {
        "segmentation": (1, 32, 64, 13), "depth": (1, 32, 64, 1), "normal": (1, 32, 64, 3)}
    per_task = attention(f[0], f[0], f[0]) + sum(attention(2 * f[j], f[j], f[j]) for j in range(1, 5))
    per_task += attention(2 * f[0], f[0], f[0]) + sum(attention(f[k] + f[k - 1], f[k - 1], f[k - 1])
                                                      for k in range(1, 5))
    shared_att = c(f[0], f[1]) + c(f[1], f[2]) + c(f[2], f[3]) + c(f[3], f[4]) + c(f[4], f[4])
    shared_att += c(f[0], f[0]) + c(f[1], f[0]) + c(f[2], f[1]) + c(f[3], f[2]) + c(f[4], f[4])
    assert count(model.shared_variables()) == encoder + decoder + shared_att
    for task, k in NYU_TASKS.items():
        head = 9 * w * w + w + w * k + k
        assert count(model.task_variables()[task]) == per_task + head
    # 44.23 M in all, the size usually quoted for MTAN's SegNet on NYUv2
    assert count(model.trainable_variables) == 44_229_073
