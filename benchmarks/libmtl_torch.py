"""keras_dbmtl on the PyTorch backend against DB-MTL written by hand in plain PyTorch, the way LibMTL runs it.

The plain-PyTorch side (`PlainMTL`) has the same architectures and sizes as common.build_keras_model (torch.nn
modules), Adam, and LibMTL's DB-MTL step:

    losses -> log(loss + 1e-8); for each task: log_loss[t].backward(retain_graph=True) (the last without),
    copy every shared parameter's .grad into row t of a (T, P) buffer, zero the shared .grad;
    ema = g + beta_k (ema - g); alpha = max_t ||ema_t|| / (||ema_t|| + 1e-8); d = sum_t alpha_t ema_t;
    write d back into the shared .grad, optimizer.step()  (heads keep the gradient of their own log-loss).

EW is `sum(losses).backward(); optimizer.step()`. Both sides are timed interleaved in one process on one fixed
batch (keras: the model's compiled train function; plain: the step above), per model. Peak memory is measured by
memory.py in a fresh process per configuration.

    python benchmarks/libmtl_torch.py --models dense-T11,conv --json out.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402


# --------------------------------------------------------------------------- torch modules


def _torch_modules(model_name):
    """(encoder, heads: list of (name, module, loss function)) in plain torch, same sizes as the Keras models."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    def mse(pred, target):
        return F.mse_loss(pred, target)

    if model_name.startswith("dense-T"):
        t = common.num_tasks_of(model_name)
        h = common.DENSE["hidden"]
        encoder = nn.Sequential(nn.Linear(common.DENSE["inputs"], h), nn.ReLU(), nn.Linear(h, h), nn.ReLU())
        heads = [(f"t{i}", nn.Linear(h, 1), mse) for i in range(t)]
        return encoder, heads
    if model_name == "conv":
        c1, c2, c3 = common.CONV["channels"]
        encoder = nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(c2, c3, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(c3, common.CONV["dense"]), nn.ReLU(),
        )
        d = common.CONV["dense"]

        def cross_entropy(pred, target):
            return F.cross_entropy(pred, target.reshape(-1).long())

        heads = [("cls", nn.Linear(d, common.CONV["classes"]), cross_entropy),
                 ("reg1", nn.Linear(d, 1), mse), ("reg2", nn.Linear(d, 1), mse)]
        return encoder, heads
    if common.is_qm9(model_name):
        size = common.qm9_size(model_name)
        encoder = TorchMPNN(size["dim"], size["edge_hidden"], size["steps"], size["set2set_steps"], size["out_dim"])
        heads = [(t, nn.Linear(size["out_dim"], 1), mse) for t in common.QM9_TASKS]
        return encoder, heads
    raise ValueError(model_name)


def _mpnn_classes():
    import torch
    from torch import nn

    class Set2Set(nn.Module):
        def __init__(self, dim, steps):
            super().__init__()
            self.dim, self.steps = dim, steps
            self.lstm = nn.LSTMCell(2 * dim, dim)

        def forward(self, x, node_graph, num_graphs):
            segments = num_graphs + 1
            h = x.new_zeros(segments, self.dim)
            c = x.new_zeros(segments, self.dim)
            q_star = x.new_zeros(segments, 2 * self.dim)
            for _ in range(self.steps):
                h, c = self.lstm(q_star, (h, c))
                q = h
                score = (x * q[node_graph]).sum(-1)
                shift = torch.full((segments,), float("-inf"), dtype=x.dtype, device=x.device)
                shift = shift.scatter_reduce(0, node_graph, score.detach(), "amax", include_self=True)
                shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
                weight = torch.exp(score - shift[node_graph])
                total = x.new_zeros(segments).index_add(0, node_graph, weight)
                attention = weight / total[node_graph]
                r = x.new_zeros(segments, self.dim).index_add(0, node_graph, attention[:, None] * x)
                q_star = torch.cat([q, r], dim=-1)
            return q_star[:num_graphs]

    class TorchMPNN(nn.Module):
        """applications/qm9/model.py's MPNNEncoder in torch.nn (the reference's NNConv/GRU/Set2Set)."""

        def __init__(self, dim, edge_hidden, steps, set2set_steps, out_dim):
            super().__init__()
            self.dim, self.steps = dim, steps
            self.embed = nn.Linear(11, dim)
            self.edge_net = nn.Sequential(nn.Linear(5, edge_hidden), nn.ReLU(), nn.Linear(edge_hidden, dim * dim))
            self.root = nn.Parameter(torch.empty(dim, dim))
            nn.init.xavier_uniform_(self.root)
            self.bias = nn.Parameter(torch.zeros(dim))
            self.gru = nn.GRUCell(dim, dim)
            self.set2set = Set2Set(dim, set2set_steps)
            self.readout = nn.Linear(2 * dim, out_dim)

        def forward(self, inputs):
            x = torch.relu(self.embed(inputs["nodes"]))
            src, dst = inputs["edge_src"].long(), inputs["edge_dst"].long()
            node_graph = inputs["node_graph"].long()
            n = x.shape[0]
            kernel = self.edge_net(inputs["edges"]).view(-1, self.dim, self.dim)
            degree = x.new_zeros(n).index_add(0, dst, torch.ones_like(dst, dtype=x.dtype)).clamp(min=1.0)
            hidden = x
            out = x
            for _ in range(self.steps):
                messages = torch.bmm(out[src].unsqueeze(1), kernel).squeeze(1)
                agg = out.new_zeros(n, self.dim).index_add(0, dst, messages) / degree[:, None]
                m = torch.relu(agg + out @ self.root + self.bias)
                out = self.gru(m, hidden)
                hidden = out
            pooled = self.set2set(out, node_graph, inputs["graph_mask"].shape[0])
            return torch.relu(self.readout(pooled))

    return TorchMPNN


