"""Small solvers shared by the gradient balancers, written in `keras.ops` so they run inside the compiled train step.

Every solver works on the T x T Gramian G = J J^T (T = number of tasks, small), never on the T x P Jacobian, and
runs a *fixed* number of iterations (`ops.fori_loop`). Why not scipy/cvxpy/quadprog as the reference
implementations do: a host round trip per training step would break `jit_compile` on TensorFlow and `jax.jit`,
and cost a device sync on every backend. A fixed count keeps the step one compiled program; the counts below are
chosen so that the answers match a float64 reference solve on the problems of `tests/balancers/test_solvers.py`
and of the scale battery `tests/balancers/test_scale_battery.py` (float32; T = 2..40; gradient norms 1e-6..1e6
spanning 1e4 within a problem; collinear, anti-collinear, rank-deficient). The active-set solves are
Jacobi-scaled, so their ridge is relative to each task's own scale (a fixed ridge 1e-6 failed once norms spanned
1e3-1e4: MGDA 17 degrees off, CAGrad's dual 3x its optimum).

- `min_norm_weights` (MGDA): accelerated projected gradient (FISTA with adaptive restart), 100 iterations, then
  2T + 4 steps of an exact primal active-set method (closed-form minimiser on each support).
  Direction error ||d - d*|| <= 1e-4 max_t ||g_t|| (measured over the battery: <= 5e-8 for most problems,
  6e-5 for a rank-deficient "l2"-normalised T = 40 problem (P = 6)).
- `box_qp_weights` (UPGrad): the same scheme for min v^T G v s.t. v >= u, the T problems batched.
  Objective gap <= 1e-8 (trace-normalised G), weights within 2e-4 of a float64 SLSQP solve (measured 3e-5, on
  Gramians with condition number 1e4), worst conflict (J d)_t >= -1e-5 max_t ||g_t||^2.
- `cagrad_weights` (CAGrad): projected gradient with a locally adapted step, 200 iterations, then the active-set
  steps (closed form on each support; on a face without minimiser, a line search along its unbounded ray).
  Objective within 1e-7 max|G| of the best of several SLSQP solves on `test_solvers.py`'s problems; over the
  battery CAGrad's direction is within 1e-4 ||g_0|| (measured 5.8e-6).
- `power_fair_weights` (Nash-MTL: alpha = 1, FairGrad: alpha in [0.5, 8] tested): Newton's method with a
  16-point line search, 30 iterations. Residual ||G w - w^(-1/alpha)|| / ||w^(-1/alpha)|| <= 2e-5 (measured
  9e-6) on full-rank Gramians (a rank-deficient G may have no positive solution). Nash-MTL and FairGrad call it
  on the cosine matrix (see their files), so the norms' spread does not reach float32.
- Every linear solve is `_eliminate`: on JAX and TensorFlow `_gauss_jordan` in `keras.ops` (no `ops.solve`:
  torch's checks its result on the host, 126-270 device syncs per step for these methods, issue 18; now 0,
  counted with torch's profiler as `benchmarks/step_time.py` does); on torch, which runs the solvers eagerly,
  one batched LU call without the host check (`torch.linalg.solve_ex(check_errors=False)`): the Gauss-Jordan
  loop's ~12 n eager operations made UPGrad's step at T = 40 take seconds (54 ms against 0.7 ms for a
  (40, 40, 40) solve on 2 CPU cores, issue 25).
- `psd_power`: pseudo-inverse / inverse square root of the Gramian by `eigh` (ConFIG, Aligned-MTL).
- `adam_update`: Adam on a small state vector (FAMO's logits), for balancers that own an optimiser.
"""

import keras
from keras import ops

MIN_NORM_ITERATIONS = 100
BOX_QP_ITERATIONS = 100
CAGRAD_ITERATIONS = 200
NEWTON_ITERATIONS = 30
VANISHING = 1e-7


