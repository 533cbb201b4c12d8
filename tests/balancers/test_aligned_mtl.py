import numpy as np
from balancer_helpers import JACOBIAN, LOSSES, aggregate, built, random_jacobian

from keras_dbmtl.balancers import AlignedMTL


def _aligned_numpy(jacobian):
    gram = jacobian @ jacobian.T
    values, vectors = np.linalg.eigh(gram)
    keep = values > values.max() * len(gram) * np.finfo(np.float32).eps
    values, vectors = values[keep], vectors[:, keep]
    alignment = np.sqrt(values.min()) * vectors @ np.diag(values ** -0.5) @ vectors.T
    return alignment, alignment.sum(0)


def test_closed_form_and_aligned_system():
    rng = np.random.default_rng(0)
    for jacobian in (JACOBIAN, random_jacobian(rng, 3, 7), random_jacobian(rng, 4, 9)):
        num, size = jacobian.shape
        direction, weights, _ = aggregate(built(AlignedMTL(), num, size), jacobian, np.ones(num))
        alignment, expected = _aligned_numpy(jacobian)
        np.testing.assert_allclose(weights, expected, rtol=1e-3, atol=1e-4)
        aligned = alignment @ jacobian                                       # orthogonal, equal norms
        gram = aligned @ aligned.T
        np.testing.assert_allclose(gram, gram[0, 0] * np.eye(num), atol=1e-8 * np.abs(jacobian).max() ** 2 + 1e-6)
        np.testing.assert_allclose(direction, aligned.sum(0), rtol=1e-3, atol=1e-4)


def test_rank_deficient_and_single_task():
    jacobian = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    direction, weights, _ = aggregate(built(AlignedMTL(), 3, 2), jacobian, np.ones(3))
    np.testing.assert_allclose(weights, _aligned_numpy(jacobian)[1], rtol=1e-3, atol=1e-4)
    direction, _, _ = aggregate(built(AlignedMTL(), 1), JACOBIAN[:1], LOSSES[:1])
    np.testing.assert_allclose(direction, JACOBIAN[0], rtol=1e-5)
