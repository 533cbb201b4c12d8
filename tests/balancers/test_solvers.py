"""Accuracy of the fixed-iteration solvers (the numbers quoted in keras_dbmtl/balancers/solvers.py)."""

import itertools

import numpy as np
import pytest
from balancer_helpers import compiled, numpy, tensor
from scipy.optimize import minimize

from keras_dbmtl.balancers import solvers

# Compiled like in a train step (also checks that the solvers compile: XLA on TensorFlow, jax.jit), once per T.
min_norm = compiled(solvers.min_norm_weights)
box_qp = compiled(solvers.box_qp_weights)
power_fair = {alpha: compiled(lambda g, a=alpha: solvers.power_fair_weights(g, a)) for alpha in (0.5, 1.0, 2.0, 8.0)}
cagrad = compiled(solvers.cagrad_weights)                                    # c traced: one compile per T


def _problems(seed=0):
    """Random Jacobians: generic, conflicting, rank-deficient (P < T), nearly collinear, badly scaled."""
    rng = np.random.default_rng(seed)
    cases = []
    for num in (2, 3, 10):
        cases.append(("generic", rng.normal(size=(num, 20))))
        conflicting = rng.normal(size=(num, 20))
        conflicting[1::2] = -0.8 * conflicting[0] + 0.2 * conflicting[1::2]
        cases.append(("conflicting", conflicting))
        cases.append(("rank-deficient", rng.normal(size=(num, max(1, num - 2)))))
        base = rng.normal(size=20)
        cases.append(("collinear", base + 1e-3 * rng.normal(size=(num, 20))))
        cases.append(("scaled", rng.normal(size=(num, 20)) * np.logspace(0, 2, num)[:, None]))
    return cases


def _exact_min_norm(gram):
    """float64 reference: the best feasible KKT point over all supports."""
    num = len(gram)
    best, best_value = None, np.inf
    for size in range(1, num + 1):
        for support in itertools.combinations(range(num), size):
            s = list(support)
            system = np.block([[2 * gram[np.ix_(s, s)], -np.ones((size, 1))], [np.ones((1, size)), np.zeros((1, 1))]])
            rhs = np.concatenate([np.zeros(size), [1.0]])
            solution = np.linalg.lstsq(system, rhs, rcond=None)[0][:size]
            if np.any(solution < -1e-12) or abs(solution.sum() - 1) > 1e-9:
                continue
            w = np.zeros(num)
            w[s] = np.maximum(solution, 0)
            value = w @ gram @ w
            if value < best_value:
                best, best_value = w, value
    return best


def test_simplex_projection():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(50, 6)) * 3
    projected = numpy(solvers.simplex_projection(tensor(values)))
    np.testing.assert_allclose(projected.sum(1), 1.0, rtol=1e-5)
    assert np.all(projected >= 0)
    for v, p in zip(values, projected):                                    # optimality: p = argmin ||p - v||
        result = minimize(lambda x: np.sum((x - v) ** 2), np.full(6, 1 / 6), bounds=[(0, 1)] * 6, method="SLSQP",
                          constraints={"type": "eq", "fun": lambda x: x.sum() - 1}, options={"ftol": 1e-14})
        np.testing.assert_allclose(p, result.x, atol=1e-5)


def test_min_norm_accuracy():
    worst = 0.0
    for _, jacobian in _problems():
        gram = jacobian @ jacobian.T
        weights = numpy(min_norm(tensor(gram)))
        assert np.all(weights >= 0) and abs(weights.sum() - 1) < 1e-5
        reference = _exact_min_norm(gram)
        scale = np.linalg.norm(jacobian, axis=1).max()
        worst = max(worst, np.linalg.norm((weights - reference) @ jacobian) / scale)
    assert worst <= 1e-6, worst


def test_box_qp_accuracy():
    worst_weights, worst_gap, worst_violation = 0.0, 0.0, 0.0
    for _, jacobian in _problems(1):
        num = len(jacobian)
        gram = jacobian @ jacobian.T
        gram = gram / np.trace(gram) + 1e-4 * np.eye(num)
        lower = np.eye(num) / num
        got = numpy(box_qp(tensor(gram), tensor(lower)))
        for t in range(num):
            result = minimize(lambda v: v @ gram @ v, lower[t] + 0.1, jac=lambda v: 2 * gram @ v, method="SLSQP",
                              bounds=[(lo, None) for lo in lower[t]], options={"ftol": 1e-16, "maxiter": 1000})
            worst_weights = max(worst_weights, np.abs(got[t] - result.x).max())
            worst_gap = max(worst_gap, got[t] @ gram @ got[t] - result.fun)
            assert np.all(got[t] >= lower[t] - 1e-7)
        # The solved problem's guarantee: no conflict under the (regularised, normalised) Gramian.
        worst_violation = max(worst_violation, -np.min(gram @ got.sum(0)))
    assert worst_gap <= 1e-8, worst_gap
    assert worst_weights <= 2e-4, worst_weights
    assert worst_violation <= 1e-6, worst_violation


