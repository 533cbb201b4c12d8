"""Door 3 (`keras_dbmtl.torch.Balancer.backward` in a plain PyTorch loop) against independent float64 numpy replays.

The model is tests/reference.py's: a linear trunk z = X W + b (torch.nn.Linear, shared) and linear heads
pred_t = z v_t + c_t, MSE, torch.optim.SGD, the data of tests/test_training_matches_reference.py (losses spanning
10^4). The references are numpy only: `reference.replay` (DB-MTL's Algorithm 1; skipped steps must leave it as
it is), Algorithm 1 with tasks without labels in some batches (`reference.dbmtl_replay_with_labels`, the semantics of
`TaskJacobian.labelled`), the IMTL-G closed form of tests/balancers/test_imtl_g.py and PCGrad's Algorithm 1 of
tests/balancers/test_pcgrad.py; `torch.amp.GradScaler` runs against the unscaled run, two gloo processes against
one. Skipped unless Keras runs on torch.
"""

import importlib.util
import os
import sys
import warnings

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(keras.backend.backend() != "torch", reason="door 3: the torch backend only")

import keras_dbmtl
from tests import gloo, reference
from tests.test_training_matches_reference import BATCH, D_HID, D_IN, LR, batches, make_data

if keras.backend.backend() == "torch":
    import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BALANCER_TESTS = os.path.join(ROOT, "tests", "balancers")


def _numpy_reference(module, name):
    """A numpy reference function of a tests/balancers module (they import their helpers by bare name)."""
    if BALANCER_TESTS not in sys.path:
        sys.path.insert(0, BALANCER_TESTS)
    spec = importlib.util.spec_from_file_location(f"_door_ref_{module}", os.path.join(BALANCER_TESTS, module + ".py"))
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return getattr(loaded, name)


class Net(torch.nn.Module if keras.backend.backend() == "torch" else object):
    def __init__(self, num_tasks=3, seed=1):
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = torch.nn.Linear(D_IN, D_HID)
        self.heads = torch.nn.ModuleList([torch.nn.Linear(D_HID, 1) for _ in range(num_tasks)])

    def forward(self, x):
        z = self.trunk(x)
        return z, [head(z) for head in self.heads]

    def numpy_weights(self):
        W = self.trunk.weight.detach().numpy().T.astype(np.float64)
        b = self.trunk.bias.detach().numpy().astype(np.float64)
        heads = [(h.weight.detach().numpy().T.astype(np.float64), h.bias.detach().numpy().astype(np.float64))
                 for h in self.heads]
        return W, b, heads


def task_losses(net, x, ys, keyed=True):
    z, predictions = net(x)
    losses = [torch.mean((p - y) ** 2) for p, y in zip(predictions, ys)]
    return z, ({f"task{t}": loss for t, loss in enumerate(losses)} if keyed else losses)


def train(net, balancer, X, Y, steps=None, lr=LR, features=False, **backward_kwargs):
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    X, Y = torch.tensor(X), [torch.tensor(y) for y in Y]
    history = []
    for idx in steps or batches():
        optimizer.zero_grad()
        z, losses = task_losses(net, X[idx], [y[idx] for y in Y])
        if features:
            weights = balancer.backward(losses, features=z, **backward_kwargs)
        else:
            weights = balancer.backward(losses, shared_parameters=net.trunk.parameters(), **backward_kwargs)
        history.append(np.array([float(w) for w in weights.values()]))
        optimizer.step()
    return np.array(history)


