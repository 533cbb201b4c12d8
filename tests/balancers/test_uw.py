import numpy as np
from balancer_helpers import built, combine, numpy, tensor

from keras_dbmtl import gradients
from keras_dbmtl.balancers import UW


def test_loss_and_weights_at_initialisation():
    balancer = built(UW(), 2)
    loss, weights = combine(balancer, [2.0, 0.5])
    s = -0.5
    np.testing.assert_allclose(loss, (2.0 + 0.5) / (2.0 * np.exp(s)) + 2 * s / 2.0, rtol=1e-6)
    np.testing.assert_allclose(weights, np.full(2, 1.0 / (2.0 * np.exp(s))), rtol=1e-6)


def test_gradient_of_log_variances():
    balancer = built(UW(initial_log_variance=0.3), 2)
    losses = np.array([2.0, 0.5])

    def forward():
        loss, _ = balancer.combine_losses(balancer.task_losses(tensor(losses)))
        return loss, None

    _, (grad,) = gradients.loss_gradients(forward, [balancer.log_variances])
    # d/ds [l / (2 e^s) + s / 2] = -l / (2 e^s) + 1/2; zero at s = log l.
    np.testing.assert_allclose(numpy(grad), -losses / (2.0 * np.exp(0.3)) + 0.5, rtol=1e-5)
    assert len(balancer.trainable_variables) == 1
