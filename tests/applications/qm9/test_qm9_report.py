"""The merge of per-run QM9 files: the table's mean ± sample std, the spread verdict, the figures."""

import json
import math

import numpy as np
import pytest

from applications.qm9 import report

TARGETS = ["mu", "alpha"]


def write_run(folder, balancer, seed, delta_p, maes, epochs=3, cosines=False):
    history = {"val_delta_p": [delta_p - 10.0 + i for i in range(epochs)]}
    run = dict(balancer=balancer, seed=seed, delta_p=delta_p, best_epoch=epochs,
               test_mae=dict(zip(TARGETS, maes)), history=history)
    if cosines:
        history.update({f"{t}_weight": [1.0 + i for i in range(epochs)] for t in TARGETS})
        history.update({f"{t}_gradient_norm": [0.5] * epochs for t in TARGETS})
        history.update(mean_cosine=[0.1 * i for i in range(epochs)], conflicting_pairs=[0.0] * epochs)
        run["cosines"] = [[[1.0, 0.1 * i], [0.1 * i, 1.0]] for i in range(epochs)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"run_{balancer}_seed{seed}.json").write_text(json.dumps(run))


def test_table_and_welch_verdict_from_files_in_sub_folders(tmp_path):
    ew, db = [-10.0, -12.0, -14.0], [-3.0, -4.0, -8.0]
    for seed, (a, b) in enumerate(zip(ew, db)):
        write_run(tmp_path / f"ew_seed{seed}", "ew", seed, a, [1.0 + seed, 2.0])
        write_run(tmp_path / f"dbmtl_seed{seed}", "dbmtl", seed, b, [3.0, 4.0 + seed], cosines=True)
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "curve_mgda_seed0.json").write_text(json.dumps(
        dict(epochs_done=2, history={"val_delta_p": [-50.0, -40.0]})))
    text = report.write(str(tmp_path), "test")
    # ew: mean -12, sample std 2; dbmtl: mean -5, sample std sqrt(7) = 2.6458
    assert "| ew | 3 | -12.00 ± 2.00 | -10.00, -12.00, -14.00 | 3, 3, 3 | 2 | 2 |" in text
    assert "| dbmtl | 3 | -5.00 ± 2.65 |" in text
    t = (-12.0 + 5.0) / math.sqrt(4.0 / 3 + 7.0 / 3)
    assert f"- ew − dbmtl: -7.00 points of Δp; Welch t = {t:.2f} (3 and 3 seeds); the gap is larger than the seed " \
           "spread (largest std 2.65)." in text
    assert "mgda after 2 epochs" in text
    pytest.importorskip("matplotlib")
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert (tmp_path / "diagnostics.png").stat().st_size > 1000 and "diagnostics.png" in text


def test_a_gap_inside_the_spread_is_called_so_and_loss_level_runs_have_no_diagnostics(tmp_path):
    for seed, (a, b) in enumerate(zip([-10.0, -20.0], [-12.0, -16.0])):
        write_run(tmp_path, "ew", seed, a, [1.0, 1.0])
        write_run(tmp_path, "famo", seed, b, [1.0, 1.0])
    methods = report.load(str(tmp_path))
    line = report.difference_lines(methods)[0]
    # ew: -15 ± 7.07, famo: -14 ± 2.83: a 1-point gap is within the spread
    assert line.startswith("- ew − famo: -1.00 points") and "within the seed spread (largest std 7.07)" in line
    assert report.diagnostic_method(methods) is None
    assert report.plot_diagnostics(methods, str(tmp_path / "d.png")) is None
    assert np.isnan(report.mean_std([3.0])[1])


def _stl_doc(seeds, maes, epochs=12):
    runs = [dict(seed=s, task=t, test_mae=maes[(s, t)], val_mae=2 * maes[(s, t)]) for s in seeds for t in TARGETS]
    return dict(command="c", preset="quick", config=dict(epochs=epochs, seeds=list(seeds)), split_seed=0,
                test={}, val={}, runs=runs)


