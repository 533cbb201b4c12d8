"""Fixtures of the balancer tests (helpers live in balancer_helpers.py; the seed and session reset around every
test come from tests/conftest.py)."""

import pytest
from balancer_helpers import make_tiny_data


@pytest.fixture(scope="session")
def tiny_data():
    return make_tiny_data()
