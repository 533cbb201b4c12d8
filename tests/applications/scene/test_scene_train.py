"""Training on written samples: the Cityscapes command end to end; STL metric keys on tf.data; epoch selection."""

import json
import math
import os

import keras
import numpy as np
import pytest

from applications.cityscapes import CITYSCAPES
from applications.scene import cli
from applications.scene.data import make_tf_dataset, write_samples
from applications.scene.models import build_scene_model
from applications.scene.train import metric_keys, select_epoch, task_losses, task_metrics

# The paper's Table 2 STL row (tests/data/paper_tables/cityscapes_table2.csv), the Δp baseline when no STL is trained.
PAPER_STL = {"seg_mIoU": 69.06, "seg_PAcc": 91.54, "depth_AErr": 0.01282, "depth_RErr": 43.53}
HIGHER_IS_BETTER = {"seg_mIoU": True, "seg_PAcc": True, "depth_AErr": False, "depth_RErr": False}


def test_cityscapes_command_end_to_end(tmp_path):
    root, out = str(tmp_path / "city"), str(tmp_path / "results")
    summary = cli.main(CITYSCAPES, [
        "--data-root", root, "--write-samples", "4", "--image-size", "32", "64",
        "--backend", keras.backend.backend(), "--balancer", "dbmtl", "--backbone", "tiny", "--weights", "none",
        "--head-channels", "8", "--epochs", "2", "--lr-decay-epoch", "1", "--batch-size", "2", "--out", out,
        "--tag", "run", "--verbose", "0"])
    assert sorted(os.listdir(os.path.join(root, "train"))) == ["depth", "image", "label"]
    table = summary["table"]
    assert set(table) == set(PAPER_STL) | {"delta_p"}
    assert 0 <= table["seg_mIoU"] <= 100 and 0 <= table["seg_PAcc"] <= 100
    assert table["depth_AErr"] > 0 and table["depth_RErr"] > 0
    # Δp (Eq. 3) recomputed here: per task the mean signed relative change, then the mean over the two tasks
    change = {k: (1 if HIGHER_IS_BETTER[k] else -1) * (table[k] - v) / v for k, v in PAPER_STL.items()}
    segmentation = (change["seg_mIoU"] + change["seg_PAcc"]) / 2
    depth = (change["depth_AErr"] + change["depth_RErr"]) / 2
    expected = 100 * (segmentation + depth) / 2
    assert math.isclose(table["delta_p"], expected, rel_tol=1e-9)
    history = summary["history"]
    for key in ("segmentation_loss", "depth_loss", "segmentation_weight", "depth_weight",
                "val_segmentation_miou", "val_depth_rel_err"):
        assert len(history[key]) == 2 and all(np.isfinite(history[key])), key
    assert summary["selected_epoch"] in (1, 2)
    assert table["depth_AErr"] == history["val_depth_abs_err"][summary["selected_epoch"] - 1]
    # the learning rate was halved after epoch 1 (2 steps per epoch), and weight decay is on every variable
    model = summary["model"]
    assert int(model.optimizer.iterations) == 4
    assert math.isclose(float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)), 5e-5, rel_tol=1e-6)
    assert len(model.losses) == len(model.trainable_variables)
    with open(os.path.join(out, "run.json"), encoding="utf-8") as handle:
        saved = json.load(handle)
    assert saved["table"] == table and saved["stl"]["source"].startswith("the paper")
    with open(os.path.join(out, "run.md"), encoding="utf-8") as handle:
        markdown = handle.read()
    assert "| method | seg_mIoU | seg_PAcc | depth_AErr | depth_RErr | delta_p |" in markdown


def test_single_task_metrics_on_tf_data(tmp_path):
    """A single-task (STL) model logs its metrics under the same `<task>_<metric>` keys, fed by tf.data."""
    pytest.importorskip("tensorflow")
    root = write_samples(str(tmp_path / "nyu"), num_train=2, num_val=3, image_size=(32, 32), num_classes=13)
    tasks = {"normal": 3}
    model = build_scene_model(tasks, arch="hps", backbone="tiny", head_channels=8)
    model.compile(optimizer="adam", loss=task_losses(tasks), metrics=task_metrics(tasks), balancer="ew")
    results = model.evaluate(make_tf_dataset(root, "test", tasks=tasks, batch_size=2), return_dict=True, verbose=0)
    keys = metric_keys(tasks)["normal"]
    assert keys == ["normal_angle_mean", "normal_angle_median", "normal_within_11_25", "normal_within_22_5",
                    "normal_within_30"]
    assert set(keys) <= set(results)
    assert 0 < results["normal_angle_mean"] < 180 and 0 < results["normal_angle_median"] < 180
    assert 0 <= results["normal_within_11_25"] <= results["normal_within_22_5"] <= results["normal_within_30"] <= 100


def test_epoch_selection_follows_the_reference():
    """"best": the epoch whose test Δp over the first evaluated epoch is largest; "last": the last evaluated.
    Indices are 0-based; the comments count epochs from 1."""
    tasks = {"segmentation": 7, "depth": 1}
    history = {"val_segmentation_miou": [None, 10.0, None, 12.0, 11.0],
               "val_segmentation_pixel_acc": [None, 50.0, None, 50.0, 60.0],
               "val_depth_abs_err": [None, 1.0, None, 1.0, 0.5],
               "val_depth_rel_err": [None, 1.0, None, 1.5, 1.0]}
    # epoch 4: (+20% + 0) / 2 and (0 - 50%) / 2 -> -7.5%; epoch 5: (+10% + 20%) / 2 and (+50% + 0) / 2 -> +20%
    assert select_epoch(history, tasks, "best") == 4
    assert select_epoch(history, tasks, "last") == 4
    history["val_depth_rel_err"][4] = 3.0  # epoch 5 now -> (15% + (50% - 200%) / 2) / 2 < 0
    assert select_epoch(history, tasks, "best") == 1