def TorchMPNN(*args, **kwargs):  # noqa: N802 - class factory (torch is imported lazily)
    return _mpnn_classes()(*args, **kwargs)


def _device():
    import torch

    return torch.device("cuda" if common.on_gpu() and torch.cuda.is_available() else "cpu")


def _to_torch(x):
    import numpy as np
    import torch

    if isinstance(x, dict):
        return {k: _to_torch(v) for k, v in x.items()}
    return torch.from_numpy(np.ascontiguousarray(x)).to(_device())


class PlainMTL:
    """A LibMTL-style multi-task trainer in plain PyTorch: `step()` is one training step on a fixed batch."""

    def __init__(self, model_name, method="dbmtl", lr=1e-3, beta=0.9, beta_sigma=0.0, seed=0):
        import torch

        torch.manual_seed(seed)
        self.method = method
        self.encoder, heads = _torch_modules(model_name)
        self.task_names = [name for name, _, _ in heads]
        self.heads = torch.nn.ModuleList([module for _, module, _ in heads])
        self.device = _device()
        self.encoder.to(self.device)
        self.heads.to(self.device)
        self.loss_fns = [fn for _, _, fn in heads]
        x, y = common.make_data(model_name)
        if model_name == "conv":
            x = x.transpose(0, 3, 1, 2)  # NCHW, as a torch user writes it
        self.x = _to_torch(x)
        self.y = [_to_torch(y[t]) for t in self.task_names]
        self.shared = [p for p in self.encoder.parameters()]
        self.grad_index = [p.numel() for p in self.shared]
        self.offsets = [sum(self.grad_index[:i]) for i in range(len(self.grad_index) + 1)]
        self.grad_dim = self.offsets[-1]
        self.num_tasks = len(self.task_names)
        params = list(self.encoder.parameters()) + list(self.heads.parameters())
        self.optimizer = torch.optim.Adam(params, lr=lr)
        self.beta, self.beta_sigma = beta, beta_sigma
        self.k = 0
        self.grad_buffer = torch.zeros(self.num_tasks, self.grad_dim, device=self.device)

    def state_bytes(self):
        """Bytes of the training state: parameters, their .grad, Adam's two moments, the EMA buffer."""
        n = sum(p.numel() for p in self.encoder.parameters()) + sum(p.numel() for p in self.heads.parameters())
        total = 4 * n * 4
        if self.method == "dbmtl":
            total += 4 * self.grad_buffer.numel()
        return total

    def _grad2vec(self, row):
        for i, p in enumerate(self.shared):
            if p.grad is not None:
                row[self.offsets[i]:self.offsets[i + 1]] = p.grad.data.view(-1)

    def _zero_shared(self):
        for p in self.shared:
            if p.grad is not None:
                p.grad.zero_()

    def _reset_grad(self, new_grads):
        for i, p in enumerate(self.shared):
            p.grad.data = new_grads[self.offsets[i]:self.offsets[i + 1]].contiguous().view(p.data.size()).clone()

    def step(self):
        import torch

        self.optimizer.zero_grad(set_to_none=False)
        rep = self.encoder(self.x)
        losses = torch.stack([fn(head(rep), target) for head, fn, target in zip(self.heads, self.loss_fns, self.y)])
        if self.method == "ew":
            losses.sum().backward()
        else:
            self.k += 1
            log_losses = torch.log(losses + 1e-8)
            grads = torch.zeros(self.num_tasks, self.grad_dim, device=self.device)
            for t in range(self.num_tasks):
                log_losses[t].backward(retain_graph=(t + 1) != self.num_tasks)
                self._grad2vec(grads[t])
                self._zero_shared()
            beta_k = self.beta / self.k ** self.beta_sigma
            self.grad_buffer = grads + beta_k * (self.grad_buffer - grads)
            norms = self.grad_buffer.norm(dim=-1)
            alpha = norms.max() / (norms + 1e-8)
            new_grads = sum(alpha[t] * self.grad_buffer[t] for t in range(self.num_tasks))
            self._reset_grad(new_grads)
        self.optimizer.step()
        return losses.detach()


