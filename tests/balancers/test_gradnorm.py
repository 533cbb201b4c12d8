import numpy as np
from balancer_helpers import JACOBIAN, LOSSES, aggregate, built, numpy, tensor
from keras import ops

from keras_dbmtl import gradients
from keras_dbmtl.balancers import GradNorm


def _l_grad(logits, norms, losses, initial, alpha):
    w = len(logits) * np.exp(logits) / np.exp(logits).sum()
    weighted = w * norms
    ratio = losses / initial
    target = weighted.mean() * (ratio / ratio.mean()) ** alpha
    return weighted, target


def test_logit_gradient_matches_finite_differences():
    balancer = built(GradNorm(alpha=1.5), 2)
    aggregate(balancer, JACOBIAN, LOSSES)                                    # step 1 sets l(0)
    logits = np.array([0.3, -0.2])
    balancer.logits.assign(logits.astype("float32"))
    losses = np.array([1.0, 0.45])
    jacobian = JACOBIAN * [[0.8], [1.1]]
    _, weights, heads = aggregate(balancer, jacobian, losses)
    norms = np.linalg.norm(jacobian, axis=1)
    w = 2 * np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(weights, w, rtol=1e-6)
    np.testing.assert_allclose(heads, w, rtol=1e-6)
    _, target = _l_grad(logits, norms, losses, LOSSES, 1.5)                   # the bracket: a constant

    def l_grad(s):
        weighted, _ = _l_grad(s, norms, losses, LOSSES, 1.5)
        return np.sum(np.abs(weighted - target))

    step = 1e-6
    numeric = [(l_grad(logits + step * e) - l_grad(logits - step * e)) / (2 * step) for e in np.eye(2)]
    np.testing.assert_allclose(numpy(balancer.logit_gradient), numeric, rtol=1e-4)


def test_carrier_passes_the_gradient_to_the_logits_without_changing_losses():
    balancer = built(GradNorm(), 2)
    balancer.logit_gradient.assign(np.array([0.7, -0.7], "float32"))
    losses = tensor([2.0, 0.5])
    np.testing.assert_allclose(numpy(balancer.transform_losses(losses)), [2.0, 0.5])

    def forward():
        return ops.sum(balancer.transform_losses(losses)), None

    _, (grad,) = gradients.loss_gradients(forward, [balancer.logits])
    np.testing.assert_allclose(numpy(grad), [0.7, -0.7], rtol=1e-6)


def test_single_task_and_first_step():
    _, weights, _ = aggregate(built(GradNorm(), 1), JACOBIAN[:1], LOSSES[:1])
    np.testing.assert_allclose(weights, [1.0])
    balancer = built(GradNorm(), 2)
    _, weights, _ = aggregate(balancer, JACOBIAN, LOSSES)
    np.testing.assert_allclose(weights, [1.0, 1.0])
    np.testing.assert_allclose(numpy(balancer.initial_losses), LOSSES)
