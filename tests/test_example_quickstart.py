"""examples/quickstart.py, one seed: what the README and the site's landing page claim it shows.

The claim (benchmarks/results/quickstart/<backend>.json holds the 3-seed run): under equal weighting the task
with the small loss is starved (validation MSE / variance near 1, as if predicting its mean) while the large task
is learned; under DB-MTL both tasks are learned. Thresholds sit far from both sides of that gap (the 3-seed
means: EW small ~1.06, DB-MTL small ~0.04, both large tasks < 0.1).
"""

import numpy as np

from tests.examples import load_example


def test_the_two_tasks_losses_differ_by_ten_thousand():
    example = load_example("quickstart")
    _, y = example.make_data(2048, seed=0)
    ratio = np.var(y["large"]) / np.var(y["small"])          # the MSE of predicting the mean, per task
    assert 0.5e4 < ratio < 2e4


def test_equal_weighting_starves_the_small_task_and_dbmtl_does_not(capsys):
    example = load_example("quickstart")
    final = example.main(seeds=(0,))
    ew, dbmtl = final["ew"], final["dbmtl"]
    assert ew["large"][0] < 0.2 and ew["small"][0] > 0.8           # EW: the large task only
    assert dbmtl["large"][0] < 0.3 and dbmtl["small"][0] < 0.3     # DB-MTL: both
    printed = capsys.readouterr().out
    assert "mean ± sample std over seeds" in printed and printed.count("±") == 1 + 4        # the header, 2 methods x 2 tasks