def assert_matches(net, W, b, heads, rtol=2e-4, atol=2e-6):
    W_, b_, heads_ = net.numpy_weights()
    np.testing.assert_allclose(W_, W, rtol=rtol, atol=atol)
    np.testing.assert_allclose(b_, b, rtol=rtol, atol=atol)
    for (v_, c_), (v, c) in zip(heads_, heads):
        np.testing.assert_allclose(v_, v, rtol=rtol, atol=atol)
        np.testing.assert_allclose(c_, c, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------- exactness against numpy
@pytest.mark.parametrize("vectorize", [False, True])
def test_dbmtl_matches_algorithm_1(vectorize):
    X, Y = make_data()
    net = Net()
    W0, b0, heads0 = net.numpy_weights()
    balancer = keras_dbmtl.torch.Balancer("dbmtl", beta=0.5, beta_sigma=0.5, vectorize=vectorize)
    history = train(net, balancer, X, Y)
    W, b, heads, ema, step_weights = reference.replay(X, Y, W0, b0, heads0, batches(), LR, "dbmtl", beta=0.5,
                                                      beta_sigma=0.5)
    assert_matches(net, W, b, heads)
    # The EMA buffers, torch's (out, in) weight layout put in the reference's (in, out) order.
    state = keras.ops.convert_to_numpy(balancer.balancer.ema_gradients)
    size = D_IN * D_HID
    weight_part = state[:, :size].reshape(-1, D_HID, D_IN).transpose(0, 2, 1).reshape(-1, size)
    np.testing.assert_allclose(np.concatenate([weight_part, state[:, size:]], axis=1), ema, rtol=2e-4, atol=1e-7)
    np.testing.assert_allclose(history, step_weights, rtol=1e-4)
    assert int(keras.ops.convert_to_numpy(balancer.balancer.iterations)) == len(batches())


def _replay_gradient_method(X, Y, W, b, heads, weights_of, log_transform=False, lr=LR, head_weights=None):
    """SGD with direction w^T G, w = weights_of(G) (numpy), heads by their own gradients times head_weights(w)."""
    for idx in batches():
        _, G, head_grads = reference.linear_mtl_gradients(X[idx], [y[idx] for y in Y], W, b, heads, log_transform)
        w = weights_of(G)
        direction = G.T @ w if w.ndim == 1 else w.sum(axis=0)
        W = W - lr * direction[: W.size].reshape(W.shape)
        b = b - lr * direction[W.size:]
        h = np.ones(len(heads)) if head_weights is None else head_weights(w)
        heads = [(v - lr * h[t] * gv, c - lr * h[t] * gc)
                 for t, ((v, c), (gv, gc)) in enumerate(zip(heads, head_grads))]
    return W, b, heads


def test_imtl_g_matches_the_closed_form():
    imtl_g_numpy = _numpy_reference("test_imtl_g", "_imtl_g_numpy")
    X, Y = make_data()
    net = Net()
    W0, b0, heads0 = net.numpy_weights()
    # On the log losses: the raw ones span 10^4, so the step is small on the large task's scale.
    train(net, keras_dbmtl.torch.Balancer("imtl_g", loss_transform="log"), X, Y)
    W, b, heads = _replay_gradient_method(X, Y, W0, b0, heads0, imtl_g_numpy, log_transform=True)
    assert_matches(net, W, b, heads, rtol=1e-3, atol=1e-5)


def test_pcgrad_matches_algorithm_1_on_two_tasks():
    pcgrad_numpy = _numpy_reference("test_pcgrad", "_pcgrad_numpy")
    X, Y = make_data()
    Y = [Y[0], -Y[2]]                # losses 10^4 apart, gradients in conflict at every step; two tasks: one order
    net = Net(num_tasks=2)
    _, G, _ = reference.linear_mtl_gradients(X[:BATCH], [y[:BATCH] for y in Y], *net.numpy_weights(), False)
    assert G[0] @ G[1] < 0                                    # PCGrad projects (else it would be EW)
    W0, b0, heads0 = net.numpy_weights()
    train(net, keras_dbmtl.torch.Balancer("pcgrad", seed=0), X, Y, lr=1e-4)
    W, b, heads = _replay_gradient_method(X, Y, W0, b0, heads0, lambda G: pcgrad_numpy(G, [[1], [0]]), lr=1e-4)
    assert_matches(net, W, b, heads, rtol=1e-3, atol=1e-6)


def test_heads_get_their_own_gradient_times_the_head_weight():
    X, Y = make_data()
    net = Net()
    W0, b0, heads0 = net.numpy_weights()
    balancer = keras_dbmtl.torch.Balancer("mgda", loss_transform="log")
    idx = batches()[0]
    _, losses = task_losses(net, torch.tensor(X[idx]), [torch.tensor(y[idx]) for y in Y])
    balancer.backward(losses, shared_parameters=net.trunk.parameters())
    h = balancer.last_step.head_weights.numpy()
    assert not np.allclose(h, 1.0)                            # MGDA scales the heads by its min-norm weights
    _, G, head_grads = reference.linear_mtl_gradients(X[idx], [y[idx] for y in Y], W0, b0, heads0, True)
    for t, head in enumerate(net.heads):
        np.testing.assert_allclose(head.weight.grad.numpy().T, h[t] * head_grads[t][0], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(head.bias.grad.numpy(), h[t] * head_grads[t][1], rtol=1e-4, atol=1e-7)
    w = balancer.last_step.task_weights.numpy()
    direction = np.concatenate([net.trunk.weight.grad.numpy().T.ravel(), net.trunk.bias.grad.numpy()])
    np.testing.assert_allclose(direction, w @ G, rtol=1e-4, atol=1e-6)


def test_loss_level_is_one_backward_and_accumulates():
    X, Y = make_data()
    x, ys = torch.tensor(X[:BATCH]), [torch.tensor(y[:BATCH]) for y in Y]
    reference_net, net = Net(), Net()
    _, losses = task_losses(reference_net, x, ys, keyed=False)
    (2 * sum(losses)).backward()                              # two accumulated EW steps = twice the sum
    balancer = keras_dbmtl.torch.Balancer("ew")
    for _ in range(2):
        _, losses = task_losses(net, x, ys, keyed=False)
        weights = balancer.backward(losses, shared_parameters=net.trunk.parameters())
    assert isinstance(weights, torch.Tensor) and weights.shape == (3,)
    for p, q in zip(net.parameters(), reference_net.parameters()):
        np.testing.assert_allclose(p.grad.numpy(), q.grad.numpy(), rtol=1e-6)


def test_learned_balancer_parameters_train_with_the_optimizer():
    X, Y = make_data()
    x, ys = torch.tensor(X[:BATCH]), [torch.tensor(y[:BATCH]) for y in Y]
    net = Net()
    balancer = keras_dbmtl.torch.Balancer("uw").build(3, net.trunk.parameters())
    (log_vars,) = balancer.parameters()
    assert isinstance(log_vars, torch.nn.Parameter)
    optimizer = torch.optim.SGD([*net.parameters(), *balancer.parameters()], lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                        # in the optimizer: no warning
        for _ in range(3):
            optimizer.zero_grad()
            _, losses = task_losses(net, x, ys)
            balancer.backward(losses, shared_parameters=net.trunk.parameters())
            optimizer.step()
    assert float(log_vars.detach().abs().max()) > 0
    # Not in the optimizer: a warning at the first call (created then) and once they did not move.
    other = keras_dbmtl.torch.Balancer("uw")
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3)
    with pytest.warns(UserWarning, match="not in your optimizer"):
        _, losses = task_losses(net, x, ys)
        other.backward(losses, shared_parameters=net.trunk.parameters())
    optimizer.step()
    with pytest.warns(UserWarning, match="have not moved"):
        _, losses = task_losses(net, x, ys)
        other.backward(losses, shared_parameters=net.trunk.parameters())
    with pytest.raises(RuntimeError, match="build"):
        keras_dbmtl.torch.Balancer("uw").parameters()


def test_features_equal_the_parameter_level_when_the_trunk_is_the_identity():
    # z = I W^T: the Jacobian on z is the Jacobian on the trunk's weight (transposed), so the representation-level
    # DB-MTL direction is the parameter-level one.
    rng = np.random.default_rng(3)
    X = np.eye(D_IN, dtype="float32")
    Y = [(s * rng.normal(size=(D_IN, 1))).astype("float32") for s in (1.0, 10.0, 100.0)]
    steps = [np.arange(D_IN)] * 4
    nets = []
    for features in (False, True):
        net = Net()
        net.trunk = torch.nn.Linear(D_IN, D_HID, bias=False)
        torch.manual_seed(5)
        torch.nn.init.normal_(net.trunk.weight)
        balancer = keras_dbmtl.torch.Balancer("dbmtl")
        history = train(net, balancer, X, Y, steps=steps, features=features)
        nets.append((net, history))
    (a, history_a), (b, history_b) = nets
    np.testing.assert_allclose(history_a, history_b, rtol=1e-5)
    for p, q in zip(a.parameters(), b.parameters()):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=1e-5, atol=1e-7)


def test_autocast_runs_the_balancer_in_float32():
    X, Y = make_data()
    x, ys = torch.tensor(X[:BATCH]), [torch.tensor(y[:BATCH]) for y in Y]
    grads = []
    for autocast in (False, True):
        net = Net()
        balancer = keras_dbmtl.torch.Balancer("dbmtl")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            _, losses = task_losses(net, x, ys)
            if autocast:
                assert losses["task0"].dtype == torch.bfloat16 or net(x)[0].dtype == torch.bfloat16
            balancer.backward(losses, shared_parameters=net.trunk.parameters())
        assert balancer.last_step.raw.dtype == torch.float32
        assert all(p.grad.dtype == torch.float32 for p in net.parameters())
        grads.append(np.concatenate([p.grad.numpy().ravel() for p in net.parameters()]))
    np.testing.assert_allclose(grads[1], grads[0], rtol=0.1, atol=0.05 * np.abs(grads[0]).max())


def test_compiled_model():
    X, Y = make_data()
    x, ys = torch.tensor(X[:BATCH]), [torch.tensor(y[:BATCH]) for y in Y]
    grads = []
    for compiled in (False, True):
        net = Net()
        model = torch.compile(net, backend="aot_eager") if compiled else net
        balancer = keras_dbmtl.torch.Balancer("dbmtl", vectorize=False)
        _, losses = task_losses(model, x, ys)
        balancer.backward(losses, shared_parameters=net.trunk.parameters(), task_parameters=net.heads.parameters())
        grads.append(np.concatenate([p.grad.numpy().ravel() for p in net.parameters()]))
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------- unusable steps, tasks without labels
class _NaNGradient(torch.autograd.Function if keras.backend.backend() == "torch" else object):
    """The identity, whose backward pass turns every non-zero cotangent into NaN (a zero one stays 0: the other
    tasks' Jacobian rows stay finite, unlike with sqrt(0 * x), whose 0 * inf is NaN for every row)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return torch.where(g == 0, g, torch.full_like(g, float("nan")))


def _poison(losses, tensor, task="task1"):
    """The losses with `task`'s gradient NaN through `tensor`, its value unchanged (+ y - y, y the identity)."""
    y = _NaNGradient.apply(tensor.reshape(-1)[0])
    return {**losses, task: losses[task] + (y - y.detach())}


def test_a_non_finite_loss_or_gradient_skips_the_step():
    # Skipped calls (NaN loss, NaN Jacobian row, NaN head gradient) between the steps of Algorithm 1 change nothing:
    # the run equals the float64 replay without them (EMA and step counter included), .grad is left as it was.
    X, Y = make_data()
    net = Net()
    W0, b0, heads0 = net.numpy_weights()
    balancer = keras_dbmtl.torch.Balancer("dbmtl", beta=0.5, beta_sigma=0.5)
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    Xt, Yt = torch.tensor(X), [torch.tensor(y) for y in Y]
    poisons = {
        1: (lambda z, losses: {**losses, "task2": losses["task2"] * float("nan")}, r"Unusable losses .*'task2'"),
        2: (lambda z, losses: _poison(losses, z), r"Non-finite gradients .*Jacobian rows of tasks \['task1'\]"),
        4: (lambda z, losses: _poison(losses, net.heads[0].weight, "task0"), "Non-finite gradients .*task param"),
    }
    for step, idx in enumerate(batches()):
        if step in poisons:
            poison, message = poisons[step]
            optimizer.zero_grad()
            state = balancer.state_dict()
            z, losses = task_losses(net, Xt[idx], [y[idx] for y in Yt])
            with pytest.warns(RuntimeWarning, match=message):
                assert balancer.backward(poison(z, losses), shared_parameters=net.trunk.parameters()) is None
            assert balancer.last_step_skipped
            assert all(p.grad is None for p in net.parameters())          # nothing written
            for key, value in balancer.state_dict().items():
                assert torch.equal(value, state[key]), key
            optimizer.step()                                              # moves nothing: every .grad is None
        optimizer.zero_grad()
        z, losses = task_losses(net, Xt[idx], [y[idx] for y in Yt])
        balancer.backward(losses, shared_parameters=net.trunk.parameters())
        assert not balancer.last_step_skipped
        optimizer.step()
    W, b, heads, ema, _ = reference.replay(X, Y, W0, b0, heads0, batches(), LR, "dbmtl", beta=0.5, beta_sigma=0.5)
    assert_matches(net, W, b, heads)
    state = keras.ops.convert_to_numpy(balancer.balancer.ema_gradients)
    size = D_IN * D_HID
    weight_part = state[:, :size].reshape(-1, D_HID, D_IN).transpose(0, 2, 1).reshape(-1, size)
    np.testing.assert_allclose(np.concatenate([weight_part, state[:, size:]], axis=1), ema, rtol=2e-4, atol=1e-7)
    assert int(keras.ops.convert_to_numpy(balancer.balancer.iterations)) == len(batches())
    assert balancer.skipped_steps == len(poisons)
    # Gradients already there (accumulation) stay as they were.
    z, losses = task_losses(net, Xt[:BATCH], [y[:BATCH] for y in Yt])
    balancer.backward(losses, shared_parameters=net.trunk.parameters())
    before = [p.grad.clone() for p in net.parameters()]
    z, losses = task_losses(net, Xt[:BATCH], [y[:BATCH] for y in Yt])
    with pytest.warns(RuntimeWarning, match="Non-finite"):
        assert balancer.backward(_poison(losses, z), shared_parameters=net.trunk.parameters()) is None
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), before))


