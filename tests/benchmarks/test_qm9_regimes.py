"""benchmarks/qm9_regimes.py: per-target MTL / STL MAE ratios, their Δp, and the paper's Table 3 rows."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import qm9_regimes  # noqa: E402

from applications.qm9 import report  # noqa: E402

TARGETS = qm9_regimes.TARGETS


def test_ratios_and_delta_p_against_a_hand_computed_regime(tmp_path):
    stl = {t: 2.0 for t in TARGETS}
    stl["r2"] = 1e-4                       # targets on scales 10^4 apart
    (tmp_path / "stl.json").write_text(json.dumps({"test": stl, "val": stl}))
    for seed, factor in enumerate((1.5, 2.5)):
        maes = {t: 2.0 for t in TARGETS}
        maes["r2"] = 1e-4 * factor          # worse than STL on r2 only
        run = dict(balancer="ew", seed=seed, delta_p=0.0, best_epoch=1, test_mae=maes, history={})
        (tmp_path / f"run_ew_seed{seed}.json").write_text(json.dumps(run))
    rows, _ = qm9_regimes.regime_rows("toy", str(tmp_path), str(tmp_path / "stl.json"), ["ew", "dbmtl"])
    (label, seeds, mean, (dp, sd)), = rows   # dbmtl has no runs: no row
    assert (label, seeds) == ("toy ew", 2)
    assert mean["r2"] == pytest.approx(2.0) and mean["mu"] == pytest.approx(1.0)
    # Δp per seed = -100 * (0.5 / 11), -100 * (1.5 / 11); mean -100/11, sample std of the two
    assert dp == pytest.approx(-100.0 / 11)
    assert sd == pytest.approx((100.0 / 11) * 2 ** 0.5 / 2)


def test_paper_rows_give_table_3s_delta_p():
    paper = qm9_regimes.paper_rows()   # the copy kept in the repository: tests/data/paper_tables/qm9_table3.csv
    assert set(paper) == {"STL", "EW", "DB-MTL", "Nash-MTL", "MGDA", "PCGrad"}
    # Table 3's Δp, recomputed from its own rounded MAEs (its printed value: EW -146.3, DB-MTL -58.10)
    ew = report.delta_p_of_maes(paper["EW"], paper["STL"])
    db = report.delta_p_of_maes(paper["DB-MTL"], paper["STL"])
    assert ew == pytest.approx(-146.3, abs=0.5) and db == pytest.approx(-58.1, abs=0.5)
    assert paper["EW"]["r2"] / paper["STL"]["r2"] == pytest.approx(4.655 / 0.529)