def one_hot(indices, num, dtype):
    """`ops.one_hot` by comparison: torch's one_hot reads its indices back to the host (a device sync per call,
    measured in `benchmarks/`), a comparison with `arange` does not."""
    return ops.cast(ops.expand_dims(indices, -1) == ops.arange(num, dtype=indices.dtype), dtype)


def _solve(system, rhs, ridge=1e-6, refinements=3):
    """system^-1 rhs for the active-set steps, by LU on the Jacobi-scaled system S = D^-1/2 system D^-1/2
    (unit diagonal, D = diag(system)) plus ridge I, with two steps of iterative refinement against the
    unregularised S. The ridge is thus relative to each row's own scale: gradient norms spanning 1e4 (diagonal
    entries 1e8 apart) leave S as well conditioned as the tasks' cosines, and the error shrinks like
    (ridge / lambda_min(S))^3, exact to float32 for every non-singular S. (A fixed ridge on the system itself
    swamped the small rows: 17 degrees off the min-norm point at a 1e4 spread.) Exactly singular systems (supports
    of P < T gradients, collinear pairs) stay finite, where `ops.solve` raises on TensorFlow and torch; the
    elimination is `_eliminate` (no host round trip). The active-set steps only accept answers that improve
    the objective."""
    diagonal = ops.diagonal(system, axis1=-2, axis2=-1)
    floor = 1e-30 + 1e-12 * ops.max(diagonal, axis=-1, keepdims=True)
    scale = 1.0 / ops.sqrt(ops.maximum(diagonal, floor))                          # D^-1/2
    scaled = system * scale[..., :, None] * scale[..., None, :]
    scaled_rhs = rhs * scale[..., :, None]
    regularized = scaled + ridge * ops.eye(system.shape[-1], dtype=system.dtype)
    solution = _eliminate(regularized, scaled_rhs)
    for _ in range(refinements):
        solution = solution + _eliminate(regularized, scaled_rhs - ops.matmul(scaled, solution))
    return solution * scale[..., :, None]


def _gauss_jordan(system, rhs):
    """system^-1 rhs for symmetric positive definite systems (..., n, n), rhs (..., n, k), by Gauss-Jordan
    elimination without pivoting (stable for SPD matrices, as Cholesky is), in `keras.ops` with a fixed loop: no
    host round trip, where `ops.solve` checks its result on the host on torch (a device sync per call, issue 18)
    and raises on singular input. Pivots are rows picked by one-hot masks, so XLA sees no dynamic slices."""
    num = system.shape[-1]

    def body(i, carry):
        matrix, right = carry
        pick = one_hot(ops.convert_to_tensor(i, "int32"), num, system.dtype)       # e_i, (n,)
        row = ops.sum(matrix * pick[:, None], axis=-2)                            # row i, (..., n)
        right_row = ops.sum(right * pick[:, None], axis=-2)                       # (..., k)
        pivot = ops.sum(row * pick, axis=-1)                                      # (...)
        factor = ops.sum(matrix * pick[None, :], axis=-1) * (1.0 - pick) / pivot[..., None]   # column i, row i 0
        matrix = matrix - factor[..., :, None] * row[..., None, :]
        right = right - factor[..., :, None] * right_row[..., None, :]
        return matrix, right

    matrix, right = ops.fori_loop(0, num, body, (system, rhs))
    return right / ops.diagonal(matrix, axis1=-2, axis2=-1)[..., :, None]


def _torch_lu_solve(system, rhs):
    """system^-1 rhs by one batched LU with partial pivoting, with no host check of the result (torch only)."""
    import torch

    return torch.linalg.solve_ex(system, rhs, check_errors=False)[0]


# Chosen once: compiled backends trace the fixed elimination loop into their program; torch runs eagerly, where
# one library call replaces the loop's ~12 n operations.
_eliminate = _torch_lu_solve if keras.backend.backend() == "torch" else _gauss_jordan


