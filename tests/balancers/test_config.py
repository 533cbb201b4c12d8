import numpy as np
from balancer_helpers import JACOBIAN, LOSSES, aggregate, built, random_jacobian

from keras_dbmtl.balancers import ConFIG


def _config_numpy(jacobian):
    units = jacobian / np.linalg.norm(jacobian, axis=1, keepdims=True)
    gv = np.linalg.pinv(units) @ np.ones(len(jacobian))
    gu = gv / np.linalg.norm(gv)
    return np.sum(jacobian @ gu) * gu


def test_closed_form_and_equal_cosines():
    rng = np.random.default_rng(0)
    for jacobian in (JACOBIAN, random_jacobian(rng, 3, 8), random_jacobian(rng, 4, 6)):
        num, size = jacobian.shape
        direction, _, heads = aggregate(built(ConFIG(), num, size), jacobian, np.ones(num))
        expected = _config_numpy(jacobian)
        np.testing.assert_allclose(direction, expected, rtol=1e-4, atol=1e-5 * np.linalg.norm(expected))
        cosines = jacobian @ direction / np.linalg.norm(jacobian, axis=1) / np.linalg.norm(direction)
        np.testing.assert_allclose(cosines, cosines[0], rtol=1e-4)
        assert cosines[0] > 0 and heads is None


def test_rank_deficient_and_single_task():
    jacobian = np.array([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])    # two parallel gradients
    direction, _, _ = aggregate(built(ConFIG(), 3), jacobian, np.ones(3))
    np.testing.assert_allclose(direction, _config_numpy(jacobian), rtol=1e-4, atol=1e-5)
    direction, _, _ = aggregate(built(ConFIG(), 1), JACOBIAN[:1], LOSSES[:1])
    np.testing.assert_allclose(direction, JACOBIAN[0], rtol=1e-5)
