import numpy as np
from balancer_helpers import built

from keras_dbmtl.balancers import MTAdam
from balancer_helpers import aggregate


def _mtadam_numpy(steps, b1=0.9, b2=0.999, b3=0.9, eps=1e-8):
    """The official per-tensor algorithm (ranks = 1, lr = 1), on a list of [(T, n_v) blocks] per step."""
    num_vars = len(steps[0])
    num_tasks = steps[0][0].shape[0]
    m = [np.zeros_like(b) for b in steps[0]]
    u = [np.zeros_like(b) for b in steps[0]]
    norms = np.ones((num_tasks, num_vars))
    directions = []
    for k, blocks in enumerate(steps, start=1):
        direction = []
        for v, block in enumerate(blocks):
            scaled = []
            for t in range(num_tasks):
                current = np.linalg.norm(block[t])
                norms[t, v] = current if k == 1 else b3 * norms[t, v] + (1 - b3) * current
                g = block[t]
                if norms[t, v] > 1e-10:
                    anchor = next(a for a in range(num_tasks) if norms[a, v] > 1e-10)
                    g = norms[anchor, v] * g / norms[t, v]
                scaled.append(g)
            scaled = np.array(scaled)
            m[v] = b1 * m[v] + (1 - b1) * scaled
            u[v] = b2 * u[v] + (1 - b2) * scaled**2
            denominator = np.max(np.sqrt(u[v]) / np.sqrt(1 - b2**k) + eps, axis=0)
            direction.append(np.sum(m[v] / denominator, axis=0) / (1 - b1**k))
        directions.append(np.concatenate(direction))
    return directions


def test_three_steps_against_the_official_algorithm():
    rng = np.random.default_rng(0)
    steps = [[rng.normal(size=(3, 4)) * [[1.0], [10.0], [0.1]], rng.normal(size=(3, 2))] for _ in range(3)]
    steps[1][1][2] = 0.0                                                      # a task without gradient here
    expected = _mtadam_numpy(steps)
    balancer = built(MTAdam(), 3, 6)
    for blocks, reference in zip(steps, expected):
        jacobian = np.concatenate(blocks, axis=1)
        direction, weights, _ = aggregate(balancer, jacobian, np.ones(3), blocks=blocks)
        np.testing.assert_allclose(direction, reference, rtol=1e-4, atol=1e-5)
    assert np.all(np.isfinite(weights))


def test_single_task_first_step_is_adam_sign():
    balancer = built(MTAdam(), 1, 3)
    gradient = np.array([[2.0, -0.5, 0.0]])
    direction, _, _ = aggregate(balancer, gradient, [1.0])
    np.testing.assert_allclose(direction, [1.0, -1.0, 0.0], atol=1e-5)       # Adam's first step: g / |g|