def _spectral_bound(gramian):
    """An upper bound of the largest eigenvalue of a symmetric matrix: its largest absolute row sum."""
    return ops.max(ops.sum(ops.abs(gramian), axis=-1))


def simplex_projection(values, allowed=None):
    """Euclidean projection of each row of `values` (..., T) onto the probability simplex (sort-based, exact);
    with `allowed` (T,) bool, onto its face where the entries not allowed are 0."""
    num = values.shape[-1]
    if allowed is not None:
        values = ops.where(allowed, values, -1e30)                               # sorted last, projected to 0
    ordered = ops.flip(ops.sort(values, axis=-1), axis=-1)                      # u_1 >= ... >= u_T
    cumulative = ops.cumsum(ordered, axis=-1) - 1.0
    ranks = ops.arange(1, num + 1, dtype=values.dtype)
    active = ops.cast(ordered - cumulative / ranks > 0, values.dtype)            # true on a prefix
    count = ops.maximum(ops.sum(active, axis=-1, keepdims=True), 1.0)
    index = ops.cast(count - 1.0, "int32")
    threshold = ops.take_along_axis(cumulative, index, axis=-1) / count
    return ops.maximum(values - threshold, 0.0)


def _fista(gradient, project, start, iterations):
    """Accelerated projected gradient with step 1/L folded into `gradient`, and O'Donoghue-Candes restart."""

    def body(_, carry):
        x, y, t = carry
        x_next = project(y - gradient(y))
        t_next = (1.0 + ops.sqrt(1.0 + 4.0 * t * t)) / 2.0
        restart = ops.sum((y - x_next) * (x_next - x)) > 0.0
        momentum = ops.where(restart, 0.0, (t - 1.0) / t_next)
        y_next = x_next + momentum * (x_next - x)
        return x_next, y_next, ops.where(restart, ops.ones_like(t), t_next)

    x, _, _ = ops.fori_loop(0, iterations, body, (start, start, ops.ones((), start.dtype)))
    return x


def min_norm_weights(gramian, iterations=MIN_NORM_ITERATIONS, allowed=None):
    """argmin_{w in simplex} w^T G w: the weights of the min-norm point of the convex hull of the task gradients.
    `allowed` (T,) bool: only these tasks take part (the others get weight 0), e.g. the tasks with labels."""
    num = gramian.shape[-1]
    if num == 1:
        return ops.ones((1,), gramian.dtype)
    gramian = gramian / (_spectral_bound(gramian) + 1e-30)                      # lambda_max <= 1
    if allowed is None:
        start = ops.ones((num,), gramian.dtype) / num
    else:
        allowed_float = ops.cast(allowed, gramian.dtype)
        start = allowed_float / ops.maximum(ops.sum(allowed_float), 1.0)

    def project(values):
        return simplex_projection(values, allowed)

    # f(w) = w^T G w has gradient 2 G w and Lipschitz constant 2 lambda_max <= 2: step 1/2.
    weights = _fista(lambda w: ops.matmul(gramian, w), project, start, iterations)
    return _simplex_active_set(gramian, ops.zeros((num,), gramian.dtype), 1.0, weights, allowed=allowed)


