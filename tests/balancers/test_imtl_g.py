import numpy as np
from balancer_helpers import JACOBIAN, LOSSES, aggregate, built, numpy, random_jacobian, tensor

from keras_dbmtl import gradients
from keras_dbmtl.balancers import IMTL, IMTLG


def _imtl_g_numpy(gradients_):
    units = gradients_ / np.linalg.norm(gradients_, axis=1, keepdims=True)
    d = gradients_[0] - gradients_[1:]
    u = units[0] - units[1:]
    rest = gradients_[0] @ u.T @ np.linalg.inv(d @ u.T)
    return np.concatenate([[1 - rest.sum()], rest])


def test_closed_form_and_equal_projections():
    rng = np.random.default_rng(0)
    for jacobian in (JACOBIAN, random_jacobian(rng, 4, 9)):
        num = len(jacobian)
        direction, weights, _ = aggregate(built(IMTLG(), num, jacobian.shape[1]), jacobian, np.ones(num))
        np.testing.assert_allclose(weights, _imtl_g_numpy(jacobian), rtol=1e-4, atol=1e-5)
        projections = jacobian @ direction / np.linalg.norm(jacobian, axis=1)
        np.testing.assert_allclose(projections, projections[0], rtol=1e-4)    # d . u_t equal for all t
        np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-5)


def test_single_task():
    direction, weights, _ = aggregate(built(IMTLG(), 1), JACOBIAN[:1], LOSSES[:1])
    np.testing.assert_allclose(direction, JACOBIAN[0], rtol=1e-6)


def test_hybrid_scales_losses_before_the_gradients():
    balancer = built(IMTL(), 2)
    balancer.scales.assign(np.array([0.5, -1.0], "float32"))
    s, losses = np.array([0.5, -1.0]), np.array([2.0, 0.5])
    transformed = balancer.transform_losses(tensor(losses))
    np.testing.assert_allclose(numpy(transformed), np.exp(s) * losses - s, rtol=1e-6)
    np.testing.assert_allclose(numpy(balancer.untransform_losses(transformed)), losses, rtol=1e-5)

    def forward():
        return balancer.transform_losses(tensor(losses)), None

    from keras import ops

    def summed():
        value, _ = forward()
        return ops.sum(value), None

    _, (grad,) = gradients.loss_gradients(summed, [balancer.scales])
    np.testing.assert_allclose(numpy(grad), np.exp(s) * losses - 1.0, rtol=1e-5)  # IMTL-L's update of s
    direction, weights, _ = aggregate(balancer, JACOBIAN, losses)
    np.testing.assert_allclose(weights, _imtl_g_numpy(JACOBIAN), rtol=1e-4)
