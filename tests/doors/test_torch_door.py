"""Door 3 (`keras_dbmtl.torch.Balancer.backward` in a plain PyTorch loop) against independent float64 numpy replays.

The model is tests/reference.py's: a linear trunk z = X W + b (torch.nn.Linear, shared) and linear heads
pred_t = z v_t + c_t, MSE, torch.optim.SGD, the data of tests/test_training_matches_reference.py (losses spanning
10^4). The references are numpy only: `reference.replay` (DB-MTL's Algorithm 1), the IMTL-G closed form of
tests/balancers/test_imtl_g.py and PCGrad's Algorithm 1 of tests/balancers/test_pcgrad.py. Skipped unless Keras
runs on torch.
"""

import importlib.util
import os
import socket
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(keras.backend.backend() != "torch", reason="door 3: the torch backend only")

import keras_dbmtl
from tests import reference
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


# ---------------------------------------------------------------------- two processes (gloo)
def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_train_like_one_on_the_global_batch(tmp_path):
    from tests.doors import torch_door_worker as worker

    port, processes, outputs = _free_port(), [], []
    for rank in range(2):
        env = dict(os.environ, KERAS_BACKEND="torch", RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="2",
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        outputs.append(str(tmp_path / f"rank{rank}.npz"))
        processes.append(subprocess.Popen([sys.executable, worker.__file__, outputs[-1]], cwd=ROOT, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        logs = [p.communicate(timeout=180)[0] for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    for rank, p in enumerate(processes):
        assert p.returncode == 0, f"rank {rank} failed:\n{logs[rank][-3000:]}"
    ranks = [dict(np.load(out)) for out in outputs]
    single = worker.train_all()
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
