"""Every loss and metric inside a plain Keras fit/evaluate, against numpy.

One small keras.Model with dict outputs (segmentation, depth, normals,
classification, regression); jit-compiled on TensorFlow (XLA) and JAX.
"""

import numpy as np

import keras

from keras_dbmtl import losses
from keras_dbmtl import metrics as M

N, H, W, C, K = 8, 4, 5, 4, 5
BATCH = 4  # two equal batches: one compiled shape, metrics accumulate over 2 calls
STD, UNIT = 0.3, 1000.0


def _data():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(N, H, W, 3)).astype("float32")
    seg = rng.integers(0, C - 1, size=(N, H, W))  # class C-1 never labelled
    seg[:, 0, :3] = -1
    depth = rng.uniform(0.5, 3.0, size=(N, H, W, 1)).astype("float32")
    depth[:, -1] = 0.0
    depth[0] = 0.0
    normal = rng.normal(size=(N, H, W, 3))
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    normal[:, :, 0] = 0.0
    y = {"seg": seg.astype("int32"), "depth": depth, "normal": normal.astype("float32"),
         "cls": rng.integers(0, K, size=(N,)).astype("int32"),
         "reg": rng.normal(size=(N, 1)).astype("float32")}
    return x, y


def _model():
    inp = keras.Input((H, W, 3))
    feat = keras.layers.Dense(8, activation="tanh")(inp)
    pooled = keras.layers.GlobalAveragePooling2D()(feat)
    out = {"seg": keras.layers.Dense(C, name="seg")(feat),
           "depth": keras.layers.Dense(1, name="depth")(feat),
           "normal": keras.layers.Dense(3, name="normal")(feat),
           "cls": keras.layers.Dense(K, name="cls")(pooled),
           "reg": keras.layers.Dense(1, name="reg")(pooled)}
    return keras.Model(inp, out)


# ------------------------------------------------------- numpy references
def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def reference(p, y):
    """Metrics over all samples; losses = mean over the batches of each
    batch's valid-pixel mean (what Keras logs for equal-size batches)."""
    out = _reference(p, y)
    halves = [_reference({k: v[i:i + BATCH] for k, v in p.items()},
                         {k: v[i:i + BATCH] for k, v in y.items()}) for i in range(0, N, BATCH)]
    for key in out:
        if key.endswith("_loss"):
            out[key] = np.mean([h[key] for h in halves])
    return out


def _reference(p, y):
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    n = len(y["cls"])
    out = {}
    lab = y["seg"].reshape(-1)
    logit = p["seg"].reshape(-1, C)
    v = lab >= 0
    out["seg_loss"] = -np.mean(np.log(_softmax(logit[v])[np.arange(v.sum()), lab[v]]))
    conf = np.bincount(C * lab[v] + logit[v].argmax(-1), minlength=C * C).reshape(C, C)
    inter, union = np.diag(conf), conf.sum(0) + conf.sum(1) - np.diag(conf)
    out["seg_miou"] = 100 * np.mean(inter[union > 0] / union[union > 0])
    out["seg_pixel_acc"] = 100 * np.trace(conf) / conf.sum()
    g, d = y["depth"].reshape(-1).astype(np.float64), p["depth"].reshape(-1)
    v = g != 0
    out["depth_loss"] = out["depth_abs_err"] = np.abs(d - g)[v].mean()
    out["depth_rel_err"] = (np.abs(d - g)[v] / g[v]).mean()
    g, q = y["normal"].reshape(-1, 3).astype(np.float64), p["normal"].reshape(-1, 3)
    v = (g ** 2).sum(-1) > 0
    cos = (g[v] * q[v]).sum(-1) / np.linalg.norm(q[v], axis=-1)
    out["normal_loss"] = np.mean(1 - cos)
    ang = np.degrees(np.arccos(np.clip(cos, -1, 1)))
    out["normal_angle_mean"] = ang.mean()
    out["normal_angle_median"] = np.median(ang)
    for t, key in ((11.25, "within_11_25"), (22.5, "within_22_5"), (30.0, "within_30")):
        out["normal_" + key] = 100 * np.mean(ang < t)
    out["cls_loss"] = -np.mean(np.log(_softmax(p["cls"])[np.arange(n), y["cls"]]))
    out["cls_accuracy"] = 100 * np.mean(p["cls"].argmax(-1) == y["cls"])
    out["reg_loss"] = np.mean((p["reg"] - y["reg"]) ** 2)
    out["reg_mae"] = UNIT * STD * np.mean(np.abs(p["reg"] - y["reg"]))
    return out


def test_all_losses_and_metrics_in_fit():
    keras.utils.set_random_seed(0)
    x, y = _data()
    model = _model()
    # jit-compiled train/test steps on JAX and TensorFlow (XLA); torch eager.
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss={"seg": losses.SegmentationCrossEntropy(), "depth": losses.DepthL1Loss(),
              "normal": losses.NormalCosineLoss(), "cls": losses.ClassificationCrossEntropy(),
              "reg": losses.MSELoss()},
        metrics={"seg": [M.SegmentationMIoU(C), M.SegmentationPixelAccuracy(C)],
                 "depth": [M.DepthAbsError(), M.DepthRelError()],
                 "normal": [M.NormalAngleMean(), M.NormalAngleMedian(), M.NormalWithinAngle(11.25),
                            M.NormalWithinAngle(22.5), M.NormalWithinAngle(30)],
                 "cls": [M.ClassificationAccuracy()],
                 "reg": [M.DenormalizedMAE(mean=5.0, std=STD, unit_scale=UNIT)]},
        jit_compile=keras.backend.backend() in ("jax", "tensorflow"),
    )
    before = [w.copy() for w in model.get_weights()]
    hist = model.fit(x, y, batch_size=BATCH, epochs=2, validation_data=(x, y), verbose=0).history
    assert all(np.isfinite(v).all() for v in hist.values())
    assert any(not np.allclose(a, b) for a, b in zip(before, model.get_weights()))
    # the validation pass after the last epoch used the final weights
    pred = {k: keras.ops.convert_to_numpy(v) for k, v in model(x, training=False).items()}
    ref = reference(pred, y)
    assert set("val_" + k for k in ref) <= set(hist)
    for key, value in ref.items():
        got = hist["val_" + key][-1]
        if key == "normal_angle_median":  # histogram: within half a bin (+ float32 noise)
            assert abs(got - value) <= 0.0025 + 1e-3, key
        else:
            np.testing.assert_allclose(got, value, rtol=2e-4, atol=2e-4, err_msg=key)
    np.testing.assert_allclose(hist["val_loss"][-1],
                               sum(v for k, v in ref.items() if k.endswith("_loss")), rtol=2e-4)
    # sanity: the pixel-mean-per-batch loss differs from the all-sample pixel mean here
    assert abs(_reference(pred, y)["depth_loss"] - ref["depth_loss"]) > 1e-4
    # evaluate() reuses the compiled test step and gives the same numbers
    ev = model.evaluate(x, y, batch_size=BATCH, verbose=0, return_dict=True)
    for key in ref:
        np.testing.assert_allclose(ev[key], hist["val_" + key][-1], rtol=1e-6, err_msg=key)