def test_a_non_finite_gradient_at_loss_level_restores_the_balancers_state():
    # RLW draws its weights in combine_losses (the seed generator advances): a skipped step restores the stream, so
    # the next step's weights are those of a balancer that never saw it.
    X, Y = make_data()
    x, ys = torch.tensor(X[:BATCH]), [torch.tensor(y[:BATCH]) for y in Y]
    net = Net()
    balancers = [keras_dbmtl.torch.Balancer("rlw", seed=3) for _ in range(2)]
    weights = []
    for poisoned, balancer in zip((True, False), balancers):
        z, losses = task_losses(net, x, ys)
        balancer.backward(losses, shared_parameters=net.trunk.parameters())   # built, one draw
        if poisoned:
            state = balancer.state_dict()
            z, losses = task_losses(net, x, ys)
            grads = [None if p.grad is None else p.grad.clone() for p in net.parameters()]
            with pytest.warns(RuntimeWarning, match="Non-finite gradients .*combined loss"):
                assert balancer.backward(_poison(losses, z), shared_parameters=net.trunk.parameters()) is None
            for key, value in balancer.state_dict().items():
                assert torch.equal(value, state[key]), key
            assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), grads))
        net.zero_grad()
        z, losses = task_losses(net, x, ys)
        weights.append(np.array([float(w) for w in balancer.backward(
            losses, shared_parameters=net.trunk.parameters()).values()]))
    np.testing.assert_array_equal(weights[0], weights[1])
    assert balancers[0].skipped_steps == 1 and balancers[1].skipped_steps == 0
    # FAMO's after_step hook does not run after a skipped step (as in fit).
    famo = keras_dbmtl.torch.Balancer("famo")
    z, losses = task_losses(net, x, ys)
    famo.backward(losses, shared_parameters=net.trunk.parameters())
    z, losses = task_losses(net, x, ys)
    with pytest.warns(RuntimeWarning, match="Unusable losses"):
        famo.backward({**losses, "task0": losses["task0"] * float("inf")}, shared_parameters=net.trunk.parameters())
    state = famo.state_dict()
    famo.after_step({k: v.detach() * 0.5 for k, v in losses.items()})
    assert all(torch.equal(v, state[k]) for k, v in famo.state_dict().items())


