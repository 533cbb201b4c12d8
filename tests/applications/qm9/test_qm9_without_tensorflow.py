"""QM9 from a cached .npz without TensorFlow, spektral, RDKit or qm9pack (a JAX- or torch-only machine).

The cache is built here with RDKit; then those packages are made unimportable (``sys.modules[name] = None``
in this process, an import hook in a child process) and the batches must be the ones the spektral path gives.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import keras

pytest.importorskip("rdkit")
pytest.importorskip("spektral")

from applications.qm9 import data  # noqa: E402

from tests.applications.qm9.qm9_fixtures import write_cli_cache, write_synthetic_qm9  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
BLOCKED = ("tensorflow", "spektral", "rdkit", "qm9pack")


@pytest.fixture(scope="module")
def csv_and_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("qm9_no_tf")
    (root / "csv").mkdir()
    write_synthetic_qm9(root / "csv", 30, seed=3)
    kw = dict(cache_dir=str(root / "cache"), data_dir=str(root / "csv"), n_test=6, n_val=6, progress=False)
    with_spektral = data.load_qm9(**kw)  # RDKit preprocessing -> cache, spektral graphs
    return kw, with_spektral


def _batches(qm9, edges):
    out = []
    for part, shuffle in ((qm9.train, True), (qm9.val, False)):
        loader = data.GraphLoader(part, batch_size=5, shuffle=shuffle, drop_remainder=shuffle, seed=4,
                                  edges=edges, node_quantum=16, edge_quantum=64)
        out += [loader[k] for k in range(len(loader))]
    return out


@pytest.mark.parametrize("edges", ["complete", "bonds"])
def test_batches_without_spektral_equal_the_spektral_ones(csv_and_cache, monkeypatch, edges):
    kw, with_spektral = csv_and_cache
    assert type(with_spektral.train[0]).__module__.startswith("spektral")
    expected = _batches(with_spektral, edges)
    for name in BLOCKED + ("spektral.data", "spektral.data.utils"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    assert data.spektral_data() is None
    without = data.load_qm9(**kw)  # from the cache: RDKit is not needed either
    assert isinstance(without.train, data.MinimalDataset) and isinstance(without.train[0], data.MinimalGraph)
    assert len(without.train) == len(with_spektral.train) == 18
    np.testing.assert_array_equal(without.mean, with_spektral.mean)
    got = _batches(without, edges)
    assert len(got) == len(expected) == 3 + 2  # 18 train molecules -> 3 full batches; 6 val -> 5 + 1
    for (x_got, y_got), (x_exp, y_exp) in zip(got, expected):
        assert x_got.keys() == x_exp.keys() and y_got.keys() == y_exp.keys()
        for key in x_exp:
            assert x_got[key].dtype == x_exp[key].dtype, key
            np.testing.assert_array_equal(x_got[key], x_exp[key], err_msg=key)
        for key in y_exp:
            np.testing.assert_array_equal(y_got[key], y_exp[key], err_msg=key)


def test_minimal_graph_and_dataset_act_like_spektral_ones(csv_and_cache):
    _, with_spektral = csv_and_cache
    g = with_spektral.val[2]
    mine = data.MinimalGraph(x=g.x, a=g.a, e=g.e, y=g.y, pos=g.pos)
    assert mine.n_nodes == g.n_nodes == len(g.pos)
    ds = data.MinimalDataset([mine] * 4)
    assert len(ds) == 4 and ds[3] is mine and len(ds[1:3]) == 2 and len(ds[np.array([0, 2, 3])]) == 3
    assert [h.n_nodes for h in ds] == [g.n_nodes] * 4


_BLOCKER = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = {blocked!r}
    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
            return None
    sys.meta_path.insert(0, Blocker())
""").format(blocked=BLOCKED)


def _run_blocked(code, tmp_path):
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-c", _BLOCKER + textwrap.dedent(code)], cwd=str(tmp_path),
                          env=env, capture_output=True, text=True, timeout=600)


def test_help_works_without_tensorflow(tmp_path):
    proc = _run_blocked("""
        from applications.qm9.__main__ import main
        try:
            main(["--help"])
        except SystemExit as stop:
            assert stop.code == 0
        assert "tensorflow" not in sys.modules and "keras" not in sys.modules
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--cache-dir" in proc.stdout and "qm9pack" in proc.stdout


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="one child process on JAX covers the path")
def test_cli_trains_from_a_cache_without_tensorflow_spektral_or_rdkit(tmp_path):
    """A cache for the CLI's --subset rows (synthetic molecules standing in for them), then one epoch of the
    CLI in a child process where TensorFlow, spektral, RDKit and qm9pack cannot be imported."""
    cache = tmp_path / "cache"
    (tmp_path / "csv").mkdir()
    write_cli_cache(tmp_path / "csv", cache)
    out = tmp_path / "out"
    proc = _run_blocked(f"""
        from applications.qm9.__main__ import main
        main(["--preset", "quick", "--subset", "12", "6", "6", "--epochs", "2", "--dim", "8", "--batch-size", "4",
              "--balancer", "ew", "--cache-dir", {str(cache)!r}, "--out", {str(out)!r}])
        bad = sorted(n for n in sys.modules if n.split(".")[0] in BLOCKED)
        assert not bad, bad
    """, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run = json.loads((out / "run_ew_seed0.json").read_text())
    assert len(run["history"]["val_delta_p"]) == 2 and np.isfinite(run["delta_p"])
    assert set(run["test_mae"]) == set(data.TARGETS)
    curve = json.loads((out / "curve_ew_seed0.json").read_text())  # rewritten after every epoch
    assert curve["epochs_done"] == 2 and curve["history"]["val_delta_p"] == run["history"]["val_delta_p"]
    assert len(curve["train_seconds_per_epoch"]) == 2
    assert all(0 < t <= e for t, e in zip(curve["train_seconds_per_epoch"], curve["epoch_seconds"]))
    summary = json.loads((out / "results.json").read_text())
    assert summary["runs"]["ew"][0]["delta_p"] == run["delta_p"]
