"""Fixtures of the balancer tests (helpers live in balancer_helpers.py)."""

import keras
import pytest
from balancer_helpers import make_tiny_data


@pytest.fixture(autouse=True)
def _clear_session():
    # Overrides the suite-wide fixture of tests/conftest.py for this directory: the same seed and session reset,
    # without the full garbage collection (free_memory=True costs ~0.7 s per test on 2 cores, most of this
    # directory's run time).
    keras.utils.set_random_seed(1234)
    yield
    keras.backend.clear_session(free_memory=False)


@pytest.fixture(scope="session")
def tiny_data():
    return make_tiny_data()
