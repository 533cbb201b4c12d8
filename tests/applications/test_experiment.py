"""The shared experiment runner: argument checks before any training, grids, per-run files, grid selection."""

import json
import os

import pytest

from applications import experiment
from applications.experiment import ExperimentError, make_plan


def test_paper_grid_is_section_4_1():
    name, points = experiment.parse_grid("dbmtl:paper")
    # {0.1, 0.5, 0.9, 0.1/k^0.5, 0.5/k^0.5, 0.9/k^0.5}: beta_k = beta / k^beta_sigma
    assert name == "dbmtl"
    assert sorted((p["beta"], p["beta_sigma"]) for p in points) == [
        (0.1, 0.0), (0.1, 0.5), (0.5, 0.0), (0.5, 0.5), (0.9, 0.0), (0.9, 0.5)]


def test_any_grid_is_the_cartesian_product():
    name, points = experiment.parse_grid("famo:gamma=0.001|0.01,weight_learning_rate=0.025|0.1,x=a")
    assert name == "famo" and len(points) == 4
    assert {(p["gamma"], p["weight_learning_rate"], p["x"]) for p in points} == {
        (0.001, 0.025, "a"), (0.001, 0.1, "a"), (0.01, 0.025, "a"), (0.01, 0.1, "a")}


@pytest.mark.parametrize("text, needle", [
    ("beta=0.1|0.5", "give the balancer first"),
    ("dbmtl:beta", "not key=value1|value2"),
    ("dbmtl:beta=0.1||0.5", "an empty value"),
    ("dbmtl:", "no key=values"),
    ("famo:paper", "the paper gives a grid for ['dbmtl'] only"),
])
def test_bad_grid_syntax_names_the_mistake(text, needle):
    with pytest.raises(ExperimentError, match="--grid") as err:
        experiment.parse_grid(text)
    assert needle in str(err.value)


def test_plan_settings_balancer_args_and_grid(tmp_path):
    plan = make_plan(["ew", "dbmtl"], ["dbmtl:beta_sigma=0.5", "ew:"], ["dbmtl:beta=0.1|0.9"], [2, 0],
                     str(tmp_path / "out"))
    assert [s.label for s in plan.settings] == [
        "ew", "dbmtl[beta=0.1,beta_sigma=0.5]", "dbmtl[beta=0.9,beta_sigma=0.5]"]
    assert [s.grid for s in plan.settings] == [False, True, True]
    assert plan.seeds == [2, 0] and os.path.isdir(plan.out)
    assert plan.settings[1].file_label == "dbmtl_beta0.1_beta_sigma0.5"
    # each run gets its own balancer object, with the arguments given
    first, second = plan.settings[1].make(), plan.settings[1].make()
    assert first is not second and first.get_config()["beta"] == 0.1 and first.get_config()["beta_sigma"] == 0.5
    single = make_plan(["dbmtl"], ["beta=0.5,beta_sigma=0.5"], [], [0], str(tmp_path / "o2"))
    assert single.settings[0].kwargs == {"beta": 0.5, "beta_sigma": 0.5}


@pytest.mark.parametrize("kwargs, needle", [
    (dict(balancers=["ew", "dbmtll"]), "unknown ['dbmtll']"),
    (dict(balancers=["ew", "dbmtl"], balancer_args=["beta=0.5"]), "name one, e.g. dbmtl:beta=0.5"),
    (dict(balancers=["dbmtl"], balancer_args=["dbmtl:beta=2"]), "beta must be a number in [0, 1); received beta=2"),
    (dict(balancers=["dbmtl"], balancer_args=["dbmtl:bogus=1"]), "bogus"),
    (dict(balancers=["dbmtl"], balancer_args=["dbmtl:beta"]), "key=value"),
    (dict(balancers=["ew"], grids=["dbmtl:beta=0.5|1.5"]), "dbmtl[beta=1.5]"),
    (dict(balancers=["ew"], grids=["dbmtx:beta=1"]), "unknown balancer 'dbmtx'"),
    (dict(balancers=["ew"], seeds=[-1]), "--seeds -1"),
    (dict(balancers=["ew"], seeds=[0, 0]), "repeated"),
    (dict(balancers=["ew"], seeds=[]), "at least one seed"),
])
def test_every_argument_is_checked_before_training(tmp_path, kwargs, needle):
    kwargs = dict(dict(balancer_args=[], grids=[], seeds=[0], out=str(tmp_path / "out")), **kwargs)
    with pytest.raises(ExperimentError) as err:
        make_plan(**kwargs)
    assert needle in str(err.value)


