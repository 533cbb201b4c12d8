"""Multi-input training: a float64 numpy reference step, and short fits of the Office model."""

import json
import os

import keras
import numpy as np
import pytest

from applications.office import data, train
from keras_dbmtl import MultiTaskModel


def _numpy_ew_sgd(params, batches, lr):
    """float64 reference: linear encoder x @ We + be shared, linear head per task, MSE per task on
    the task's own batch; EW sums the task losses, SGD."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    for step in batches:
        grads = {k: np.zeros_like(v) for k, v in p.items()}
        for t, (x, y) in step.items():
            x, y = x.astype(np.float64), y.astype(np.float64)
            h = x @ p["We"] + p["be"]
            out = h @ p[f"W{t}"] + p[f"b{t}"]
            dout = 2.0 * (out - y) / out.size
            grads[f"W{t}"] += h.T @ dout
            grads[f"b{t}"] += dout.sum(0)
            dh = dout @ p[f"W{t}"].T
            grads["We"] += x.T @ dh
            grads["be"] += dh.sum(0)
        p = {k: v - lr * grads[k] for k, v in p.items()}
    return p


def test_per_task_inputs_step_matches_numpy():
    rng = np.random.default_rng(0)
    f32 = lambda *s: rng.normal(size=s).astype("float32")  # noqa: E731
    encoder = keras.layers.Dense(2, name="enc")
    heads = {"a": keras.layers.Dense(2, name="ha"), "b": keras.layers.Dense(2, name="hb")}
    model = MultiTaskModel(encoder=encoder, heads=heads, per_task_inputs=True)
    # task batches of different sizes: a has 4 samples a step, b has 6
    a_batches = [(f32(4, 3), f32(4, 2)), (f32(4, 3), f32(4, 2))]
    b_batches = [(5.0 * f32(6, 3), f32(6, 2))]  # one batch: cycled by cycle_zip
    model({"a": a_batches[0][0], "b": b_batches[0][0]})
    params = {"We": f32(3, 2), "be": f32(2), "Wa": f32(2, 2), "ba": f32(2), "Wb": f32(2, 2), "bb": f32(2)}
    encoder.set_weights([params["We"], params["be"]])
    heads["a"].set_weights([params["Wa"], params["ba"]])
    heads["b"].set_weights([params["Wb"], params["bb"]])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", balancer="ew")

    gen, steps = data.cycle_zip({"a": a_batches, "b": b_batches})
    assert steps == 2
    model.fit(gen, steps_per_epoch=steps, epochs=1, verbose=0)

    ref = _numpy_ew_sgd(params, [{"a": a_batches[0], "b": b_batches[0]},
                                 {"a": a_batches[1], "b": b_batches[0]}], lr=0.1)
    got = {"We": encoder.kernel, "be": encoder.bias, "Wa": heads["a"].kernel,
           "ba": heads["a"].bias, "Wb": heads["b"].kernel, "bb": heads["b"].bias}
    for k, v in got.items():
        np.testing.assert_allclose(keras.ops.convert_to_numpy(v), ref[k], rtol=1e-4, atol=1e-6,
                                   err_msg=k)
    # a reference that fed every task the same batch would differ: each task used its own
    mixed = _numpy_ew_sgd(params, [{"a": a_batches[0], "b": (b_batches[0][0][:4], a_batches[0][1])},
                                   {"a": a_batches[1], "b": (b_batches[0][0][:4], a_batches[1][1])}],
                          lr=0.1)
    assert not np.allclose(mixed["We"], ref["We"], rtol=1e-3)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("office31"))
    # 3 classes x 5 images per domain: 9 train / 3 val / 3 test images per domain
    return data.write_synthetic(root, "office31", per_class=5, image_size=32, num_classes=3)


def test_dbmtl_fit_writes_table4_and_evaluates_with_the_trained_weights(synthetic, tmp_path):
    summary = train.run(synthetic, dataset="office31", balancer="dbmtl", out_dir=str(tmp_path),
                        epochs=2, batch_size=4, image_size=32, backbone="small", hidden_dim=16,
                        select="last", verbose=0)
    with open(tmp_path / f"office31_dbmtl_{keras.backend.backend()}.json") as f:
        saved = json.load(f)
    assert set(saved["table4"]) == {"amazon", "dslr", "webcam", "avg", "delta_p"}
    assert saved["stl"]["source"] == "paper Table 4 STL row"
    accs = [saved["test"][d] for d in ("amazon", "dslr", "webcam")]
    np.testing.assert_allclose(saved["avg"], np.mean(accs), rtol=1e-6)
    stl = train.PAPER_STL["office31"]
    expected_dp = 100 * np.mean([(saved["test"][d] - stl[d]) / stl[d] for d in stl])
    np.testing.assert_allclose(saved["delta_p"], expected_dp, rtol=1e-6)
    assert len(saved["records"]) == 2 and saved["selected_epoch"] == 2
    hist = saved["history"]
    for d in ("amazon", "dslr", "webcam"):
        assert len(hist[f"{d}_loss"]) == 2 and np.isfinite(hist[f"{d}_loss"]).all()
    assert "| DBMTL |" in open(tmp_path / f"office31_dbmtl_{keras.backend.backend()}.md").read()

    # the evaluator's accuracy is the trained model's own, on each domain's test split
    model = summary["model"]
    tests = data.load_office(synthetic, "office31", "test", batch_size=64, image_size=32)
    x = {d: ds[0][0] for d, ds in tests.items()}
    logits = model(x, training=False)
    for d, ds in tests.items():
        acc = 100 * np.mean(np.argmax(keras.ops.convert_to_numpy(logits[d]), -1) == ds.labels)
        np.testing.assert_allclose(saved["test"][d], acc, atol=1e-4)


def test_cli_with_stl_on_two_domains(synthetic, tmp_path):
    from applications.office.__main__ import main

    summary = main(["--dataset", "office-31", "--data-root", synthetic, "--balancer", "ew",
                    "--domains", "amazon,dslr", "--stl", "--epochs", "1", "--batch-size", "4",
                    "--image-size", "32", "--backbone", "small", "--hidden-dim", "8",
                    "--max-samples", "8", "--out", str(tmp_path), "--tag", "run", "--verbose", "0"])
    with open(tmp_path / "run.json") as f:
        saved = json.load(f)
    assert saved["stl"]["source"].startswith("trained")
    assert set(saved["stl"]["test"]) == {"amazon", "dslr"}
    assert set(saved["table4"]) == {"amazon", "dslr", "avg", "delta_p"}
    stl = saved["stl"]["test"]
    if all(stl[d] > 0 for d in stl):
        expected = 100 * np.mean([(saved["test"][d] - stl[d]) / stl[d] for d in stl])
        np.testing.assert_allclose(saved["delta_p"], expected, rtol=1e-6)
    else:  # an STL accuracy of 0: delta_p is undefined
        assert saved["delta_p"] is None
    assert summary["config"]["max_samples"] == 8 and os.path.exists(tmp_path / "run.md")
