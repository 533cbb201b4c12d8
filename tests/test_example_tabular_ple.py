"""examples/tabular_ple.py in its reduced mode: PLE + DB-MTL + TaskBalanceMonitor, figures written."""

import os

import numpy as np
import pytest

from tests.examples import load_example

pytest.importorskip("matplotlib")


def test_quick_run_writes_the_figures(tmp_path):
    example = load_example("tabular_ple")
    x, y = example.make_data(4096, seed=1)
    # the two targets' losses differ by about 1e5 at the start (MSE of dollars vs. a cross-entropy)
    assert 200.0 < float(np.std(y["spend"])) < 500.0 and 0.2 < float(np.mean(y["churn"])) < 0.6
    result = example.main(["--quick", "--out", str(tmp_path)])
    history = result["history"]
    assert len(history["cosine_spend_churn"]) == 2 and -1.0 <= history["cosine_spend_churn"][-1] <= 1.0
    assert all(np.isfinite(history["loss"]))
    assert sorted(result["figures"]) == ["cosine_heatmap", "gradient_norms", "learning_curves", "task_weights"]
    for path in result["figures"].values():
        assert os.path.getsize(path) > 1000 and path.startswith(str(tmp_path))
