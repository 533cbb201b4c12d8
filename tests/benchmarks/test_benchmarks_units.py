"""Unit tests of the benchmark arithmetic and report writer, on worked examples and hand-made JSON (no timing)."""

import json
import os

import pytest

from benchmarks import common, report


# --------------------------------------------------------------------------- the floor


def test_floor_worked_example():
    # F = 1 ms, F + B = 3 ms (B = 2 F): (1 + 2T) / 3, the formula.
    for t in (1, 2, 3, 11, 40):
        assert common.floor_ratio(1.0, 3.0, t) == pytest.approx((1 + 2 * t) / 3)
    # A measured B/F of 0.5 (F = 2, B = 1), T = 3: (2 + 3) / (2 + 1).
    assert common.floor_ratio(2.0, 3.0, 3) == pytest.approx(5 / 3)
    # One task: no extra backward pass, floor 1 whatever the timings.
    assert common.floor_ratio(0.7, 1.9, 1) == pytest.approx(1.0)
    # Timing noise (F + B measured below F) clamps B to ~0: floor ~1, never negative or infinite.
    assert common.floor_ratio(2.0, 1.5, 11) == pytest.approx(1.0, abs=1e-9)


# --------------------------------------------------------------------------- interleaving


def test_interleaved_medians_calls_and_order():
    calls = []
    functions = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    timings = common.interleaved_medians(functions, repeats=4, rounds=2, warmup=1)
    assert set(timings) == {"a", "b", "c"}
    for name in "abc":
        assert timings[name]["samples"] == 4
        assert timings[name]["median"] >= 0.0 and timings[name]["wall"] >= 0.0
    # warm-up a b c, then round 0 forward (2 calls each), round 1 reversed.
    assert calls == list("abc") + list("aabbcc") + list("ccbbaa")


def test_interleaved_medians_budget_stops_after_a_round():
    calls = []
    functions = {"a": lambda: calls.append("a")}
    timings = common.interleaved_medians(functions, repeats=10, rounds=5, warmup=0, budget_s=0.0)
    assert timings["a"]["samples"] == 2  # one full round of 10 / 5, then the (already spent) budget stops it


# --------------------------------------------------------------------------- the report on hand-made JSON


def _row(balancer, needs, ratio, floor, host=0):
    return {"balancer": balancer, "needs": needs, "ms": 2.0 * ratio, "ratio_to_ew": ratio,
            "ratio_to_floor": ratio / floor, "extra_ms": 0.0, "wall_ms": 2.0 * ratio, "cpu_ms": 2.0 * ratio,
            "ratio_to_ew_wall": ratio, "samples": 4, "compile_s": 1.0, "host_round_trips": host}


def _result(model, mode, backend, floor, rows, default_vectorize):
    return {"model": model, "mode": mode, "backend": backend, "num_tasks": 3, "num_shared_parameters": 1000,
            "num_parameters": 1003, "forward_ms": 1.0, "forward_backward_ms": 2.0, "backward_over_forward": 1.0,
            "backward_ms": 1.0, "floor": floor, "floor_wall": floor, "clock": "cpu", "threads": 1, "ew_ms": 2.0,
            "default_vectorize": default_vectorize, "rows": rows, "errors": {}}