def masked_losses(net, x, ys, unlabelled=()):
    """task_losses with a labelled-sample mask: a task in `unlabelled` has no label in the batch, its masked mean
    loss is exactly 0 with a zero gradient."""
    z, predictions = net(x)
    losses = {}
    for t, (p, y) in enumerate(zip(predictions, ys)):
        mask = torch.zeros_like(y) if t in unlabelled else torch.ones_like(y)
        losses[f"task{t}"] = (mask * (p - y) ** 2).sum() / mask.sum().clamp(min=1.0)
    return z, losses


def test_a_task_without_labels_takes_no_part():
    X, Y = make_data()
    net = Net()
    W0, b0, heads0 = net.numpy_weights()
    balancer = keras_dbmtl.torch.Balancer("dbmtl", beta=0.5, beta_sigma=0.5)
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    Xt, Yt = torch.tensor(X), [torch.tensor(y) for y in Y]
    unlabelled = {1: (1,), 3: (1,), 4: (0, 2)}      # task1 twice (alpha_k is the max: task2's norm is the largest)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)         # not an unusable loss: no warning
        for step, idx in enumerate(batches()):
            optimizer.zero_grad()
            _, losses = masked_losses(net, Xt[idx], [y[idx] for y in Yt], unlabelled.get(step, ()))
            weights = balancer.backward(losses, shared_parameters=net.trunk.parameters())
            for t in unlabelled.get(step, ()):
                assert float(weights[f"task{t}"]) == 0.0
            optimizer.step()
    order = batches()
    labelled = [[t not in unlabelled.get(k, ()) for t in range(len(heads0))] for k in range(len(order))]
    W, b, heads, ema, _ = reference.dbmtl_replay_with_labels(X, Y, W0, b0, heads0, order, labelled, LR, 0.5, 0.5)
    assert_matches(net, W, b, heads)
    state = keras.ops.convert_to_numpy(balancer.balancer.ema_gradients)
    size = D_IN * D_HID
    weight_part = state[:, :size].reshape(-1, D_HID, D_IN).transpose(0, 2, 1).reshape(-1, size)
    np.testing.assert_allclose(np.concatenate([weight_part, state[:, size:]], axis=1), ema, rtol=2e-4, atol=1e-7)
    assert int(keras.ops.convert_to_numpy(balancer.balancer.iterations)) == len(batches())
    # No task with labels: nothing to learn, the log of a zero loss is unusable: skipped.
    _, losses = masked_losses(net, Xt[:BATCH], [y[:BATCH] for y in Yt], (0, 1, 2))
    with pytest.warns(RuntimeWarning, match="Unusable losses"):
        assert balancer.backward(losses, shared_parameters=net.trunk.parameters()) is None
    # A zero loss whose gradient is not zero (a labelled task) stays unusable under the log transform.
    _, losses = masked_losses(net, Xt[:BATCH], [y[:BATCH] for y in Yt])
    losses["task1"] = losses["task1"] - losses["task1"].detach()
    with pytest.warns(RuntimeWarning, match=r"Unusable losses for tasks \['task1'\]"):
        assert balancer.backward(losses, shared_parameters=net.trunk.parameters()) is None


