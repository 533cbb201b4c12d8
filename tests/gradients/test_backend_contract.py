"""The backend contract of `keras_dbmtl/gradients/`: every backend module provides the primitives that
`keras_dbmtl/gradients/__init__.py` lists, and the running backend's primitives do what the list says.

References are closed-form gradients of small polynomial losses (computed by hand here, in numpy), not the
primitives run another way.
"""

import ast
import os

import numpy as np
import pytest

import keras
from keras import ops

from keras_dbmtl import gradients

HERE = os.path.dirname(os.path.abspath(__file__))
GRADIENTS = os.path.join(os.path.dirname(os.path.dirname(HERE)), "keras_dbmtl", "gradients")

#: The primitives every backend module defines (the contract in keras_dbmtl/gradients/__init__.py's docstring).
REQUIRED = ("pullback", "replica_mean", "global_losses", "optimizer_gradients", "num_replicas", "replica_rank",
            "broadcast_from_root", "init_process_group", "snapshot", "keep_where", "skips_by_branch",
            "branches_in_python", "run_step", "DEFAULT_VECTORIZE")
#: Optional, with the default the assembly uses when a module has none.
OPTIONAL = ("all_finite", "on_gpu", "SEQUENTIAL_ROWS")


def _defined_names(path):
    tree = ast.parse(open(path).read())
    names = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    names |= {target.id for node in tree.body if isinstance(node, ast.Assign) for target in node.targets
              if isinstance(target, ast.Name)}
    return names


@pytest.mark.parametrize("backend", ["jax", "tensorflow", "torch"])
def test_every_backend_module_defines_the_contract_and_only_the_listed_public_names(backend):
    names = _defined_names(os.path.join(GRADIENTS, f"{backend}.py"))
    missing = [name for name in REQUIRED if name not in names]
    assert not missing, f"keras_dbmtl/gradients/{backend}.py lacks {missing}"
    public = {name for name in names if not name.startswith("_")}
    assert public <= set(REQUIRED) | set(OPTIONAL), sorted(public - set(REQUIRED) - set(OPTIONAL))
    contract = gradients.__doc__
    for name in REQUIRED + OPTIONAL:                     # the docstring is the contract: it names each one
        assert name in contract, name


X = np.array([0.5, -2.0, 3.0], "float32")


def _variables():
    a = keras.Variable(np.array([1.0, 2.0, -1.0], "float32"), name="a")
    b = keras.Variable(np.array([[0.5, -1.0], [2.0, 0.25]], "float32"), name="b")
    unused = keras.Variable(np.ones((2,), "float32"), name="unused")
    return a, b, unused


def _forward(a, b):
    """losses l0 = <a, x> + sum(b), l1 = |a|^2 / 2 + |b|^2; regularisation 0.1 sum(a); aux passes through."""
    def forward():
        l0 = ops.sum(a * X) + ops.sum(b)
        l1 = 0.5 * ops.sum(a * a) + ops.sum(b * b)
        return (ops.stack([l0, l1]), 0.1 * ops.sum(a)), "aux"
    return forward


def _expected(a, b):
    a, b = np.asarray(a), np.asarray(b)
    jacobian_a = np.stack([X, a])                         # d l_t / d a
    jacobian_b = np.stack([np.ones_like(b), 2.0 * b])     # d l_t / d b
    return jacobian_a, jacobian_b


def test_pullback_rows_batched_rows_sums_and_unconnected_zeros():
    a, b, unused = _variables()
    module = gradients.backend_module()
    (losses, regularization), aux, pull = module.pullback(_forward(a, b), [a, b, unused])
    assert aux == "aux"
    np.testing.assert_allclose(ops.convert_to_numpy(losses), [(0.5 - 4.0 - 3.0) + 1.75, 3.0 + 5.3125], rtol=1e-6)
    jacobian_a, jacobian_b = _expected(a.numpy(), b.numpy())
    zero = ops.zeros_like(regularization)
    for t in range(2):
        row = pull((ops.eye(2)[t], zero), [0, 1, 2])
        np.testing.assert_allclose(ops.convert_to_numpy(row[0]), jacobian_a[t], rtol=1e-6)
        np.testing.assert_allclose(ops.convert_to_numpy(row[1]), jacobian_b[t], rtol=1e-6)
        np.testing.assert_array_equal(ops.convert_to_numpy(row[2]), np.zeros(2))        # not reached: zeros
    modes = [True] + (["sequential"] if getattr(module, "SEQUENTIAL_ROWS", False) else [])
    for batched in modes:
        blocks = pull((ops.eye(2), ops.zeros((2,))), [0, 1], batched=batched)
        np.testing.assert_allclose(ops.convert_to_numpy(blocks[0]), jacobian_a, rtol=1e-6, err_msg=str(batched))
        np.testing.assert_allclose(ops.convert_to_numpy(blocks[1]), jacobian_b, rtol=1e-6, err_msg=str(batched))
    # the regularisation output alone, and the sum of the task losses (what the heads get)
    (reg_a,) = pull((ops.zeros((2,)), ops.ones_like(regularization)), [0])
    np.testing.assert_allclose(ops.convert_to_numpy(reg_a), np.full(3, 0.1), rtol=1e-6)
    (sum_b,) = pull((ops.ones((2,)), zero), [1])
    np.testing.assert_allclose(ops.convert_to_numpy(sum_b), jacobian_b.sum(axis=0), rtol=1e-6)


