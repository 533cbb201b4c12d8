import numpy as np
from balancer_helpers import aggregate, built, numpy

from keras_dbmtl.balancers import MetaBalance


def _metabalance_numpy(steps, target, r=0.7, beta=0.9):
    averages = np.zeros((steps[0][0].shape[0], len(steps[0])))
    directions = []
    for blocks in steps:
        pieces = []
        for v, block in enumerate(blocks):
            averages[:, v] = beta * averages[:, v] + (1 - beta) * np.linalg.norm(block, axis=1)
            scale = r * averages[target, v] / averages[:, v] + (1 - r)
            pieces.append(np.sum(scale[:, None] * block, axis=0))
        directions.append(np.concatenate(pieces))
    return directions


def test_two_steps_against_numpy_and_target_by_name():
    rng = np.random.default_rng(0)
    steps = [[rng.normal(size=(3, 4)) * [[1.0], [10.0], [0.1]], rng.normal(size=(3, 2))] for _ in range(2)]
    for target, index in ((0, 0), ("c", 2)):
        balancer = built(MetaBalance(target=target), 3, 6, ["a", "b", "c"])
        for blocks, expected in zip(steps, _metabalance_numpy(steps, index)):
            direction, weights, heads = aggregate(balancer, np.concatenate(blocks, 1), np.ones(3), blocks=blocks)
            np.testing.assert_allclose(direction, expected, rtol=1e-5)
            assert heads is None
        np.testing.assert_allclose(weights[index], 1.0, rtol=1e-6)


def test_magnitudes_pulled_to_the_target():
    # r -> 1: every task's per-variable gradient takes the target's magnitude (after the first average).
    blocks = [np.array([[3.0, 4.0], [0.3, 0.4]])]
    balancer = built(MetaBalance(relax_factor=0.999), 2, 2)
    direction, _, _ = aggregate(balancer, blocks[0], np.ones(2), blocks=blocks)
    np.testing.assert_allclose(direction, [3.0 + 3.0 * 0.999 + 0.3 * 0.001, 4.0 + 4.0 * 0.999 + 0.4 * 0.001],
                               rtol=1e-4)
    assert numpy(balancer.magnitudes).shape == (2, 2)
