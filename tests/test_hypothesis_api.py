"""Property-based tests of the public API (Hypothesis): `compile` + `fit` over task names, target structures,
dtypes, shapes, NaN/inf placements and batch sizes no one wrote by hand.

The property: a fit either trains (every logged task weight finite, the per-task logs present, a warning whenever
a step was skipped) or raises a ValueError / TypeError that names the task or the argument at fault; never a
backend exception, never NaN weights, never an epoch skipped without a word. And the invariance DB-MTL claims:
a task's loss scaled by any c changes nothing it trains. Examples per test: the Hypothesis
profile (tests/conftest.py). A failing example Hypothesis finds becomes an explicit test below the properties.
"""

import math
import warnings

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import keras_dbmtl

BALANCERS = ("dbmtl", "ew", "upgrad", "mgda")
DTYPES = ("float16", "float32", "float64", "int32", "int64", "bool")
# Task names: any printable text, including spaces, slashes, quotes, dots and non-ASCII letters.
TASK_NAMES = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=8)


def _model(task_names, seed=0):
    keras.utils.set_random_seed(seed)
    encoder = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh")])
    return keras_dbmtl.MultiTaskModel(encoder=encoder, heads={t: keras.layers.Dense(1) for t in task_names})


def _fit_or_refuse(model, x, y, batch_size, sample_weight=None, named=()):
    """Runs one epoch; returns the History, or None when a clear ValueError / TypeError naming one of `named`
    was raised. Anything else fails the test."""
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            history = model.fit(x, y, sample_weight=sample_weight, batch_size=batch_size, epochs=1, verbose=0)
    except (ValueError, TypeError) as error:
        message = str(error)
        assert any(str(n) in message or repr(n) in message for n in named), message
        return None
    logs = history.history
    samples = len(next(iter(x.values())) if isinstance(x, dict) else x)
    steps = math.ceil(samples / batch_size)
    for task in model.task_names:
        assert math.isfinite(logs[f"{task}_weight"][-1]), (task, logs)
    skipped = logs["skipped_steps"][-1]
    if skipped:
        assert any("skipped" in str(w.message) for w in record), logs
    if skipped >= steps:
        assert math.isnan(logs["loss"][-1])            # a fully skipped epoch logs no training loss
    return history


@given(names=st.lists(TASK_NAMES, min_size=1, max_size=4, unique=True), balancer=st.sampled_from(BALANCERS))
def test_any_task_names_train_or_are_refused_by_name(names, balancer):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 3)).astype("float32")
    y = {t: rng.normal(size=(8, 1)).astype("float32") for t in names}
    try:
        model = _model(names)
        model.compile(optimizer="sgd", loss="mse", balancer=balancer)
    except (ValueError, TypeError) as error:
        assert any(repr(n) in str(error) or n in str(error) for n in names), str(error)
        return
    history = _fit_or_refuse(model, x, y, batch_size=4, named=names)
    if history is not None:
        assert {f"{t}_loss" for t in names} <= set(history.history)


@st.composite
def targets(draw):
    """(n, batch_size, y as a dict or a list, sample_weight or None): dtypes, NaN / inf placements, one-sample
    batches, an unlabelled task."""
    tasks = ("a", "b")
    n = draw(st.integers(0, 9))                                 # 0: no sample at all
    batch_size = draw(st.integers(1, max(n, 1)))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    y = {}
    for task in tasks:
        values = rng.normal(size=(n, 1))
        dtype = draw(st.sampled_from(DTYPES))
        fault = draw(st.sampled_from(("none", "none", "nan_one", "inf_one", "nan_all")))
        if fault != "none" and dtype.startswith("float"):
            where = slice(None) if fault == "nan_all" or n == 0 else draw(st.integers(0, n - 1))
            values[where] = np.nan if fault.startswith("nan") else np.inf
        y[task] = values.astype(dtype)
    sample_weight = None
    if draw(st.booleans()):
        sample_weight = {t: rng.uniform(0.0, 2.0, size=n).astype("float32") for t in tasks}
        if draw(st.booleans()):
            sample_weight["b"][:] = 0.0                     # task b unlabelled in every batch
    if draw(st.booleans()):
        y = [y[t] for t in tasks]
        sample_weight = None if sample_weight is None else [sample_weight[t] for t in tasks]
    return n, batch_size, y, sample_weight


