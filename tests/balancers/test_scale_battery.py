"""Scale battery: every solver-based or normalising balancer against an independent float64 solution of its own
problem, on inputs a user meets (issue 16).

Inputs (`_cases`): gradient norms from 1e-6 to 1e6, spanning 1e4 within most problems; losses from 1e-4 to 1e4;
collinear and anti-collinear pairs; rank-deficient Jacobians (P < T); T = 2, 5 and 40. The balancers run as in a
train step (float32 tensors, compiled on JAX and TensorFlow, one fresh state per problem); each reference is
computed here in float64 from the definition, by a different route than the code's:

- MGDA: the min-norm point of the convex hull by NNLS (Lawson-Hanson, exact active set): for u >= 0 minimising
  ||J^T u||^2 + (1^T u - 1)^2, w* = u / 1^T u (at fixed 1^T u = s the objective is s^2 ||J^T w||^2 + (s - 1)^2);
- CAGrad: the dual by SLSQP at ftol 1e-16 from several starts (best kept), then Algorithm 1's direction;
- UPGrad: each box QP by bounded-variable least squares (`scipy.optimize.lsq_linear`, BVLS) on a Cholesky factor;
- Nash-MTL / FairGrad: Newton's method in float64 on G w = w^(-1/alpha), to a relative residual of 1e-13;
- IMTL-G: the paper's closed form on the vectors (least squares); Aligned-MTL: float64 `eigh`; ConFIG: the
  pseudo-inverse of the unit gradients (T x P, SVD); PCGrad / GradVac: Algorithm 1 on the vectors; DB-MTL: Eq. (2).

The accuracy asserted for each method is the one its docstring states (`STATED`); the measured worst case is
printed by `python tests/balancers/test_scale_battery.py`.
"""

import functools

import keras
import numpy as np
import pytest
from keras import ops
from scipy.linalg import cholesky
from scipy.optimize import lsq_linear, minimize, nnls

from keras_dbmtl._utils import compile_like_a_train_step
from keras_dbmtl.balancers import (
    CAGrad, ConFIG, DBMTL, FairGrad, GradVac, IMTLG, MGDA, AlignedMTL, NashMTL, PCGrad, TaskJacobian, UPGrad,
)

NUM_PARAMETERS = 48                                 # every problem padded with zero columns: one compile per T
TASK_COUNTS = (2, 5, 40)


# ----------------------------------------------------------------------------------------------------- adapter
# The one place that knows the balancer interface (build / task_losses / aggregate / Aggregation).
def _new(balancer, num_tasks):
    balancer.build(num_tasks, NUM_PARAMETERS)
    return balancer


def _aggregate_fn(balancer):
    num = balancer.num_tasks

    def step(losses, jacobian):
        result = balancer.aggregate(balancer.task_losses(losses), TaskJacobian([jacobian], num))
        direction = result.shared_direction
        if direction is None:
            direction = ops.matmul(result.task_weights[None, :], jacobian)[0]
        heads = result.head_weights if result.head_weights is not None else ops.ones((num,), "float32")
        return direction, result.task_weights, heads

    return step


class _Runner:
    """Calls one balancer as a train step does: stateless, compiled (jax.jit / tf.function with XLA), every call
    from the state the balancer had right after `build` (a fresh balancer per problem, one compile per T)."""

    def __init__(self, balancer):
        self.balancer = balancer
        self.variables = list(balancer.variables)
        self.initial = [ops.convert_to_tensor(v.value) for v in self.variables]
        step = _aggregate_fn(balancer)

        def stateless(values, losses, jacobian):
            with keras.StatelessScope(state_mapping=list(zip(self.variables, values))):
                return step(losses, jacobian)

        self.stateless = compile_like_a_train_step(stateless)

    def __call__(self, jacobian, losses):
        jacobian = ops.convert_to_tensor(np.asarray(jacobian, "float32"))
        losses = ops.convert_to_tensor(np.asarray(losses, "float32"))
        outputs = self.stateless(self.initial, losses, jacobian)
        return tuple(np.asarray(ops.convert_to_numpy(x), "float64") for x in outputs)


