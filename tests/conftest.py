import gc
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# JAX: compile for compile time, not for run time. The tests' programs are tiny, so XLA's optimisation passes on the
# CPU are most of what a JAX test costs (tests/balancers/test_balancers_fit.py: 81 s -> 62 s, issue 25). The
# programs and their semantics are the same; KERAS_DBMTL_TEST_OPTIMIZED_XLA=1 compiles them as a user's run does.
if not os.environ.get("KERAS_DBMTL_TEST_OPTIMIZED_XLA"):
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from hypothesis import HealthCheck, settings  # noqa: E402

from tests.quick_tier import is_quick  # noqa: E402

# Property-based tests (Hypothesis): "ci" (the default) draws few examples, derandomised, so that CI is
# reproducible and each property test costs seconds a backend; HYPOTHESIS_PROFILE=thorough draws many more, new
# ones each run, for a nightly-style search. A failing example found either way becomes an explicit test.
_PROFILE = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=8, derandomize=True, print_blob=True, **_PROFILE)
settings.register_profile("thorough", max_examples=300, print_blob=True, **_PROFILE)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if is_quick(item.nodeid):
            item.add_marker(pytest.mark.quick)


_TIMINGS = []


def pytest_runtest_logreport(report):
    if os.environ.get("KERAS_DBMTL_TEST_TIMINGS"):
        _TIMINGS.append({"test": report.nodeid, "phase": report.when, "seconds": report.duration})


def pytest_sessionfinish(session):
    path = os.environ.get("KERAS_DBMTL_TEST_TIMINGS")
    if path:                                         # `bash .ci/test --durations`: read by tests/timing_report.py
        with open(path, "w") as file:
            json.dump({"backend": keras.backend.backend(), "tests": _TIMINGS}, file)


def pytest_collection_finish(session):
    # Everything imported so far (TensorFlow, JAX, torch, Keras, the test modules: ~450k objects) lives for the
    # whole run: move it out of the collector's generations, so that the automatic collections during the tests
    # only traverse what the tests made.
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _clear_session():
    # The same seed and Keras session reset around every test, without an explicit full garbage collection
    # (`free_memory=False`): the collection traversed every live object of the run after every test, 4-5 s late in
    # a TensorFlow run, 896 s of its 2,800 s (teardown times of `--durations=0`, issue 25). Python's own
    # generational collector still frees cyclic garbage as the tests allocate. A test that needs memory returned
    # at once calls `gc.collect()` itself.
    keras.utils.set_random_seed(1234)
    yield
    keras.backend.clear_session(free_memory=False)


def backend():
    return keras.backend.backend()


@pytest.fixture
def rng():
    return np.random.default_rng(0)