_ON_THE_SIMPLEX = {"type": "eq", "fun": lambda w: w.sum() - 1, "jac": lambda w: np.ones_like(w)}


def _dual_gradient(b, phi, gram):
    """The gradient of CAGrad's dual w^T b + phi sqrt(w^T G w), for SLSQP (its finite differences were most of
    these tests' time)."""
    return lambda w: b + phi * gram @ w / np.sqrt(max(w @ gram @ w, 1e-300))


def test_cagrad_accuracy():
    worst, worst_collinear = 0.0, 0.0
    for (kind, jacobian), c in itertools.product(_problems(2), (0.2, 0.5, 1.0)):
        num = len(jacobian)
        gram = jacobian @ jacobian.T
        phi = c * np.sqrt(max(gram.mean(), 0))
        objective = lambda w: w @ gram.mean(1) + phi * np.sqrt(max(w @ gram @ w, 0))   # noqa: E731
        got = numpy(cagrad(tensor(gram), tensor(c)))
        starts = [np.full(num, 1 / num)] + list(np.eye(num))
        best = min(
            objective(minimize(objective, x0, jac=_dual_gradient(gram.mean(1), phi, gram), bounds=[(0, 1)] * num,
                               method="SLSQP", options={"ftol": 1e-15}, constraints=_ON_THE_SIMPLEX).x)
            for x0 in starts
        )
        gap = (objective(got) - best) / np.abs(gram).max()
        if kind == "collinear":
            worst_collinear = max(worst_collinear, gap)
        else:
            worst = max(worst, gap)
    assert worst <= 1e-7, worst
    # Cosines > 0.99999: the float32 Gramian resolves the differences between the gradients only to ~1e-3.
    assert worst_collinear <= 1e-3, worst_collinear


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 8.0])
def test_power_fair_residual(alpha):
    worst = 0.0
    for _, jacobian in _problems(3):
        gram = jacobian @ jacobian.T
        if np.linalg.matrix_rank(gram) < len(gram):
            continue                                  # the equation may have no positive solution
        gram = gram / np.linalg.norm(gram)
        w = numpy(power_fair[alpha](tensor(gram)))
        assert np.all(w > 0)
        target = w ** (-1 / alpha)
        worst = max(worst, np.linalg.norm(gram @ w - target) / np.linalg.norm(target))
    assert worst <= 2e-5, worst


def test_min_norm_and_cagrad_with_norms_spanning_1e4():
    # Issue 16: the fixed ridge 1e-6 of the active-set solves left MGDA's direction 17 degrees off and CAGrad's
    # dual objective 3x its optimum once gradient norms spanned 1e3-1e4.
    rng = np.random.default_rng(5)
    worst_direction, worst_objective = 0.0, 0.0
    for _ in range(4):
        jacobian = rng.normal(size=(5, 8))
        jacobian[1::2] = -0.8 * jacobian[0] + 0.2 * jacobian[1::2]
        jacobian *= np.logspace(0, 4, 5)[rng.permutation(5)][:, None]
        jacobian = jacobian.astype("float32").astype("float64")
        gram = jacobian @ jacobian.T
        weights = numpy(min_norm(tensor(gram)))
        reference = _exact_min_norm(gram / np.abs(gram).max())
        scale = np.linalg.norm(jacobian, axis=1).max()
        worst_direction = max(worst_direction, np.linalg.norm((weights - reference) @ jacobian) / scale)
        normalized = gram / np.abs(gram).max()
        b, phi = normalized.mean(1), 0.5 * np.sqrt(normalized.mean())
        dual = lambda w: w @ b + phi * np.sqrt(max(w @ normalized @ w, 0.0))                # noqa: E731
        best = min((minimize(dual, start, jac=_dual_gradient(b, phi, normalized), bounds=[(0, 1)] * 5,
                             method="SLSQP", constraints=_ON_THE_SIMPLEX,
                             options={"ftol": 1e-16, "maxiter": 2000}).fun for start in np.eye(5) * 0.9 + 0.02))
        ours = dual(numpy(cagrad(tensor(gram), 0.5)))
        worst_objective = max(worst_objective, (ours - best) / abs(best))
    assert worst_direction <= 1e-6, worst_direction
    assert worst_objective <= 1e-4, worst_objective
