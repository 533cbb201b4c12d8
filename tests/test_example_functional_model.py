"""examples/functional_model.py in its reduced mode: a functional CTR/CVR model trained through from_model."""

import numpy as np

from tests.examples import load_example


def test_quick_run_reads_the_split_from_the_graph_and_trains():
    example = load_example("functional_model")
    x, y = example.make_data(2048, seed=1)
    assert 20.0 < float(np.std(y["dwell"])) < 45.0 and 0.2 < float(np.mean(y["click"])) < 0.8
    result = example.main(["--quick"])
    assert result["split"] == {"shared": ["engagement_tower", "trunk_1", "trunk_2"],
                               "click": ["click", "click_tower"], "convert": ["convert", "convert_tower"],
                               "dwell": ["dwell"]}
    history = result["history"]
    assert all(np.isfinite(history["loss"])) and len(history["loss"]) == 2
    assert all(np.isfinite(history[f"{task}_weight"][-1]) for task in ("click", "convert", "dwell"))
    for task in ("click", "convert"):
        assert 0.0 <= result["results"]["dbmtl"][f"{task}_auc"] <= 1.0
    assert np.isfinite(result["results"]["dbmtl"]["dwell_mae"])
