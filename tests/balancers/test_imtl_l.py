import numpy as np
from balancer_helpers import built, combine, numpy, tensor

from keras_dbmtl import gradients
from keras_dbmtl.balancers import IMTLL


def test_loss_weights_and_scale_gradient():
    balancer = built(IMTLL(), 2)
    losses = np.array([2.0, 0.5])
    balancer.scales.assign(np.array([0.2, -0.4], "float32"))
    loss, weights = combine(balancer, losses)
    s = np.array([0.2, -0.4])
    np.testing.assert_allclose(loss, np.sum(np.exp(s) * losses - s), rtol=1e-6)
    np.testing.assert_allclose(weights, np.exp(s), rtol=1e-6)

    def forward():
        return balancer.combine_losses(balancer.task_losses(tensor(losses)))[0], None

    _, (grad,) = gradients.loss_gradients(forward, [balancer.scales])
    np.testing.assert_allclose(numpy(grad), np.exp(s) * losses - 1.0, rtol=1e-5)   # minimiser: s = -log l