# ---------------------------------------------------------------------- torch.amp.GradScaler
def _train_with_scaler(method, level, scaler, steps, data=None, **kwargs):
    """Door 3 with `backward(..., scaler=scaler)`, `scaler.step(optimizer)` and `scaler.update()` (plain
    `optimizer.step()` without a scaler); returns the net, the balancer and what every backward returned."""
    X, Y = data or make_data()
    Xt, Yt = torch.tensor(X), [torch.tensor(y) for y in Y]
    net = Net()
    balancer = keras_dbmtl.torch.Balancer(method, **kwargs)
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    results = []
    for idx in steps:
        optimizer.zero_grad()
        z, losses = task_losses(net, Xt[idx], [y[idx] for y in Yt])
        where = dict(features=z) if level == "features" else dict(shared_parameters=net.trunk.parameters())
        results.append(balancer.backward(losses, scaler=scaler, **where))
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
    return net, balancer, results


def _assert_same_run(net_a, balancer_a, net_b, balancer_b, rtol=1e-6):
    for p, q in zip(net_a.parameters(), net_b.parameters()):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=rtol, atol=1e-7)
    for (key, a), b in zip(balancer_a.state_dict().items(), balancer_b.state_dict().values()):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=rtol, atol=1e-9, err_msg=key)


