"""DB-MTL in a plain PyTorch training loop: your own `nn.Module`, your own optimizer, one call before `step()`.

    KERAS_BACKEND=torch python examples/torch_loop.py            # (the script sets it when unset)
    KERAS_BACKEND=torch python examples/torch_loop.py --epochs 5 --balancers dbmtl upgrad

The task of examples/quickstart.py, with no Keras model: two regression tasks whose MSE losses differ by 10^4
(`large` = 10 (tanh(...) + noise), `small` = 0.1 (tanh(...) + noise)) through a shared trunk with a 2-unit
bottleneck. Under equal weighting (`loss.backward()` of the sum) the trunk serves the large task and the small one
ends near predicting its mean; `keras_dbmtl.torch.Balancer("dbmtl").backward(losses, shared_parameters=...)` gives
the trunk DB-MTL's direction (log losses, EMA task gradients of equal norm) and each head its own gradient, so both
tasks are learned. Printed: each task's validation MSE / target variance (1.0 = predicting the mean) after the
last epoch. About 10 s on one CPU thread, imports included.
"""

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "torch")   # keras_dbmtl.torch needs it, set before keras is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402

import keras_dbmtl  # noqa: E402

SCALES = {"large": 10.0, "small": 0.1}


def make_data(n, seed):
    """x (n, 16); each task a scaled tanh of a random projection of its own half of x, plus 5 % noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 16)).astype("float32")
    projections = np.random.default_rng(1234).normal(size=(2, 8)) / np.sqrt(8.0)
    y = {}
    for i, (task, scale) in enumerate(SCALES.items()):
        signal = np.tanh(2.0 * x[:, 8 * i : 8 * (i + 1)] @ projections[i])
        y[task] = torch.tensor((scale * (signal + 0.05 * rng.normal(size=n)))[:, None].astype("float32"))
    return torch.tensor(x), y


class MultiTaskNet(torch.nn.Module):
    """A shared trunk ending in a 2-unit bottleneck, and one small head per task."""

    def __init__(self):
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
        self.heads = torch.nn.ModuleDict({task: torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(),
                                                                    torch.nn.Linear(16, 1)) for task in SCALES})

    def forward(self, x):
        z = self.trunk(x)
        return {task: head(z) for task, head in self.heads.items()}


def run(method, seed=0, epochs=30, batch_size=64):
    """Trains one network with `method` ("ew_backward": the plain sum's `.backward()`, or a balancer name);
    returns {task: validation MSE / target variance}."""
    torch.manual_seed(seed)
    x, y = make_data(2048, seed)
    x_val, y_val = make_data(1024, 100 + seed)
    net = MultiTaskNet()
    balancer = None if method == "ew_backward" else keras_dbmtl.torch.Balancer(method)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            optimizer.zero_grad()
            predictions = net(x[idx])
            losses = {task: torch.nn.functional.mse_loss(predictions[task], y[task][idx]) for task in SCALES}
            if balancer is None:
                sum(losses.values()).backward()
            else:
                balancer.backward(losses, shared_parameters=net.trunk.parameters())
            optimizer.step()
    with torch.no_grad():
        predictions = net(x_val)
        return {task: float(torch.mean((predictions[task] - y_val[task]) ** 2) / torch.var(y_val[task]))
                for task in SCALES}


def main(balancers=("ew_backward", "dbmtl"), epochs=30, seed=0, threads=1):
    torch.set_num_threads(threads)   # a tiny network: more threads only wait on each other (and on a busy machine)
    results = {}
    print(f"validation MSE / target variance after {epochs} epochs (1.0 = predicting the mean; lower is better)")
    print("method        " + "".join(f"{task:>10}" for task in SCALES) + "   seconds")
    for method in balancers:
        begin = time.time()
        results[method] = run(method, seed, epochs)
        print(f"{method:<12}  " + "".join(f"{results[method][t]:>10.3f}" for t in SCALES)
              + f"   {time.time() - begin:7.1f}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--balancers", nargs="+", default=["ew_backward", "dbmtl"],
                        help="'ew_backward' (the plain sum's .backward()) and/or balancer names")
    arguments = parser.parse_args()
    main(arguments.balancers, arguments.epochs, arguments.seed)