# ------------------------------------------------------------------------------------------------------ inputs
def _unit_rows(rng, num, rank):
    rows = rng.normal(size=(num, rank))
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _problem(rows, norms, rng):
    jacobian = np.zeros((len(rows), NUM_PARAMETERS))
    jacobian[:, : rows.shape[1]] = rows * np.asarray(norms)[:, None]
    jacobian = jacobian.astype("float32").astype("float64")          # what the balancer sees, exactly
    losses = 10.0 ** rng.uniform(-4.0, 4.0, size=len(rows))
    return jacobian, losses


def _cases(seed=0):
    """(name, T, Jacobian (T, 48) float32-exact, losses). Norms 10^e .. 10^(e+4) with e in {-6, -2, 2}."""
    rng = np.random.default_rng(seed)
    cases = []
    for num in TASK_COUNTS:
        for low in ((-6.0, -2.0, 2.0) if num < 40 else (-2.0,)):                  # T = 40 at one scale: fast
            spread = 10.0 ** (low + rng.permutation(np.linspace(0.0, 4.0, num)))
            cases.append((f"generic T={num} 1e{low:+.0f}x1e4", num, *_problem(_unit_rows(rng, num, min(num + 3, 40)),
                                                                        spread, rng)))
            conflicting = _unit_rows(rng, num, min(num + 3, 40))
            conflicting[1::2] = -0.8 * conflicting[0] + 0.2 * conflicting[1::2]
            conflicting /= np.linalg.norm(conflicting, axis=1, keepdims=True)
            cases.append((f"conflicting T={num} 1e{low:+.0f}x1e4", num, *_problem(conflicting, spread, rng)))
            same = np.full(num, 10.0 ** (low + 2.0))
            cases.append((f"equal norms T={num} 1e{low + 2:+.0f}", num, *_problem(_unit_rows(rng, num, min(num + 3, 40)),
                                                                         same, rng)))
        rank = 2 if num < 40 else 6
        spread = 10.0 ** rng.permutation(np.linspace(-2.0, 2.0, num))
        cases.append((f"rank {rank} T={num} 1e-2x1e4", num, *_problem(_unit_rows(rng, num, rank), spread, rng)))
    for low in (-6.0, 0.0, 6.0):
        base = _unit_rows(rng, 1, 8)
        for sign, label in ((1.0, "collinear"), (-1.0, "anti-collinear")):
            for ratio in (1.0, 1e4):
                rows = np.concatenate([base, sign * base])
                norms = 10.0 ** low * np.array([1.0, ratio]) / np.sqrt(ratio)
                cases.append((f"{label} T=2 1e{low:+.0f} ratio {ratio:g}", 2, *_problem(rows, norms, rng)))
    return cases


CASES = _cases()


# -------------------------------------------------------------------------------------------------- references
def _min_norm_weights(vectors):
    scale = np.max(np.linalg.norm(vectors, axis=1))
    system = np.concatenate([vectors.T / scale, np.ones((1, len(vectors)))])
    target = np.zeros(system.shape[0])
    target[-1] = 1.0
    u, _ = nnls(system, target, maxiter=50 * len(vectors))
    return u / u.sum()


def _mgda_normalizers(jacobian, losses, normalization):
    norms = np.linalg.norm(jacobian, axis=1)
    return {"none": np.ones_like(norms), "l2": norms, "loss": losses, "loss+": losses * norms}[normalization]