def _write_fixture(out_dir):
    step_jax = {"benchmark": "step_time", "versions": {"keras": "3.x", "jax": "0.x"}, "machine": {"nproc": 2},
                "repeats": 4, "rounds": 2, "warmup": 1, "results": [
                    # dbmtl 2.6 / floor 2.0 = 1.30: missed; the looped variant 2.0 is faster than the default vmap.
                    _result("dense-T3", "jax", "jax", 2.0, [
                        _row("ew", "losses", 1.0, 2.0), _row("dbmtl", "jacobian", 2.6, 2.0),
                        _row("uw", "losses", 1.4, 2.0), _row("mgda", "gramian", 5.0, 2.0, host=0),
                        _row("dbmtl[vectorize=False]", "jacobian", 2.0, 2.0)], True)]}
    step_torch = {"benchmark": "step_time", "versions": {"torch": "2.x"}, "machine": {"nproc": 2},
                  "repeats": 4, "rounds": 2, "warmup": 1, "results": [
                      # dbmtl 1.7 / floor 1.6 = 1.06: met; mgda needs 20 host round trips.
                      _result("dense-T3", "torch", "torch", 1.6, [
                          _row("ew", "losses", 1.0, 1.6), _row("dbmtl", "jacobian", 1.7, 1.6),
                          _row("mgda", "gramian", 2.0, 1.6, host=20),
                          _row("dbmtl[vectorize=True]", "jacobian", 1.7, 1.6)], False)]}
    libmtl = {"benchmark": "libmtl_torch", "versions": {"torch": "2.x"}, "results": [{
        "model": "dense-T3", "num_tasks": 3, "num_shared_parameters": 1000, "plain_num_shared_parameters": 1000,
        "ms": {"keras_ew": 6.0, "plain_ew": 2.0, "keras_dbmtl": 9.0, "plain_dbmtl": 4.5},
        "wall_ms": {"keras_ew": 6.0, "plain_ew": 2.0, "keras_dbmtl": 9.0, "plain_dbmtl": 4.5},
        "dbmtl_keras_over_plain": 2.0, "ew_keras_over_plain": 3.0, "dbmtl_over_ew_keras": 1.5,
        "dbmtl_over_ew_plain": 2.25, "clock": "cpu", "threads": 1}]}
    for name, payload in (("step_jax", step_jax), ("step_torch", step_torch), ("libmtl_torch", libmtl)):
        with open(os.path.join(out_dir, name + ".json"), "w") as fh:
            json.dump(payload, fh)
    with open(os.path.join(out_dir, "notes.md"), "w") as fh:
        fh.write("## Findings\n\nA hand-written note.\n")


def test_summary_verdicts():
    out = {}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        _write_fixture(tmp)
        step = report._load(tmp, "step_")
        libmtl = report._load(tmp, "libmtl_torch")
        out = report._summary(report._step_results(step), {}, libmtl)
    text = "\n".join(out)
    assert "met on 1 of 2 model/mode pairs" in text
    assert "**missed**: dense-T3/JAX jit 1.30" in text
    assert "uw dense-T3/JAX jit 1.40" in text                 # a loss-level method off 1 is named
    assert "mgda dense-T3/JAX jit 2.5× floor" in text          # a gradient-level method above 2 x floor
    assert "mgda torch: 20" in text
    assert "**missed** on dense-T3 2.00 (keras / plain)" in text and "dense-T3 3.00" in text
    # JAX: vmap (default) / loop = 2.6 / 2.0 = 1.30 -> the default is contradicted; torch: 1.00 -> no difference.
    assert "`DEFAULT_VECTORIZE` jax = True: vectorised / looped, geometric mean over 1 step and Jacobian " \
           "measurements = 1.30" in text and "use False" in text
    assert "`DEFAULT_VECTORIZE` torch = False" in text and "finds no difference beyond 5%" in text


def test_report_write_on_given_json(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    _write_fixture(str(out))
    path = report.write(str(out), str(tmp_path / "RESULTS.md"), str(tmp_path / "figures"), "python run_all.py")
    text = open(path).read()
    assert "```\npython run_all.py\n```" in text
    assert "## Findings\n\nA hand-written note." in text
    # The headline table: dense-T3 / JAX jit, floor 2.00, DB-MTL/EW 2.60, ÷ floor 1.30 flagged as a miss.
    line = next(l for l in text.splitlines() if l.startswith("| dense-T3 | JAX jit |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert "2.00" in cells and "**1.30**" in cells and "**no**" in cells
    line = next(l for l in text.splitlines() if l.startswith("| dense-T3 | torch |") and "yes" in l)
    assert "1.06" in line
    assert (tmp_path / "figures" / "dbmtl_vs_floor.png").exists()
    assert (tmp_path / "figures" / "keras_over_plain_torch.png").exists()