@pytest.mark.parametrize("method,level", [("dbmtl", "parameters"), ("mgda", "features"), ("ew", "parameters")])
def test_grad_scaler_steps_as_the_unscaled_run(method, level):
    # Powers of two: the scaled-and-unscaled run is the unscaled one to rounding; the scale doubles at every step
    # (scaler.update saw no inf). MGDA at the representation level: scaled head weights and trunk pass.
    kwargs = dict(loss_transform="log")
    steps = batches()[:3]
    net, balancer, _ = _train_with_scaler(method, level, None, steps, **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        scaled_net, scaled_balancer, results = _train_with_scaler(method, level, scaler, steps, **kwargs)
    assert all(r is not None for r in results)
    assert scaler.get_scale() == 2.0 ** (10 + len(steps))
    _assert_same_run(scaled_net, scaled_balancer, net, balancer)


def test_grad_scaler_overflow_skips_and_backs_off():
    X, Y = make_data()
    data = (X, [Y[0] * 0.01, Y[1], Y[2]])   # task0's loss ~0.26: 2^127 / 0.26, its log's cotangent, overflows
    idx = batches()[0]
    one_step, one_step_balancer, _ = _train_with_scaler("dbmtl", "parameters", None, [idx], data)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)           # an overflow: the scaler's business, no warning
        net, balancer, results = _train_with_scaler("dbmtl", "parameters", scaler, [idx], data)
        assert results == [None] and balancer.skipped_steps == 1 and balancer.last_step_skipped
        assert scaler.get_scale() == 2.0**126                         # scaler.step skipped, scaler.update halved
        assert int(keras.ops.convert_to_numpy(balancer.balancer.iterations)) == 0
        assert not np.any(keras.ops.convert_to_numpy(balancer.balancer.ema_gradients))
        for p, q in zip(net.parameters(), Net().parameters()):
            assert torch.equal(p, q)                                   # nothing moved
    # The skipped step changed nothing: overflow then step = the unscaled run's one step.
    net, balancer, results = _train_with_scaler("dbmtl", "parameters", torch.amp.GradScaler(
        "cpu", init_scale=2.0**127), [idx, idx], data)
    assert results[0] is None and results[1] is not None
    _assert_same_run(net, balancer, one_step, one_step_balancer)
    # An unusable loss under a scaler: warned, and the scaler skips too.
    x, ys = torch.tensor(X[idx]), [torch.tensor(y[idx]) for y in Y]
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    before = [p.detach().clone() for p in net.parameters()]
    optimizer.zero_grad()
    _, losses = task_losses(net, x, ys)
    with pytest.warns(RuntimeWarning, match="Unusable losses .*scaler.step skips"):
        assert balancer.backward({**losses, "task0": losses["task0"] * float("nan")}, scaler=scaler,
                                 shared_parameters=net.trunk.parameters()) is None
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0**125
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))
    with pytest.raises(TypeError, match="GradScaler"):
        balancer.backward(losses, scaler=2.0**16, shared_parameters=net.trunk.parameters())