# --------------------------------------------------------------------------- benchmark


def _synchronised(step):
    def run():
        out = step()
        common.synchronize(out)
        return out

    return run


def time_model(model_name, repeats, rounds, warmup):
    functions = {}
    x, y = common.make_data(model_name)
    keras_models = {}
    for method in ("ew", "dbmtl"):
        model, losses = common.build_keras_model(model_name)
        common.compile_model(model, losses, "torch", balancer=method)
        functions[f"keras_{method}"] = common.TrainFunctionRunner(model, x, y)
        keras_models[method] = model
        plain = PlainMTL(model_name, method)
        plain.step()
        functions[f"plain_{method}"] = _synchronised(plain.step)
    timings = common.interleaved_medians(functions, repeats=repeats, rounds=rounds, warmup=warmup)
    ms = {k: 1e3 * v["median"] for k, v in timings.items()}
    wall = {k: 1e3 * v["wall"] for k, v in timings.items()}
    return {
        "model": model_name,
        "num_tasks": common.num_tasks_of(model_name),
        "num_shared_parameters": common.num_shared_parameters(keras_models["ew"]),
        "plain_num_shared_parameters": PlainMTL(model_name, "ew").grad_dim,
        "ms": ms,
        "wall_ms": wall,
        "dbmtl_keras_over_plain": ms["keras_dbmtl"] / ms["plain_dbmtl"],
        "ew_keras_over_plain": ms["keras_ew"] / ms["plain_ew"],
        "dbmtl_over_ew_keras": ms["keras_dbmtl"] / ms["keras_ew"],
        "dbmtl_over_ew_plain": ms["plain_dbmtl"] / ms["plain_ew"],
        "clock": common.CLOCK,
        "threads": common.threads(),
    }


def main(models=None, repeats=10, rounds=5, warmup=1, out=None):
    common.use_backend("torch")
    models = common.parse_models(models) if isinstance(models, (str, type(None))) else list(models)
    results = []
    for model_name in models:
        if common.is_qm9(model_name) and not common.qm9_available():
            results.append({"model": model_name, "pending": True})
            continue
        t0 = time.perf_counter()
        result = time_model(model_name, repeats, rounds, warmup)
        result["wall_s"] = time.perf_counter() - t0
        common.log(f"[libmtl {model_name}] keras/plain DB-MTL {result['dbmtl_keras_over_plain']:.2f}, "
                   f"EW {result['ew_keras_over_plain']:.2f} ({result['wall_s']:.0f} s)")
        results.append(result)
    payload = {"benchmark": "libmtl_torch", "versions": common.backend_versions(), "machine": common.machine_info(),
               "repeats": repeats, "rounds": rounds, "results": results}
    if out:
        common.write_json(out, payload)
    return payload


def _cli(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="all")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=common.DEFAULT_THREADS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    common.use_backend("torch", args.threads)
    main(models=args.models, repeats=args.repeats, rounds=args.rounds, warmup=args.warmup, out=args.json)


if __name__ == "__main__":
    _cli()
