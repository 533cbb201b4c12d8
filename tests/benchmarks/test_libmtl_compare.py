"""benchmarks/libmtl_compare.py without its optional packages (LibMTL, torch_geometric, torchjd): what runs where,
that a missing package skips its side with a message instead of failing, and the door's ratio report. No step is
built or timed."""

from benchmarks import libmtl_compare


def test_configurations_keep_each_sides_methods():
    configs = libmtl_compare.configurations(["tf-graph", "torch", "libmtl", "torchjd-once"], ["upgrad", "dbmtl", "ew"])
    assert configs == [("tf-graph", "ew"), ("tf-graph", "dbmtl"), ("torch", "ew"), ("torch", "dbmtl"),
                       ("torch", "upgrad"), ("libmtl", "ew"), ("libmtl", "dbmtl"), ("torchjd-once", "upgrad")]
    assert libmtl_compare.paper_size()["batch"] == 32 and libmtl_compare.paper_size()["edges"] == "complete"


def test_door_sides_run_every_method_in_the_reference_worker():
    configs = libmtl_compare.configurations(["door", "door-once"], ["ew", "dbmtl", "upgrad"])
    assert configs == [(s, m) for s in ("door", "door-once") for m in ("ew", "dbmtl", "upgrad")]
    assert libmtl_compare.WORKER_OF["door"] == libmtl_compare.WORKER_OF["door-once"] == "reference"
    assert libmtl_compare.missing_packages("door-once", find_spec=lambda name: None) == ["torch_geometric"]


def test_paired_ratio_per_round():
    """Ratio of the medians, and per-round ratios of the rounds' medians (2 steps a round, b one round short)."""
    payload = {"per_round": 2, "rows": [
        {"side": "door-once", "method": "dbmtl", "wall_ms": 9.0, "wall_ms_all": [8.0, 10.0, 9.0, 9.0, 4.0, 6.0]},
        {"side": "libmtl-once", "method": "dbmtl", "wall_ms": 10.0, "wall_ms_all": [10.0, 10.0, 9.0, 11.0]},
        {"side": "torch", "method": "dbmtl", "skipped": "torch: skipped"}]}
    r = libmtl_compare.paired_ratio(payload, "door-once:dbmtl", "libmtl-once:dbmtl")
    assert r["ratio"] == 0.9 and r["rounds"] == [0.9, 0.9]
    assert (r["round_median"], r["round_min"], r["round_max"]) == (0.9, 0.9, 0.9)
    assert libmtl_compare.paired_ratio(payload, "door-once:dbmtl", "torch:dbmtl") is None
    table = libmtl_compare.door_ratio_table(payload)
    assert "| `door-once:dbmtl` / `libmtl-once:dbmtl` | 0.900 | 0.900 (0.900-0.900) | 2 | ≤ 0.9: met |" in table
    assert "torch:dbmtl" not in table
    assert libmtl_compare.door_ratio_table({"rows": payload["rows"][2:]}) == ""


def test_missing_packages_are_named():
    def absent(name):
        return None if name in ("LibMTL", "torchjd") else object()

    assert libmtl_compare.missing_packages("libmtl", find_spec=absent) == ["LibMTL"]
    assert libmtl_compare.missing_packages("torchjd-once", find_spec=absent) == ["torchjd"]
    assert libmtl_compare.missing_packages("jax", find_spec=absent) == []


def test_missing_side_is_skipped_with_a_message(monkeypatch):
    monkeypatch.setattr(libmtl_compare, "missing_packages", lambda side: ["LibMTL", "torch_geometric"])
    payload = libmtl_compare.main(sides=["libmtl"], methods=["ew", "dbmtl"], rounds=1)
    rows = payload["rows"]
    assert [(r["side"], r["method"]) for r in rows] == [("libmtl", "ew"), ("libmtl", "dbmtl")]
    for row in rows:
        assert "wall_ms" not in row
        assert "LibMTL, torch_geometric not importable" in row["skipped"] and "pip install" in row["skipped"]


def test_dbmtl_on_libmtl_matches_the_paper_update():
    """DBMTLOnLibMTL (the DB-MTL row when LibMTL has no DB_MTL): two steps of its shared gradient against the paper's
    equations in float64 numpy on per-task gradients from torch.autograd. Skipped without LibMTL."""
    import importlib.util

    import numpy as np
    import pytest

    if importlib.util.find_spec("LibMTL") is None:
        pytest.skip("LibMTL not installed (optional)")
    import torch

    libmtl_compare.import_libmtl()
    from LibMTL.architecture import HPS

    weighting = libmtl_compare.dbmtl_on_libmtl()

    class Model(HPS, weighting):
        def __init__(self):
            super().__init__(["a", "b"], lambda: torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh()),
                             torch.nn.ModuleDict({"a": torch.nn.Linear(4, 1), "b": torch.nn.Linear(4, 1)}),
                             False, False, torch.device("cpu"))
            self.init_param()

    torch.manual_seed(0)
    model = Model().double()
    model.zero_grad_share_params = lambda: model.encoder.zero_grad(set_to_none=False)
    x = torch.randn(5, 3, dtype=torch.float64)
    y = {"a": torch.randn(5, 1, dtype=torch.float64), "b": 1e3 * torch.randn(5, 1, dtype=torch.float64)}
    ema = np.zeros((2, sum(p.numel() for p in model.encoder.parameters())))
    for step in (1, 2):
        shared = list(model.encoder.parameters())
        losses = torch.stack([torch.mean((model(x)[t] - y[t]) ** 2) for t in ("a", "b")])
        grads = np.stack([np.concatenate([g.reshape(-1).numpy() for g in
                                          torch.autograd.grad(torch.log(losses[t] + 1e-8), shared,
                                                              retain_graph=True)]) for t in range(2)])
        ema = 0.9 * ema + 0.1 * grads
        norms = np.linalg.norm(ema, axis=1)
        expected = ((norms.max() / (norms + 1e-8))[:, None] * ema).sum(0)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        model.backward(losses, DB_beta=0.9, DB_beta_sigma=0.0)
        got = np.concatenate([p.grad.reshape(-1).numpy() for p in model.encoder.parameters()])
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9)  # LibMTL's (T, P) buffer is float32
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