def _cagrad_direction(jacobian, c=0.5):
    num = len(jacobian)
    scale = np.max(np.linalg.norm(jacobian, axis=1))
    vectors = jacobian / scale
    gram = vectors @ vectors.T
    g0 = vectors.mean(0)
    b = gram.mean(1)
    phi = c * np.linalg.norm(g0)

    def objective(w):
        return w @ b + phi * np.sqrt(max(w @ gram @ w, 0.0))

    def gradient(w):            # analytic: SLSQP's finite differences cost 27 s of the battery per backend
        return b + phi * gram @ w / np.sqrt(max(w @ gram @ w, 1e-300))

    starts = [np.full(num, 1.0 / num)] + [np.eye(num)[t] * 0.9 + 0.1 / num for t in range(min(num, 2))]
    best = None
    for start in starts:
        result = minimize(objective, start, jac=gradient, bounds=[(0, 1)] * num, method="SLSQP",
                          constraints={"type": "eq", "fun": lambda w: w.sum() - 1, "jac": lambda w: np.ones(num)},
                          options={"ftol": 1e-16, "maxiter": 2000})
        if best is None or result.fun < best.fun:
            best = result
    gw = best.x @ vectors
    if phi == 0.0:                                                                 # g_0 = 0: d = g_0
        return np.zeros(jacobian.shape[1])
    direction = g0 + phi * gw / np.linalg.norm(gw)
    return scale * direction / (1.0 + c * c)


def _power_fair(gram, alpha):
    """Newton on G w = w^(-1/alpha) in float64, in the variables w = v / sqrt(diag G) (a diagonal rescaling)."""
    scale = np.sqrt(np.diag(gram))
    cosines = gram / np.outer(scale, scale)
    coefficient = scale ** (1.0 / alpha - 1.0)                     # C v = coefficient * v^(-1/alpha)
    v = np.ones(len(gram)) * coefficient ** (alpha / (1.0 + alpha))

    def residual(x):
        return cosines @ x - coefficient * x ** (-1.0 / alpha)

    for _ in range(200):
        r = residual(v)
        if np.linalg.norm(r) <= 1e-14 * np.linalg.norm(coefficient * v ** (-1.0 / alpha)):
            break
        jac = cosines + np.diag(coefficient / alpha * v ** (-1.0 / alpha - 1.0))
        step = np.linalg.solve(jac, r)
        size = 1.0
        while np.any(v - size * step <= 0) or np.linalg.norm(residual(v - size * step)) > np.linalg.norm(r):
            size /= 2.0
            if size < 1e-12:
                break
        v = v - size * step
    assert np.linalg.norm(residual(v)) <= 1e-12 * np.linalg.norm(coefficient * v ** (-1.0 / alpha))
    return v / scale


def _upgrad_weights(jacobian, norm_eps=1e-4, reg_eps=1e-4):
    num = len(jacobian)
    gram = jacobian @ jacobian.T
    trace = np.trace(gram)
    normalized = np.zeros_like(gram) if trace < norm_eps else gram / trace
    factor = cholesky(normalized + reg_eps * np.eye(num))          # G = R^T R: v^T G v = ||R v||^2
    total = np.zeros(num)
    for t in range(num):
        lower = np.eye(num)[t] / num
        total += lsq_linear(factor, np.zeros(num), bounds=(lower, np.inf), method="bvls", tol=1e-15).x
    return total


def _imtl_g_direction(jacobian):
    """The paper's defining conditions as one linear system: d = J^T alpha, (u_1 - u_t) . d = 0, sum alpha = 1."""
    units = jacobian / np.linalg.norm(jacobian, axis=1, keepdims=True)
    system = np.concatenate([(units[0] - units[1:]) @ jacobian.T, np.ones((1, len(jacobian)))])
    target = np.zeros(len(jacobian))
    target[-1] = 1.0
    return np.linalg.solve(system, target) @ jacobian


def _aligned_direction(jacobian):
    num = len(jacobian)
    eigenvalues, vectors = np.linalg.eigh(jacobian @ jacobian.T)
    kept = eigenvalues > num * 1.1920929e-07 * eigenvalues.max()
    inverse_sqrt = (vectors[:, kept] / np.sqrt(eigenvalues[kept])) @ vectors[:, kept].T
    return np.sqrt(eigenvalues[kept].min()) * inverse_sqrt.sum(0) @ jacobian