def _simplex_active_set(gramian, linear, phi, weights, steps=None, allowed=None):
    """Primal active-set refinement for min_{w in simplex} F(w) = b.w + phi sqrt(w^T G w) (b = 0: min-norm).

    On a support S the minimiser over {sum_S w = 1} is closed-form: with a = G_SS^-1 1, e = G_SS^-1 b,
    A = 1.a, B = 1.e, C = b.e and D = B^2 - A C + A phi^2 > 0, w_S = (mu a - e) / sqrt(D), mu = (B + sqrt(D)) / A
    (for b = 0: w_S = a / A). Each step moves towards that minimiser as far as w >= 0 allows, dropping the index
    that reaches 0; once at the minimiser of its face, it adds the index with the most negative reduced gradient.
    Where no minimiser exists on the face (D <= 0) it follows the reduced gradient instead. Every step is
    line-searched over 12 step sizes at once and only taken if F does not increase.
    """
    num = gramian.shape[-1]
    if steps is None:
        steps = 2 * num + 4
    eye = ops.eye(num, dtype=gramian.dtype)
    sizes = ops.power(2.0, -ops.arange(12, dtype=gramian.dtype))

    def values(w):                                                               # F at each row of w (K, T)
        norm = ops.sqrt(ops.maximum(ops.sum(w * ops.matmul(w, gramian), axis=-1), 0.0))
        return ops.sum(w * linear, axis=-1) + phi * norm

    def body(_, carry):
        w, at_optimum = carry
        gw = ops.matmul(gramian, w)
        norm = ops.sqrt(ops.maximum(ops.sum(w * gw), 1e-30))
        gradient = linear + phi * gw / norm
        support = w > 0.0
        excluded = support if allowed is None else ops.logical_or(support, ops.logical_not(allowed))
        reduced = ops.where(excluded, float("inf"), gradient - ops.sum(w * gradient))
        add = ops.logical_and(at_optimum, ops.min(reduced) < 0.0)
        entering = one_hot(ops.argmin(reduced), num, gramian.dtype)
        mask = ops.maximum(ops.cast(support, gramian.dtype), ops.where(add, entering, 0.0))
        system = gramian * mask[:, None] * mask[None, :] + eye * (1.0 - mask)[None, :]
        solved = _solve(system, ops.stack([mask, linear * mask], axis=1))
        a, e = solved[:, 0] * mask, solved[:, 1] * mask
        big_a, big_b, big_c = ops.sum(a), ops.sum(e), ops.sum(linear * e)
        disc = big_b * big_b - big_a * big_c + big_a * phi * phi
        root = ops.sqrt(ops.maximum(disc, 1e-30))
        candidate = ((big_b + root) / big_a * a - e) / root
        valid = ops.logical_and(disc > 0.0, ops.all(ops.isfinite(candidate)))
        descent = -mask * (gradient - ops.sum(mask * gradient) / ops.sum(mask))
        # Where the face has no minimiser (D <= 0), F decreases without bound along v = (B / A) a - e (sum 0,
        # b.v = (B^2 - A C) / A < 0) on its affine hull: that direction, as well conditioned as the face's
        # system, and the reduced gradient are both line-searched up to the boundary.
        ray = mask * (big_b / big_a * a - e)
        first_step = ops.where(valid, candidate - w, ops.where(ops.all(ops.isfinite(ray)), ray, descent))
        first, first_limit = _boundary_trials(w, first_step, sizes, ops.where(valid, 1.0, 1e6))
        second, _ = _boundary_trials(w, descent, sizes, 1e6)
        trials = ops.concatenate([first, second], axis=0)
        trial_values = ops.where(ops.all(ops.isfinite(trials), axis=1), values(trials), float("inf"))
        current = values(w[None, :])[0]
        # The face's exact minimiser, reachable in full, is taken unless F rises by more than float32 rounding
        # (near the optimum F differs by less than its resolution, and comparing rounded values stalled the method
        # a few 1e-5 short of the minimiser).
        exact = ops.logical_and(ops.logical_and(valid, first_limit >= 1.0),
                                trial_values[0] <= current + 5e-7 * ops.abs(current))
        index = ops.where(exact, 0, ops.argmin(trial_values))
        # (gathers, not tensor indexing: XLA needs slice starts to be compile-time constants)
        improved = ops.logical_or(exact, ops.take(trial_values, index) <= current)
        full = ops.logical_and(ops.logical_and(improved, valid), ops.logical_and(index == 0, first_limit >= 1.0))
        moved = ops.where(improved, ops.take(trials, index, axis=0), w)
        # No step moved w: it minimises F on its face as far as float precision tells, so the next step may add an
        # index (without this, a weight left at 1e-11 by a blocked step stalled the method on a suboptimal face).
        stalled = ops.max(ops.abs(moved - w)) <= 1e-9
        return moved, ops.logical_or(full, stalled)

    w, _ = ops.fori_loop(0, steps, body, (weights, ops.convert_to_tensor(False)))
    return w


