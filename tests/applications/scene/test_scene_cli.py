"""NYUv2 / Cityscapes command line on the shared runner: checks before training, and the tf.data loader's
bad-file errors arrive as the loader's own `DataError`."""

import os

import numpy as np
import pytest

from applications.common import DataError
from applications.cityscapes import CITYSCAPES
from applications.nyuv2 import NYUV2
from applications.scene import cli, train
from applications.scene.data import write_samples


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("training started before the arguments were checked")

    monkeypatch.setattr(train, "run", refuse)


@pytest.mark.parametrize("extra, needle", [
    (["--balancer", "ew", "dbmtll"], "unknown ['dbmtll']"),
    (["--seeds", "-1"], "--seeds -1"),
    (["--balancer-args", "beta=0.5", "--balancer", "ew", "dbmtl"], "name one"),
    (["--tasks", "segmentation,depht"], "unknown ['depht']"),
])
def test_bad_arguments_stop_before_training(no_training, tmp_path, extra, needle):
    with pytest.raises(SystemExit) as stop:
        cli.main(NYUV2, ["--data-root", str(tmp_path / "d"), "--out", str(tmp_path / "o")] + extra)
    assert needle in str(stop.value.code)


def test_unwritable_out_stops_before_training(no_training, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as stop:
        cli.main(NYUV2, ["--data-root", str(tmp_path / "d"), "--out", str(tmp_path / "file" / "out")])
    assert "cannot be written" in str(stop.value.code) and str(tmp_path / "file" / "out") in str(stop.value.code)


def test_tf_loader_bad_file_raises_the_data_error(tmp_path):
    pytest.importorskip("tensorflow")
    root = write_samples(str(tmp_path / "city"), num_train=4, num_val=2, image_size=(32, 64), num_classes=7,
                         normals=False, seed=0)
    bad = os.path.join(root, "train", "depth", "3.npy")
    with open(bad, "wb") as f:
        f.write(b"\x93NUMPY not really")  # a truncated / corrupt .npy
    with pytest.raises(DataError) as err:
        train.train_scene(root, {"segmentation": 7, "depth": 1}, balancer="ew", epochs=1, batch_size=2,
                          backbone="tiny", weights=None, head_channels=8, loader="tf", seed=0, verbose=0)
    assert bad in str(err.value)
    # Chained to TensorFlow's error (as the cause, or as the context where torch's DataLoader re-raises it).
    assert (err.value.__cause__ or err.value.__context__) is not None


@pytest.mark.skipif(__import__("keras").backend.backend() != "jax", reason="one backend covers the runner path")
def test_two_seeds_write_each_run_and_a_table(tmp_path):
    root, out = str(tmp_path / "city"), str(tmp_path / "results")
    summary = cli.main(CITYSCAPES, [
        "--data-root", root, "--write-samples", "4", "--image-size", "32", "64", "--balancer", "ew",
        "--seeds", "0", "1", "--backbone", "tiny", "--weights", "none", "--head-channels", "8", "--epochs", "1",
        "--batch-size", "2", "--out", out, "--verbose", "0"])
    runs = summary["experiment"]["runs"]["ew"]
    assert [r["seed"] for r in runs] == [0, 1]
    for seed in (0, 1):
        assert os.path.exists(os.path.join(out, f"run_ew_seed{seed}.json"))
    table = open(os.path.join(out, "experiment.md")).read()
    dps = [r["delta_p"] for r in runs]
    assert f"| ew | 2 | {np.mean(dps):+.2f} ± {np.std(dps):.2f} |" in table