def _config_direction(jacobian):
    units = jacobian / np.linalg.norm(jacobian, axis=1, keepdims=True)
    best = np.linalg.pinv(units, rcond=(len(units) * 1.1920929e-07) ** 0.5) @ np.ones(len(units))
    if np.linalg.norm(best) < 1e-6:                                              # 1 outside the range: g_v = 0
        return np.zeros(jacobian.shape[1])
    unit = best / np.linalg.norm(best)
    return np.sum(jacobian @ unit) * unit


def _surgery_direction(jacobian, order, beta=None):
    """PCGrad (beta None) or GradVac with zero targets (first step) on the vectors, Algorithm 1 of each paper."""
    total = np.zeros(jacobian.shape[1])
    for i in range(len(jacobian)):
        g = jacobian[i].copy()
        for j in order[i]:
            if j == i:
                continue
            inner = g @ jacobian[j]
            if beta is None and inner < 0:
                g = g - inner / (jacobian[j] @ jacobian[j]) * jacobian[j]
            elif beta is not None:
                phi = inner / (np.linalg.norm(g) * np.linalg.norm(jacobian[j]))
                if phi < 0.0:                                                      # target 0: sqrt(1 - 0) = 1
                    g = g - np.linalg.norm(g) * phi / np.linalg.norm(jacobian[j]) * jacobian[j]
        total += g
    return total


def _dbmtl_direction(jacobian, beta=0.9, eps=1e-8):
    ema = (1.0 - beta) * jacobian                                                 # first step, ema_0 = 0
    norms = np.linalg.norm(ema, axis=1)
    return norms.max() * np.sum(ema / (norms + eps)[:, None], axis=0)


@functools.lru_cache(maxsize=None)
def _order(seed, num):
    """The random task order a freshly seeded PCGrad/GradVac draws (an input of the algorithm, not its output),
    drawn in a compiled function as the balancer's is (TensorFlow's XLA and eager random streams differ). Cached:
    the draw depends on (seed, T) only, and one compile per T serves every case."""
    generator = keras.random.SeedGenerator(seed)
    keys = compile_like_a_train_step(lambda: keras.random.uniform((num, num), seed=generator))()
    return np.argsort(np.asarray(ops.convert_to_numpy(keys)), axis=1)


# ------------------------------------------------------------------------------------------------------ errors
def _relative(difference, scale):
    return float(np.linalg.norm(difference) / scale)


def _mgda_error(normalization):
    def error(run, jacobian, losses):
        _, weights, heads = run(jacobian, losses)
        vectors = jacobian / _mgda_normalizers(jacobian, losses, normalization)[:, None]
        reference = _min_norm_weights(vectors)
        assert np.allclose(heads, weights)
        return _relative((weights - reference) @ vectors, np.max(np.linalg.norm(vectors, axis=1)))

    return error


def _cagrad_error(run, jacobian, losses):
    direction, _, _ = run(jacobian, losses)
    scale = max(np.linalg.norm(jacobian.mean(0)), 1e-3 * np.max(np.linalg.norm(jacobian, axis=1)))
    return _relative(direction - _cagrad_direction(jacobian), scale)


def _power_fair_error(alpha):
    def error(run, jacobian, losses):
        _, weights, heads = run(jacobian, losses)
        reference = _power_fair(jacobian @ jacobian.T, alpha)
        assert np.allclose(heads, weights)
        return float(np.max(np.abs(weights / reference - 1.0)))

    return error


def _upgrad_error(run, jacobian, losses):
    _, weights, _ = run(jacobian, losses)
    return _relative((weights - _upgrad_weights(jacobian)) @ jacobian, np.max(np.linalg.norm(jacobian, axis=1)))