def _boundary_trials(w, step, sizes, cap):
    """Points w + s step for s = limit * sizes, limit = min(cap, the largest s keeping w >= 0), renormalised to the
    simplex; the first trial sets the blocking weights to exactly 0. Weights below 1e-7 that the step decreases
    leave the support at once instead of blocking it (a weight left at 1e-11 by rounding otherwise limited every
    later step to ~1e-11). Returns (trials (K, T), limit)."""
    vanishing = ops.logical_and(step < 0.0, w <= VANISHING)
    ratios = ops.where(ops.logical_and(step < 0.0, ops.logical_not(vanishing)),
                       w / ops.maximum(-step, 1e-30), float("inf"))
    limit = ops.minimum(ops.min(ratios), cap)
    blocking = ops.logical_and(ratios <= limit, step < 0.0)
    trials = w[None, :] + (limit * sizes)[:, None] * step[None, :]
    trials = ops.where(vanishing[None, :], 0.0, ops.maximum(trials, 0.0))
    trials = ops.concatenate([ops.where(blocking[None, :], 0.0, trials[:1]), trials[1:]], axis=0)
    return trials / ops.sum(trials, axis=1, keepdims=True), limit



def box_qp_weights(gramian, lower, iterations=BOX_QP_ITERATIONS):
    """For each row u of `lower` (K, T): argmin_{v >= u} v^T G v (G positive definite). Returns (K, T)."""
    scale = _spectral_bound(gramian) + 1e-30
    gramian = gramian / scale
    project = lambda v: ops.maximum(v, lower)                                    # noqa: E731
    values = _fista(lambda v: ops.matmul(v, gramian), project, lower, iterations)
    return _box_active_set(gramian, lower, values)


def _box_active_set(gramian, lower, values, steps=None):
    """Primal active-set refinement, row by row: on the free set F solve G_FF v_F = -G_FA u_A exactly, move
    towards it as far as v >= u allows (fixing the blocking index); once at the minimiser of its face, free the
    bound index with the most negative gradient."""
    num = gramian.shape[-1]
    if steps is None:
        steps = 2 * num + 4
    eye = ops.eye(num, dtype=gramian.dtype)

    def objective(v):
        return ops.sum(v * ops.matmul(v, gramian), axis=-1)

    def body(_, carry):
        v, at_optimum = carry                                                    # (K, T), (K,)
        gradient = ops.matmul(v, gramian)
        free = v > lower
        reduced = ops.where(free, float("inf"), gradient)
        add = ops.logical_and(at_optimum, ops.min(reduced, axis=-1) < 0.0)
        entering = one_hot(ops.argmin(reduced, axis=-1), num, gramian.dtype)
        mask = ops.maximum(ops.cast(free, gramian.dtype), ops.where(add[:, None], entering, 0.0))
        fixed = (1.0 - mask) * lower
        systems = gramian[None] * mask[:, :, None] * mask[:, None, :] + eye[None] * (1.0 - mask)[:, None, :]
        rhs = -mask * ops.matmul(fixed, gramian) + fixed
        candidate = ops.squeeze(_solve(systems, rhs[:, :, None]), -1)
        step = (candidate - v) * mask
        ratios = ops.where(step < 0.0, (v - lower) / ops.maximum(-step, 1e-30), float("inf"))
        limit = ops.minimum(1.0, ops.min(ratios, axis=-1, keepdims=True))
        moved = ops.where(ops.logical_and(ratios <= limit, step < 0.0), lower, ops.maximum(v + limit * step, lower))
        improved = ops.logical_and(ops.all(ops.isfinite(moved), axis=-1), objective(moved) <= objective(v))
        full = ops.logical_and(improved, limit[:, 0] >= 1.0)
        return ops.where(improved[:, None], moved, v), full

    start = ops.zeros(ops.shape(values)[:1], dtype="bool")
    v, _ = ops.fori_loop(0, steps, body, (values, start))
    return v


