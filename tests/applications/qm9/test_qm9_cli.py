"""The QM9 command line: every argument checked before the data are read, the runner's grid and per-run files."""

import json

import numpy as np
import pytest

import keras

pytest.importorskip("rdkit")

from applications.qm9 import __main__ as cli  # noqa: E402
from applications.qm9 import data  # noqa: E402

from tests.applications.qm9.qm9_fixtures import write_cli_cache  # noqa: E402


@pytest.fixture
def no_data(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the data were loaded before the arguments were checked")

    monkeypatch.setattr(data, "load_qm9", refuse)


@pytest.mark.parametrize("argv, needle", [
    (["--seeds", "-1"], "--seeds -1"),
    (["--balancer", "ew", "dbmtll"], "unknown ['dbmtll']"),
    (["--balancer-args", "dbmtl:beta=1.5"], "beta must be a number in [0, 1); received beta=1.5"),
    (["--grid", "dbmtl:beta=0.1||0.5"], "an empty value"),
    (["--subset", "10", "5"], "--subset takes"),
    (["--epochs", "0"], "--epochs must be a positive integer"),
    (["--lr", "0"], "--lr must be a positive number, got 0.0"),
    (["--schedule", "step"], "invalid choice: 'step'"),
    (["--task-gradients-every", "0"], "--task-gradients-every must be a positive integer, got 0"),
    (["--task-gradients-every", "5"], "balancer ew: task_gradients='parameters', task_gradients_every=5 change how"),
    (["--balancer", "dbmtl", "--task-gradients", "representation"],
     "balancer dbmtl: task_gradients='representation' is not available for balancer 'dbmtl'"),
])
def test_bad_arguments_fail_before_any_data_or_training(no_data, tmp_path, capsys, argv, needle):
    with pytest.raises(SystemExit) as stop:
        cli.main(argv + ["--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    assert needle in capsys.readouterr().err


def test_unwritable_out_fails_before_the_data(no_data, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit):
        cli.main(["--out", str(tmp_path / "file" / "out")])
    assert "cannot be written" in capsys.readouterr().err


def test_help_names_the_data_source_and_the_default_preset_is_quick(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert "qm9pack==1.0.3" in text and "quick (default)" in text
    assert cli.parser().parse_args([]).preset == "quick"


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="one backend covers the CLI path")
def test_grid_runs_write_their_files_and_the_validation_winner(tmp_path):
    cache = tmp_path / "cache"
    (tmp_path / "csv").mkdir()
    write_cli_cache(tmp_path / "csv", cache)
    out = tmp_path / "out"
    report = cli.main(["--subset", "12", "6", "6", "--epochs", "1", "--dim", "8", "--batch-size", "4",
                       "--balancer", "dwa", "--grid", "dwa:temperature=1|4", "--cache-dir", str(cache),
                       "--out", str(out)])
    grid = json.loads((out / "grid_dwa.json").read_text())
    scores = {tuple(s["kwargs"].items()): s["val_delta_p"] for s in grid["settings"]}
    assert len(scores) == 2 and grid["winner"]["val_delta_p"] == max(scores.values())
    for name in ("run_dwa_temperature1_seed0.json", "run_dwa_temperature4_seed0.json",
                 "curve_dwa_temperature4_seed0.json", "experiment.md", "results.json", "results.md"):
        assert (out / name).exists(), name
    run = json.loads((out / "run_dwa_temperature4_seed0.json").read_text())
    assert run["setting"]["kwargs"] == {"temperature": 4} and np.isfinite(run["delta_p"])
    assert run["val_delta_p"] == pytest.approx(max(run["history"]["val_delta_p"]))
    assert set(report["runs"]) == {"dwa[temperature=1]", "dwa[temperature=4]"}


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="one backend covers the CLI path")
def test_medium_preset_trains_an_amortised_dbmtl_labelled_as_such_and_prepare_data_needs_no_baselines(tmp_path):
    cache = tmp_path / "cache"
    (tmp_path / "csv").mkdir()
    write_cli_cache(tmp_path / "csv", cache)
    common = ["--preset", "medium", "--subset", "12", "6", "6", "--cache-dir", str(cache)]
    # no stl_baselines_medium.json is needed to prepare the data
    prepared = cli.main(common + ["--prepare-data", "--out", str(tmp_path / "prep")])
    assert prepared["n"] == dict(train=12, val=6, test=6)
    baselines = tmp_path / "stl.json"
    baselines.write_text(json.dumps(dict(test={t: 1.0 for t in data.TARGETS}, val=None)))
    out = tmp_path / "out"
    report = cli.main(common + ["--epochs", "2", "--dim", "8", "--batch-size", "4", "--balancer", "dbmtl",
                                "--task-gradients-every", "2", "--seeds", "0", "--baselines", str(baselines),
                                "--out", str(out)])
    # the preset's validated beta is applied and named in the label and the file
    run = json.loads((out / "run_dbmtl-every2_beta0.1_seed0.json").read_text())
    assert run["config"]["schedule"] == "cosine" and run["config"]["task_gradients_every"] == 2
    assert run["setting"]["kwargs"] == {"beta": 0.1}
    assert run["setting"]["label"] == "dbmtl-every2[beta=0.1]" and set(report["runs"]) == {"dbmtl-every2[beta=0.1]"}
    assert len(run["cosines"]) == 2 and len(run["history"]["val_delta_p"]) == 2
    assert "diagnostics.png" in (out / "results.md").read_text()


@pytest.mark.parametrize("argv, preset_args", [
    ([], ["dbmtl:beta=0.1"]),                                            # the quick preset's validated beta
    (["--balancer", "dbmtl", "pcgrad"], ["dbmtl:beta=0.1"]),
    (["--balancer", "ew"], []),                                          # DB-MTL not trained: nothing added
    (["--balancer-args", "dbmtl:beta=0.5"], []),                         # the user's own arguments win
    (["--balancer", "dbmtl", "--balancer-args", "beta_sigma=0.5"], []),  # unnamed, for the only balancer
    (["--grid", "dbmtl:paper"], []),                                     # a grid chooses beta itself
    (["--preset", "paper"], []),                                         # the paper's preset: the defaults
])
def test_the_preset_gives_dbmtl_its_validated_beta_unless_the_command_line_names_its_own(argv, preset_args):
    from applications.qm9 import train

    args = cli.parser().parse_args(argv)
    added = cli.preset_balancer_args(args, train.PRESETS[args.preset])
    assert added[len(args.balancer_args):] == preset_args
    assert added[:len(args.balancer_args)] == args.balancer_args