def test_unwritable_output_folder_is_refused(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ExperimentError, match="cannot be written") as err:
        make_plan(["ew"], [], [], [0], str(blocker / "results"))
    assert str(blocker / "results") in str(err.value)


def test_runs_are_written_as_they_finish_and_the_grid_is_chosen_on_validation(tmp_path):
    plan = make_plan(["ew"], [], ["dbmtl:beta=0.1|0.5|0.9"], [0, 1], str(tmp_path))
    # validation Δp peaks at beta 0.5, test Δp at beta 0.9: the winner must be chosen on validation
    val = {0.1: -10.0, 0.5: -2.0, 0.9: -6.0}
    test = {0.1: -9.0, 0.5: -5.0, 0.9: -1.0}
    seen = []

    def train_one(setting, seed):
        for label, s in seen:  # every earlier run is on disk already
            assert (tmp_path / f"run_{label}_seed{s}.json").exists()
        seen.append((setting.file_label, seed))
        beta = setting.kwargs.get("beta")
        if beta is None:
            return dict(val_delta_p=-4.0 - seed, delta_p=-3.0 - seed)
        return dict(val_delta_p=val[beta] + seed, delta_p=test[beta] + seed)

    done = experiment.run_plan(plan, train_one, log=lambda m: None, meta=dict(command="x"))
    assert len(seen) == 8
    grid = json.loads((tmp_path / "grid_dbmtl.json").read_text())
    assert grid["winner"]["kwargs"] == {"beta": 0.5}
    assert grid["winner"]["val_delta_p"] == pytest.approx(-1.5)  # mean over seeds 0 and 1
    assert grid["winner"]["delta_p"] == pytest.approx(-4.5)
    assert grid["command"] == "x"
    run = json.loads((tmp_path / "run_dbmtl_beta0.9_seed1.json").read_text())
    assert run["delta_p"] == pytest.approx(0.0)  # test Δp of beta 0.9, seed 1
    assert run["setting"]["kwargs"] == {"beta": 0.9} and run["seed"] == 1
    assert "| dbmtl[beta=0.5] (grid winner) | 2 | -1.50 ± 0.50 | -4.50 ± 0.50 |" in done["table"]
    assert "| ew | 2 | -4.50 ± 0.50 | -3.50 ± 0.50 |" in (tmp_path / "experiment.md").read_text()


def test_a_late_failure_keeps_the_finished_runs(tmp_path):
    plan = make_plan(["ew", "dbmtl"], [], [], [0], str(tmp_path))

    def train_one(setting, seed):
        if setting.balancer == "dbmtl":
            raise RuntimeError("out of memory")
        return dict(val_delta_p=1.0, delta_p=2.0)

    with pytest.raises(RuntimeError):
        experiment.run_plan(plan, train_one, log=lambda m: None)
    assert json.loads((tmp_path / "run_ew_seed0.json").read_text())["delta_p"] == 2.0


def test_compact_progbar_with_40_tasks_keeps_the_keys_in_history(capsys):
    import keras
    import numpy as np

    import keras_dbmtl

    tasks = [f"t{k}" for k in range(40)]
    model = keras_dbmtl.MultiTaskModel(encoder=keras.layers.Dense(4, name="enc"),
                                       heads={t: keras.layers.Dense(1, name=f"h_{t}") for t in tasks})
    model.compile(optimizer="sgd", loss={t: "mse" for t in tasks}, metrics={t: ["mae"] for t in tasks},
                  balancer="ew")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 3)).astype("float32")
    y = {t: rng.normal(size=(16, 1)).astype("float32") for t in tasks}

    def longest_update(callbacks):
        capsys.readouterr()
        history = model.fit(x, y, batch_size=8, epochs=1, verbose=1, callbacks=callbacks)
        text = capsys.readouterr().out
        return max(len(part) for part in text.replace("\r", "\n").split("\n")), history.history

    plain, _ = longest_update([])
    compact, history = longest_update([experiment.compact_progbar(tasks)])
    assert plain > 2000  # Keras' own bar: every task's keys at every update
    assert compact < 200, compact
    assert all(f"{t}_loss" in history and f"{t}_mae" in history for t in tasks)
    assert experiment.per_task_key("val_t3_mae", tasks) and not experiment.per_task_key("val_loss", tasks)