def test_pullback_gradients_of_inputs_come_after_the_variables():
    a, _, _ = _variables()
    z = ops.convert_to_tensor(np.array([2.0, -1.0], "float32"))

    def forward(features):            # l = sum(a) * |z|^2: d/dz = 2 sum(a) z, d/da = |z|^2
        return (ops.sum(a) * ops.sum(features * features),), None

    (value,), _, pull = gradients.backend_module().pullback(forward, [a], inputs=[z])
    grad_a, grad_z = pull((ops.ones_like(value),), [0, 1])
    np.testing.assert_allclose(ops.convert_to_numpy(grad_a), np.full(3, 5.0), rtol=1e-6)
    np.testing.assert_allclose(ops.convert_to_numpy(grad_z), 2.0 * 2.0 * np.array([2.0, -1.0]), rtol=1e-6)


def test_task_gradients_assembly_on_the_primitives():
    """keras_dbmtl.gradients.task_gradients: the shared Jacobian, each task's own variables' gradient of the sum,
    the regularisation gradients; looped and vectorised alike."""
    a, b, _ = _variables()
    jacobian_a, jacobian_b = _expected(a.numpy(), b.numpy())
    forward = _forward(a, b)

    def differentiated():
        (losses, regularization), aux = forward()
        return losses, regularization, aux

    for vectorize in (False, True):
        result = gradients.task_gradients(differentiated, [a], [[b], []], vectorize=vectorize)
        assert result.aux == "aux" and len(result.shared_blocks) == 1
        np.testing.assert_allclose(ops.convert_to_numpy(result.shared_blocks[0]), jacobian_a, rtol=1e-6)
        np.testing.assert_allclose(ops.convert_to_numpy(result.task_gradients[0][0]), jacobian_b.sum(axis=0),
                                   rtol=1e-6)
        assert result.task_gradients[1] == []
        np.testing.assert_allclose(ops.convert_to_numpy(result.regularization_gradients[0]), np.full(3, 0.1),
                                   rtol=1e-6)
        np.testing.assert_allclose(ops.convert_to_numpy(result.regularization_gradients[1]), np.zeros((2, 2)))


def test_one_replica_primitives_are_identities():
    values = [ops.convert_to_tensor(np.array([1.0, -2.0], "float32")), ops.ones((2, 2))]
    assert gradients.num_replicas() == 1 and gradients.replica_rank() == 0
    for reduced, value in zip(gradients.replica_mean(values), values):
        np.testing.assert_array_equal(ops.convert_to_numpy(reduced), ops.convert_to_numpy(value))
    for sent, value in zip(gradients.broadcast_from_root(values), values):
        np.testing.assert_array_equal(ops.convert_to_numpy(sent), ops.convert_to_numpy(value))
    losses = ops.convert_to_tensor(np.array([0.5, 3.0], "float32"))
    np.testing.assert_array_equal(ops.convert_to_numpy(gradients.global_losses(losses)), [0.5, 3.0])


def test_snapshot_and_keep_where_restore_or_keep():
    a, b, _ = _variables()
    before = [a.numpy().copy(), b.numpy().copy()]
    for keep_new in (True, False):
        saved = gradients.snapshot([a, b])
        a.assign(a + 1.0)
        b.assign(b * 3.0)
        new = [a.numpy().copy(), b.numpy().copy()]
        gradients.keep_where(ops.convert_to_tensor(keep_new), [a, b], saved)
        expected = new if keep_new else before
        np.testing.assert_array_equal(a.numpy(), expected[0])
        np.testing.assert_array_equal(b.numpy(), expected[1])
        before = [a.numpy().copy(), b.numpy().copy()]


def test_all_finite_and_the_flags():
    finite = [ops.ones((3,)), ops.zeros((2, 2))]
    assert bool(ops.convert_to_numpy(gradients.all_finite(finite)))
    for bad in (np.nan, np.inf, -np.inf):
        tensor = ops.convert_to_tensor(np.array([1.0, bad], "float32"))
        assert not bool(ops.convert_to_numpy(gradients.all_finite(finite + [tensor]))), bad
    assert isinstance(gradients.branches_in_python(), bool)
    assert isinstance(gradients.skips_by_branch(), bool)
    assert gradients.branches_in_python() == (keras.backend.backend() == "torch")        # the eager backend
    assert isinstance(gradients.default_vectorize(), bool)
