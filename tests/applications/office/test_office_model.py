"""The Table 4 model pieces: ResNet-18 encoder, heads, weight decay."""

import keras
import numpy as np

from applications.office import model as office_model


def test_resnet18_backbone_matches_the_preset_size():
    # keras_hub's resnet_18_imagenet preset lists 11,186,112 parameters; the config here must build
    # the same network without a download.
    net = office_model.build_backbone("resnet18", image_size=64)
    assert net.count_params() == 11_186_112
    assert tuple(net.output.shape) == (None, 2, 2, 512)  # stride 32


def test_encoder_and_heads():
    enc = office_model.build_encoder("small", image_size=32, hidden_dim=16, seed=1)
    names = [layer.name for layer in enc.layers]
    assert names[-5:] == ["avgpool", "hidden", "hidden_bn", "hidden_relu", "hidden_dropout"]
    hidden = enc.get_layer("hidden")
    assert hidden.units == 16
    np.testing.assert_allclose(keras.ops.convert_to_numpy(hidden.bias), 0.1)
    assert np.std(keras.ops.convert_to_numpy(hidden.kernel)) < 0.01  # N(0, 0.005)
    assert enc.get_layer("hidden_dropout").rate == 0.5
    x = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype("float32")
    out = keras.ops.convert_to_numpy(enc(x, training=False))
    assert out.shape == (3, 16) and (out >= 0).all()  # after ReLU
    heads = office_model.build_heads(["Art", "Clipart"], 65)
    assert set(heads) == {"Art", "Clipart"}
    logits = heads["Art"](out)
    assert tuple(logits.shape) == (3, 65)
    limit = 1.0 / np.sqrt(16)  # torch Linear default init bound
    assert np.abs(keras.ops.convert_to_numpy(heads["Art"].kernel)).max() <= limit + 1e-6


def test_weight_decay_is_coupled_l2_on_every_trainable_variable():
    layer = keras.layers.Dense(3)
    layer.build((None, 4))
    office_model.add_weight_decay([layer], 1e-2)
    w = [keras.ops.convert_to_numpy(v) for v in layer.trainable_variables]
    expected = 0.5 * 1e-2 * sum(float((v.astype(np.float64) ** 2).sum()) for v in w)
    got = sum(float(keras.ops.convert_to_numpy(l)) for l in layer.losses)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_backbone_weights_from_a_local_preset_dir(tmp_path):
    net = office_model.build_backbone("small")
    net.save_to_preset(str(tmp_path / "preset"))
    loaded = office_model.build_encoder(weights=str(tmp_path / "preset"), image_size=32)
    for a, b in zip(net.weights, loaded.get_layer(net.name).weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))


def test_unavailable_weights_give_a_clear_error(tmp_path):
    import pytest

    with pytest.raises(RuntimeError, match="--weights none"):
        office_model.build_backbone(weights=str(tmp_path / "no_such_preset"))