def test_stl_files_of_one_seed_each_merge_into_means_over_all_runs(tmp_path):
    maes = {(0, "mu"): 1.0, (0, "alpha"): 10.0, (1, "mu"): 2.0, (1, "alpha"): 30.0, (2, "mu"): 6.0, (2, "alpha"): 5.0}
    paths = []
    for seed in (0, 1, 2):
        doc = _stl_doc([seed], maes)
        doc["test"] = {t: 0.0 for t in TARGETS}   # a per-file mean that must not leak into the merged one
        paths.append(tmp_path / f"s{seed}.json")
        paths[-1].write_text(json.dumps(doc))
    merged = report.merge_stl([str(p) for p in paths], str(tmp_path / "all.json"))
    assert merged["test"] == {"mu": pytest.approx(3.0), "alpha": pytest.approx(15.0)}
    assert merged["val"] == {"mu": pytest.approx(6.0), "alpha": pytest.approx(30.0)}
    assert merged["seeds"] == [0, 1, 2] and len(merged["runs"]) == 6
    assert json.loads((tmp_path / "all.json").read_text())["test"]["alpha"] == pytest.approx(15.0)
    other = tmp_path / "other.json"
    other.write_text(json.dumps(_stl_doc([3], {(3, t): 1.0 for t in TARGETS}, epochs=20)))
    with pytest.raises(ValueError, match="another configuration"):
        report.merge_stl([str(paths[0]), str(other)], str(tmp_path / "x.json"))
    with pytest.raises(ValueError, match=r"the same \(seed, target\) appears in two files: \(0, 'alpha'\)"):
        report.merge_stl([str(paths[0]), str(paths[0])], str(tmp_path / "x.json"))


def test_rebase_recomputes_test_delta_p_and_flags_runs_whose_epoch_choice_would_change(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path, "ew", seed, -5.0, [1.0, 4.0])
    # run 0: val MAE (mu, alpha) per epoch; epoch 3 is best against any baselines; run 1: epochs 2 and 3 trade mu
    # against alpha, so the choice depends on the baselines' weights 1 / b_t
    curves = {0: ([3.0, 2.0, 1.0], [9.0, 8.0, 7.0]), 1: ([1.0, 2.0, 3.0], [9.0, 6.0, 2.0])}
    for seed, (mu, alpha) in curves.items():
        path = tmp_path / f"run_ew_seed{seed}.json"
        run = json.loads(path.read_text())
        run["history"].update(val_mu_mae=mu, val_alpha_mae=alpha)
        run["best_epoch"] = 3
        run["config"] = dict(schedule="cosine")
        path.write_text(json.dumps(run))
    methods = report.load(str(tmp_path))
    baselines = dict(test={"mu": 2.0, "alpha": 2.0}, val={"mu": 1.0, "alpha": 10.0})
    changed = report.rebase(methods, baselines)
    # test Δp = -100 * ((1 - 2) / 2 + (4 - 2) / 2) / 2 = -25 %
    assert [r["delta_p"] for r in methods["ew"]["runs"]] == [pytest.approx(-25.0)] * 2
    assert [r["delta_p_stored"] for r in methods["ew"]["runs"]] == [-5.0, -5.0]
    # run 1 against val baselines (1, 10): epoch 1: -(0 + -0.1)/2 = +5 %, epoch 2: -(1 + -0.4)/2 = -30 %,
    # epoch 3: -(2 - 0.8)/2 = -60 %: epoch 1 would be chosen
    assert changed == [("ew", 1, 3, 1)]
    # the learning curve the figures draw is rebased too (run 1: +5, -30, -60 %, from the lines above)
    assert methods["ew"]["runs"][1]["history"]["val_delta_p"] == pytest.approx([5.0, -30.0, -60.0])
    with pytest.raises(ValueError, match="schedule 'plateau'"):
        methods["ew"]["runs"][0]["config"]["schedule"] = "plateau"
        report.rebase(methods, baselines)