@given(data=targets(), balancer=st.sampled_from(BALANCERS))
def test_targets_of_any_dtype_shape_and_value_train_or_are_refused_by_name(data, balancer):
    n, batch_size, y, sample_weight = data
    x = np.random.default_rng(1).normal(size=(n, 3)).astype("float32")
    model = _model(("a", "b"))
    model.compile(optimizer="sgd", loss="mse", balancer=balancer)
    _fit_or_refuse(model, x, y, batch_size, sample_weight=sample_weight,
                   named=("'a'", "'b'", "y", "sample_weight", "task", "the dataset is empty"))


@given(data=targets(), per_task_inputs=st.booleans(), x_dtype=st.sampled_from(DTYPES))
def test_inputs_of_any_structure_and_dtype_train_or_are_refused_by_name(data, per_task_inputs, x_dtype):
    """x as one array or (per_task_inputs=True) a dict with one input per task, of any dtype."""
    n, batch_size, y, sample_weight = data
    rng = np.random.default_rng(2)
    x = rng.normal(size=(n, 3)).astype(x_dtype)
    if per_task_inputs:
        x = {"a": x, "b": rng.normal(size=(n, 3)).astype(x_dtype)}
    keras.utils.set_random_seed(0)
    encoder = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh")])
    model = keras_dbmtl.MultiTaskModel(encoder=encoder, heads={t: keras.layers.Dense(1) for t in ("a", "b")},
                                       per_task_inputs=per_task_inputs)
    model.compile(optimizer="sgd", loss="mse", balancer="dbmtl")
    _fit_or_refuse(model, x, y, batch_size, sample_weight=sample_weight,
                   named=("'a'", "'b'", "x", "y", "sample_weight", "task", "the dataset is empty"))


_SCALING = {}


def _scaling_model():
    """One compiled DB-MTL model for every example (the scale reaches it as a sample weight: data, not a new
    program), with its initial weights (the balancer's EMA and step counter included)."""
    if "model" not in _SCALING:
        model = _model(("a", "b"), seed=3)
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", balancer="dbmtl")
        x = np.zeros((8, 3), "float32")
        model.fit(x, {"a": x[:, :1], "b": x[:, :1]}, batch_size=8, epochs=1, verbose=0)   # builds everything
        _SCALING["model"], _SCALING["initial"] = model, None
    return _SCALING["model"]


@given(log_scale=st.floats(-3.0, 4.0), task=st.sampled_from(("a", "b")))
def test_scaling_a_task_loss_changes_nothing_under_dbmtl(log_scale, task):
    """DB-MTL's log transform makes a task's loss scale irrelevant (Section 3.1: grad log(c l) = grad l / l): three
    steps with task `task`'s loss multiplied by c (a sample weight of c on every sample) end on the same weights,
    shared and per task, as with c = 1."""
    model = _scaling_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 3)).astype("float32")
    y = {"a": (x @ rng.normal(size=(3, 1))).astype("float32") + 2.0,
         "b": np.sin(x[:, :1] * 3.0).astype("float32") + 2.0}
    if _SCALING["initial"] is None:
        _SCALING["initial"] = model.get_weights()

    def trained(scale):
        model.set_weights(_SCALING["initial"])
        weights = {t: np.full(24, scale if t == task else 1.0, "float32") for t in ("a", "b")}
        model.fit(x, y, sample_weight=weights, batch_size=8, epochs=1, shuffle=False, verbose=0)
        return model.get_weights()

    reference, scaled = trained(1.0), trained(10.0 ** log_scale)
    for start, a, b in zip(_SCALING["initial"], reference, scaled):
        moved = np.abs(a - start).max()
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-3 * moved + 1e-6)