# ---------------------------------------------------------------------- two processes (gloo)
def test_two_gloo_processes_train_like_one_on_the_global_batch(tmp_path):
    from tests.doors import torch_door_worker as worker

    ranks, single = gloo.run_ranks(lambda out: [sys.executable, worker.__file__, out], tmp_path, timeout=180,
                                   meanwhile=worker.train_all)
    assert set(ranks[0]) == set(ranks[1]) == set(single)
    for key in single:
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key], err_msg=key)
        np.testing.assert_allclose(ranks[0][key], single[key], rtol=1e-5, atol=1e-6, err_msg=key)


# ---------------------------------------------------------------------- bad input
def test_bad_input_names_the_fix(monkeypatch):
    X, Y = make_data()
    x, ys = torch.tensor(X[:BATCH]), [torch.tensor(y[:BATCH]) for y in Y]
    net = Net()
    balancer = keras_dbmtl.torch.Balancer("dbmtl")
    z, preds = net(x)
    with pytest.raises(ValueError, match="not a scalar"):
        balancer.backward({"a": ((preds[0] - ys[0]) ** 2).mean(0)}, shared_parameters=net.trunk.parameters())
    with pytest.raises(TypeError, match="dict"):
        balancer.backward(3.0, shared_parameters=net.trunk.parameters())
    with pytest.raises(ValueError, match="shared_parameters="):
        balancer.backward({"a": preds[0].mean()})
    with pytest.raises(ValueError, match="No shared parameters"):
        balancer.backward({"a": preds[0].mean()}, shared_parameters=[])
    unused = torch.nn.Parameter(torch.zeros(3))
    z, losses = task_losses(net, x, ys)
    with pytest.raises(ValueError, match="not reached by any loss"):
        balancer.backward(losses, shared_parameters=[*net.trunk.parameters(), unused])
    with pytest.raises(ValueError, match="not reached by any loss"):                 # with task_parameters= too
        keras_dbmtl.torch.Balancer("dbmtl").backward(losses, shared_parameters=[*net.trunk.parameters(), unused],
                                                     task_parameters=net.heads.parameters())
    with pytest.raises(ValueError, match="not reached by the features"):
        keras_dbmtl.torch.Balancer("mgda").backward(losses, features=z, shared_parameters=[unused])
    with pytest.raises(ValueError, match="batch axis"):
        keras_dbmtl.torch.Balancer("mgda").backward(losses, features=z.sum())
    z, losses = task_losses(net, x, ys)
    balancer.backward(losses, shared_parameters=net.trunk.parameters())
    z, losses = task_losses(net, x, ys)
    with pytest.raises(ValueError, match="task names changed"):
        balancer.backward({"x" + k: v for k, v in losses.items()}, shared_parameters=net.trunk.parameters())
    with pytest.raises(ValueError, match="does not require grad"):
        balancer.backward({k: v.detach() for k, v in losses.items()}, shared_parameters=net.trunk.parameters())
    with pytest.raises(TypeError, match="registered name"):
        keras_dbmtl.torch.Balancer(3)
    with pytest.warns(RuntimeWarning, match="Unusable losses"):
        z, losses = task_losses(net, x, ys)
        assert balancer.backward({**losses, "task1": losses["task1"] * float("nan")},
                                 shared_parameters=net.trunk.parameters()) is None
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(RuntimeError, match="KERAS_BACKEND=torch"):
        keras_dbmtl.torch.Balancer("dbmtl")