def cagrad_weights(gramian, c, iterations=CAGRAD_ITERATIONS):
    """CAGrad's dual problem: argmin_{w in simplex} w^T G 1/T + c ||g_0|| sqrt(w^T G w), ||g_0||^2 = 1^T G 1 / T^2."""
    num = gramian.shape[-1]
    scale = _spectral_bound(gramian) + 1e-30
    normalized = gramian / scale
    b = ops.mean(normalized, axis=1)                                            # g_i . g_0
    phi = c * ops.sqrt(ops.maximum(ops.mean(normalized), 0.0)) + 1e-12

    def objective_and_gradient(w):
        gw = ops.matmul(normalized, w)
        norm = ops.sqrt(ops.sum(w * gw) + 1e-12)
        return ops.sum(w * b) + phi * norm, b + phi * gw / norm, norm

    def body(_, carry):
        w, best, best_value = carry
        value, gradient, norm = objective_and_gradient(w)
        improved = value < best_value
        best = ops.where(improved, w, best)
        best_value = ops.where(improved, value, best_value)
        step = norm / (phi + 1e-12)                                             # 1 / local curvature bound
        return simplex_projection(w - step * gradient), best, best_value

    start = ops.ones((num,), gramian.dtype) / num
    w, best, best_value = ops.fori_loop(
        0, iterations, body, (start, start, ops.convert_to_tensor(float("inf"), gramian.dtype))
    )
    last_value, _, _ = objective_and_gradient(w)
    weights = ops.where(last_value < best_value, w, best)
    return _simplex_active_set(normalized, b, phi, weights)


def live_cosines(gramian):
    """(norms, cosines, live) of a Gramian G = N C N (N = diag ||g_t||, C the cosine matrix), for the solvers that
    work on C (FairGrad, Nash-MTL). A task whose gradient is exactly zero while others' are not (a dead ReLU branch
    of the shared layers) has no direction: C would have a zero row and G w = w^(-1/alpha) no solution (its weight
    would be infinite and every step unusable). Such a task gets the identity's row and column of C and norm 1, so
    the solver sees it as an orthogonal unit task and the other tasks' equations are exactly theirs; `live` (T,)
    is False for it, and its weight is then `weights_for_dead_tasks`'s."""
    norms = ops.sqrt(ops.maximum(ops.diagonal(gramian), 0.0))
    live = norms > 1e-30
    norms = ops.where(live, norms, 1.0)
    both = ops.logical_and(live[:, None], live[None, :])
    eye = ops.eye(ops.shape(gramian)[-1], dtype=gramian.dtype)
    cosines = ops.where(both, gramian / norms[:, None] / norms[None, :], eye)
    return norms, cosines, live


def weights_for_dead_tasks(weights, live):
    """`weights` with each task that is not `live` (an exactly zero gradient, `live_cosines`) given the mean weight
    of the live tasks (1 when none is): its gradient adds nothing to the shared direction, and its head trains at
    the others' scale."""
    live_weights = ops.where(live, weights, 0.0)
    count = ops.sum(ops.cast(live, weights.dtype))
    mean = ops.where(count > 0, ops.sum(live_weights) / ops.maximum(count, 1.0), 1.0)
    return ops.where(live, weights, mean)


