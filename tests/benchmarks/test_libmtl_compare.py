"""benchmarks/libmtl_compare.py without its optional packages (LibMTL, torch_geometric, torchjd): what runs where,
and that a missing package skips its side with a message instead of failing. No step is built or timed."""

from benchmarks import libmtl_compare


def test_configurations_keep_each_sides_methods():
    configs = libmtl_compare.configurations(["tf-graph", "torch", "libmtl", "torchjd-once"], ["upgrad", "dbmtl", "ew"])
    assert configs == [("tf-graph", "ew"), ("tf-graph", "dbmtl"), ("torch", "ew"), ("torch", "dbmtl"),
                       ("torch", "upgrad"), ("libmtl", "ew"), ("libmtl", "dbmtl"), ("torchjd-once", "upgrad")]
    assert libmtl_compare.paper_size()["batch"] == 32 and libmtl_compare.paper_size()["edges"] == "complete"


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
