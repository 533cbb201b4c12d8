"""examples/torch_loop.py, small: door 3 (`keras_dbmtl.torch.Balancer.backward`) in a plain PyTorch loop learns
the task with the small loss that the plain sum's `.backward()` starves (torch backend only)."""

import keras
import pytest

from tests.examples import load_example


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="door 3: the torch backend only")
def test_dbmtl_learns_the_small_task_that_the_sum_starves(capsys):
    example = load_example("torch_loop")
    import torch

    threads = torch.get_num_threads()
    try:
        results = example.main(("ew_backward", "dbmtl"), epochs=8)
    finally:
        torch.set_num_threads(threads)
    assert results["ew_backward"]["large"] < 0.2 and results["ew_backward"]["small"] > 0.8
    assert results["dbmtl"]["large"] < 0.3 and results["dbmtl"]["small"] < 0.3
    assert "dbmtl" in capsys.readouterr().out