def _direction_error(reference):
    """||d - d*|| / ||d*||, or / max_t ||g_t|| where d* cancels to below 1e-3 of that (anti-collinear pairs)."""
    def error(run, jacobian, losses):
        direction, _, _ = run(jacobian, losses)
        expected = reference(jacobian)
        scale = np.max(np.linalg.norm(jacobian, axis=1))
        return _relative(direction - expected, max(np.linalg.norm(expected), 1e-3 * scale))

    return error


def _surgery_error(beta):
    def error(run, jacobian, losses):
        direction, _, _ = run(jacobian, losses)
        expected = _surgery_direction(jacobian, _order(3, len(jacobian)), beta)
        return _relative(direction - expected, np.max(np.linalg.norm(jacobian, axis=1)))

    return error


def _full_rank(name):
    return "rank" not in name and "collinear" not in name


def _no_collinear_pair(name):
    return "collinear" not in name or name.startswith("collinear")


# name: (balancer factory, error function, which cases, the accuracy its docstring states)
METHODS = {
    "mgda-none": (lambda: MGDA(normalization="none"), _mgda_error("none"), None),
    "mgda-l2": (lambda: MGDA(normalization="l2"), _mgda_error("l2"), None),
    "mgda-loss": (lambda: MGDA(normalization="loss"), _mgda_error("loss"), None),
    "mgda-loss+": (lambda: MGDA(), _mgda_error("loss+"), None),
    "cagrad": (lambda: CAGrad(), _cagrad_error, None),
    "nash_mtl": (lambda: NashMTL(max_norm=0.0), _power_fair_error(1.0), _full_rank),
    "fairgrad": (lambda: FairGrad(), _power_fair_error(1.0), _full_rank),
    "fairgrad-2": (lambda: FairGrad(alpha=2.0), _power_fair_error(2.0), _full_rank),
    "upgrad": (lambda: UPGrad(), _upgrad_error, None),
    "imtl_g": (lambda: IMTLG(), _direction_error(_imtl_g_direction), _full_rank),
    "aligned_mtl": (lambda: AlignedMTL(), _direction_error(_aligned_direction), None),
    "config": (lambda: ConFIG(), _direction_error(_config_direction), None),
    "gradvac": (lambda: GradVac(seed=3), _surgery_error(0.01), None),
    "pcgrad": (lambda: PCGrad(seed=3), _surgery_error(None), None),
    "dbmtl": (lambda: DBMTL(), _direction_error(_dbmtl_direction), None),
}


def _errors(method):
    factory, error, select = METHODS[method]
    runners, errors = {}, {}
    for name, num, jacobian, losses in CASES:
        if select is not None and not select(name):
            continue
        if num not in runners:
            runners[num] = _Runner(_new(factory(), num))
        errors[name] = error(runners[num], jacobian, losses)
    return errors


# The accuracy each docstring states (float32 balancer against the float64 reference, over this battery).
STATED = {
    "mgda-none": 1e-4, "mgda-l2": 1e-4, "mgda-loss": 1e-4, "mgda-loss+": 1e-4,      # solvers.min_norm_weights
    "cagrad": 1e-4, "nash_mtl": 1e-3, "fairgrad": 1e-3, "fairgrad-2": 3e-3, "upgrad": 2e-5,
    "imtl_g": 0.3, "aligned_mtl": 5e-2, "config": 2e-2, "gradvac": 1e-5, "pcgrad": 1e-5, "dbmtl": 3e-5,
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_stated_accuracy_over_the_battery(method):
    errors = _errors(method)
    assert errors and all(np.isfinite(list(errors.values()))), errors
    for name, error in errors.items():
        assert error <= STATED[method], (method, name, error, STATED[method])


if __name__ == "__main__":
    import sys

    import time

    for method in sys.argv[1:] or METHODS:
        begin = time.time()
        errors = _errors(method)
        print(f"{method} {time.time() - begin:.1f} s", flush=True)
        worst = sorted(errors.items(), key=lambda item: -item[1])[:3]
        print(f"{method:12s} worst " + "; ".join(f"{e:.1e} ({n})" for n, e in worst), flush=True)
