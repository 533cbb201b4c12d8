"""Smoke test of the benchmark scripts: each main function on the smallest configuration, 1 repeat.

No timing is checked (timings are not tests): only that every script runs on this backend and that its table
has the expected rows and columns.
"""

import keras
import pytest

from benchmarks import common, jacobian, memory, report, step_time

MODE = {"tensorflow": "tf-graph", "torch": "torch", "jax": "jax"}[keras.backend.backend()]
MODEL = "dense-T2"


@pytest.fixture(scope="module")
def step_payload(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    payload = step_time.main(keras.backend.backend(), modes=[MODE], models=[MODEL], balancers=["ew", "dbmtl"],
                             repeats=1, rounds=1, warmup=1, check_host_model=MODEL,
                             out=str(out / f"step_{MODE}.json"))
    return out, payload


def test_step_time_table(step_payload):
    _, payload = step_payload
    (result,) = payload["results"]
    assert result["model"] == MODEL and result["mode"] == MODE and result["num_tasks"] == 2
    names = [row["balancer"] for row in result["rows"]]
    default = result["default_vectorize"]
    assert names == ["ew", "dbmtl", f"dbmtl[vectorize={not default}]"]
    for key in ("forward_ms", "forward_backward_ms", "floor", "ew_ms", "num_shared_parameters"):
        assert result[key] > 0
    for row in result["rows"]:
        assert {"ms", "ratio_to_ew", "ratio_to_floor", "extra_ms", "wall_ms", "host_round_trips"} <= set(row)
        assert row["ms"] > 0
    assert result["rows"][0]["ratio_to_ew"] == pytest.approx(1.0)
    assert result["rows"][1]["needs"] == "jacobian"
    # DB-MTL's step reads nothing back to the host. torch on the CPU skips an unusable step with a Python branch
    # (two flag reads, no device there to wait for); the count is taken with the select a GPU runs instead.
    assert result["rows"][1]["host_round_trips"] == 0


def test_jacobian_table():
    payload = jacobian.main(keras.backend.backend(), modes=[MODE], models=[MODEL], repeats=1, rounds=1, warmup=1)
    (result,) = payload["results"]
    for key in ("looped_ms", "vectorized_ms", "vectorized_over_looped", "forward_backward_ms"):
        assert result[key] > 0
    assert result["faster"] in ("looped", "vectorized")


def test_memory_child():
    # In this process (run_all runs it in a fresh one): only the fields are checked.
    result = memory.child("keras", keras.backend.backend(), MODE, MODEL, "dbmtl", steps=1)
    assert {"setup_peak_mb", "step_peak_mb", "state_mb", "rss_before_mb", "counter"} <= set(result)
    # Two heads' EMA buffers (2 x P float32) are part of the state.
    assert result["state_mb"] * 2**20 > 2 * 4 * common.DENSE["hidden"] ** 2


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="the plain-PyTorch comparison runs on torch")
def test_libmtl_torch_table():
    from benchmarks import libmtl_torch

    payload = libmtl_torch.main(models=[MODEL], repeats=1, rounds=1, warmup=1)
    (result,) = payload["results"]
    assert result["num_shared_parameters"] == result["plain_num_shared_parameters"]
    assert set(result["ms"]) == {"keras_ew", "keras_dbmtl", "plain_ew", "plain_dbmtl"}
    assert result["dbmtl_keras_over_plain"] > 0


def test_report(step_payload, tmp_path):
    out, _ = step_payload
    path = report.write(str(out), str(tmp_path / "RESULTS.md"), str(tmp_path / "figures"), "python run_all.py")
    text = open(path).read()
    assert "DB-MTL / EW against the floor" in text and f"| {MODEL} |" in text
    assert (tmp_path / "figures" / "dbmtl_vs_floor.png").exists()
