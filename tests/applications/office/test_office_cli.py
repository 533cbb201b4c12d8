"""The Office command line on the shared runner: checks before training, a grid chosen on validation Δp."""

import json

import keras
import numpy as np
import pytest

from applications.office import __main__ as cli
from applications.office import data, train


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("office_cli"))
    return data.write_synthetic(root, "office31", per_class=5, image_size=32, num_classes=3)


BASE = ["--dataset", "office31", "--domains", "amazon,dslr", "--epochs", "1", "--batch-size", "4",
        "--image-size", "32", "--backbone", "small", "--hidden-dim", "8", "--max-samples", "8", "--verbose", "0"]


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("training started before the arguments were checked")

    monkeypatch.setattr(train, "run", refuse)


@pytest.mark.parametrize("extra, needle", [
    (["--balancer", "ew", "dbmtll"], "unknown ['dbmtll']"),
    (["--seeds", "-1"], "--seeds -1"),
    (["--grid", "dbmtl:beta=0.1|"], "an empty value"),
    (["--dataset", "office-99"], "Unknown Office dataset"),
])
def test_bad_arguments_stop_before_training(no_training, synthetic, tmp_path, extra, needle):
    with pytest.raises(SystemExit) as stop:
        cli.main(BASE + ["--data-root", synthetic, "--out", str(tmp_path)] + extra)
    assert needle in str(stop.value.code)


def test_unwritable_out_stops_before_training(no_training, synthetic, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as stop:
        cli.main(BASE + ["--data-root", synthetic, "--out", str(tmp_path / "file" / "out")])
    assert "cannot be written" in str(stop.value.code)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="one backend covers the runner path")
def test_grid_is_chosen_on_validation_delta_p(synthetic, tmp_path):
    summary = cli.main(BASE + ["--data-root", synthetic, "--out", str(tmp_path), "--balancer", "dwa",
                               "--grid", "dwa:temperature=1|4"])
    grid = json.loads((tmp_path / "grid_dwa.json").read_text())
    runs = {t: json.loads((tmp_path / f"run_dwa_temperature{t}_seed0.json").read_text()) for t in (1, 4)}
    for run in runs.values():
        # validation Δp against the paper's STL row (no STL trained), recomputed from the validation accuracies
        stl = train.PAPER_STL["office31"]
        expected = 100 * np.mean([(run["val"][d] - stl[d]) / stl[d] for d in ("amazon", "dslr")])
        assert run["val_delta_p"] == pytest.approx(expected, rel=1e-9)
    best = max(runs, key=lambda t: runs[t]["val_delta_p"])
    assert grid["winner"]["kwargs"] == {"temperature": best}
    assert (tmp_path / "office31_dwa_jax_dwa_temperature4_seed0.json").exists()
    assert set(summary["experiment"]["runs"]) == {"dwa[temperature=1]", "dwa[temperature=4]"}