def power_fair_weights(gramian, alpha=1.0, start=None, iterations=NEWTON_ITERATIONS, coefficients=None):
    """The w > 0 solving G w = c w^(-1/alpha) (c = `coefficients`, default 1), by Newton's method on
    f(w) = w^T G w / 2 - sum_i c_i psi(w_i).

    psi'(w) = w^(-1/alpha) (psi = log for alpha = 1), so f is strictly convex on w > 0, its minimiser is the
    solution and the Newton direction also decreases the residual ||grad f||. Each step takes, among the step
    sizes 1, 1/2, ..., 2^-15 (cut to stay in w > 0), all evaluated at once, the one with the smallest residual:
    a line search with a fixed cost (the residual, unlike f, stays resolvable in float32 near the solution). `start`
    defaults to the exact solution for orthogonal
    gradients, G_ii^(-alpha/(1+alpha)).
    """
    num = gramian.shape[-1]
    diagonal = ops.maximum(ops.diagonal(gramian), 1e-20)
    if coefficients is None:
        coefficients = ops.ones((num,), gramian.dtype)
    if start is None:
        start = ops.power(coefficients / diagonal, alpha / (1.0 + alpha))
    eye = ops.eye(num, dtype=gramian.dtype)
    sizes = ops.power(2.0, -ops.arange(16, dtype=gramian.dtype))

    def residuals(w):                                                            # ||G w - w^(-1/alpha)|| per row
        safe = ops.maximum(w, 1e-30)
        residual = ops.matmul(w, gramian) - coefficients * ops.power(safe, -1.0 / alpha)
        return ops.where(ops.all(w > 0.0, axis=-1), ops.sqrt(ops.sum(residual * residual, axis=-1)), float("inf"))

    def body(_, w):
        target = coefficients * ops.power(w, -1.0 / alpha)
        gradient = ops.matmul(gramian, w) - target
        hessian = gramian + eye * (target / (alpha * w))[None, :]
        step = ops.squeeze(_solve(hessian, gradient[:, None]), -1)                 # finite if singular
        ratio = ops.where(step > 0.0, w / ops.maximum(step, 1e-30), float("inf"))
        limit = ops.minimum(1.0, 0.99 * ops.min(ratio))
        trials = w[None, :] - (limit * sizes)[:, None] * step[None, :]          # (16, T)
        values = residuals(trials)
        best = ops.take(trials, ops.argmin(values), axis=0)
        improved = ops.logical_and(ops.min(values) <= residuals(w[None, :])[0], ops.all(ops.isfinite(best)))
        return ops.where(improved, best, w)

    return ops.fori_loop(0, iterations, body, start)


def psd_power(gramian, power, rtol=None):
    """G^power on the range of a symmetric PSD matrix (eigenvalues <= rtol * lambda_max treated as zero).

    power = -1 is the pseudo-inverse (ConFIG), -1/2 the inverse square root (Aligned-MTL). Returns
    (G^power, eigenvalues, kept mask). rtol defaults to T * float32 eps, as numpy/torch pinv do.
    """
    num = gramian.shape[-1]
    if rtol is None:
        rtol = num * 1.1920929e-07
    eigenvalues, vectors = ops.eigh(gramian)
    kept = eigenvalues > rtol * ops.max(eigenvalues)
    powered = ops.where(kept, ops.power(ops.where(kept, eigenvalues, 1.0), power), 0.0)
    return ops.matmul(vectors * powered[None, :], ops.transpose(vectors)), eigenvalues, kept


def adam_update(value, first_moment, second_moment, gradient, step, learning_rate,
                beta_1=0.9, beta_2=0.999, epsilon=1e-8, weight_decay=0.0):
    """One Adam step (L2 weight decay added to the gradient, as torch.optim.Adam). Returns (value, m, v)."""
    gradient = gradient + weight_decay * value
    m = beta_1 * first_moment + (1.0 - beta_1) * gradient
    v = beta_2 * second_moment + (1.0 - beta_2) * gradient * gradient
    m_hat = m / (1.0 - ops.power(beta_1, step))
    v_hat = v / (1.0 - ops.power(beta_2, step))
    return value - learning_rate * m_hat / (ops.sqrt(v_hat) + epsilon), m, v
