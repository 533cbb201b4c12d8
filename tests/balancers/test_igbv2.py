import numpy as np
from balancer_helpers import built, combine, numpy

from keras_dbmtl.balancers import IGBv2


def test_warmup_weights_are_random_and_weight_log_losses():
    balancer = built(IGBv2(seed=0), 3)
    losses = np.array([2.0, 0.5, 1.5])
    for _ in range(5):
        loss, weights = combine(balancer, losses)
        np.testing.assert_allclose(weights.sum(), 3.0, rtol=1e-5)          # T softmax(N(0, I))
        np.testing.assert_allclose(loss, weights @ np.log(losses + 1e-8), rtol=1e-5)


def test_policy_gradient_step_against_numpy():
    balancer = built(IGBv2(seed=0, policy_learning_rate=0.1, warmup_epochs=1), 2)
    for epoch in range(2):                                                   # base epoch, then the policy acts
        for losses in ([2.0, 1.0], [1.0, 3.0]):
            combine(balancer, losses)
        balancer.on_epoch_end(epoch)
    base = np.array([1.5, 2.0])
    np.testing.assert_allclose(numpy(balancer.base_losses), base, rtol=1e-6)
    state = {name: numpy(getattr(balancer, name)) for name in (
        "policy_matrix", "policy_bias", "reward_mean", "advantage_scale", "previous_losses", "previous_state",
        "previous_action", "previous_mean")}
    losses = np.array([0.9, 2.0])
    _, weights = combine(balancer, losses)
    reward = np.min((state["previous_losses"] - losses) / base)
    advantage = reward - state["reward_mean"]
    scale = 0.99 * state["advantage_scale"] + 0.01 * advantage**2
    score = state["previous_action"] - state["previous_mean"]                 # sigma = 1
    step = 0.1 * advantage / np.sqrt(scale + 1e-12) * score
    np.testing.assert_allclose(numpy(balancer.policy_matrix),
                               state["policy_matrix"] + np.outer(step, state["previous_state"]), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(numpy(balancer.policy_bias), state["policy_bias"] + step, rtol=1e-4, atol=1e-6)
    # The action is drawn around the policy mean A s + b, s = l / l_base.
    mean = numpy(balancer.policy_matrix) @ (losses / base) + numpy(balancer.policy_bias)
    np.testing.assert_allclose(numpy(balancer.previous_mean), mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(weights, 2 * np.exp(numpy(balancer.previous_action)) /
                               np.exp(numpy(balancer.previous_action)).sum(), rtol=1e-5)
