import json
import os

import numpy as np
import pytest

from keras_dbmtl import plotting

pytest.importorskip("matplotlib")

HISTORY = {
    "loss": [3.0, 2.0, 1.5], "a_loss": [2.0, 1.0, 0.5], "b_loss": [1e-3, 5e-4, 4e-4],
    "val_a_loss": [2.2, 1.3, 0.9], "a_weight": [1.0, 1.0, 1.0], "b_weight": [40.0, 35.0, 30.0],
    "a_gradient_norm": [3.0, 2.0, 1.0], "b_gradient_norm": [0.01, 0.02, 0.03],
    "cosine_a_b": [0.5, -0.2, -0.4], "conflicting_pairs": [0.0, 1.0, 1.0],
}


def _is_png(path):
    with open(path, "rb") as handle:
        return handle.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 1000


def test_all_figures_from_a_history_dict(tmp_path):
    paths = plotting.plot_task_balance(HISTORY, str(tmp_path))
    assert sorted(paths) == ["cosine_heatmap", "gradient_norms", "learning_curves", "task_weights"]
    assert all(_is_png(p) for p in paths.values())


def test_reads_the_applications_results_json(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"runs": [{"seed": 0, "history": {**HISTORY, "note": ["x"]}}]}))
    history = plotting.load_history(str(path))
    assert plotting.task_names(history) == ["a", "b"] and "note" not in history
    tasks, matrix = plotting.cosine_matrix(history, epoch=1)
    np.testing.assert_allclose(matrix, [[1.0, -0.2], [-0.2, 1.0]])
    assert _is_png(plotting.plot_gradient_norms(str(path), str(tmp_path / "norms.png")))


def test_missing_cosines_say_how_to_get_them(tmp_path):
    history = {k: v for k, v in HISTORY.items() if not k.startswith("cosine")}
    with pytest.raises(ValueError, match="TaskBalanceMonitor"):
        plotting.plot_cosine_heatmap(history, str(tmp_path / "c.png"))
    assert "cosine_heatmap" not in plotting.plot_task_balance(history, str(tmp_path))
