"""keras_dbmtl side by side with the real LibMTL (and TorchJD) on the paper's QM9 model, in one run.

The model: the paper's MPNN (dim 64, edge network 5 -> 128 -> 64*64, 3 message-passing steps with mean
aggregation and a GRU, Set2Set with 3 steps, Linear(128 -> 64) + ReLU), 11 linear heads, MSE, Adam 1e-3, on one
synthetic batch of 32 complete molecular graphs of 9-27 atoms (`common.make_qm9_batch`, seed 0).

Sides (each "side" is one train step; the methods are EW, DB-MTL and UPGrad):

- ours: keras_dbmtl's MultiTaskModel with applications/qm9/model.py's encoder, on TensorFlow (`tf-graph`,
  `tf-xla`), PyTorch (`torch`) and JAX (`jax`); the batch padded as applications.qm9.data.collate pads it.
- `libmtl`: LibMTL's own `Trainer` (HPS architecture, its AbsWeighting subclass as the weighting; one step is the
  body of `Trainer.train`'s batch loop: forward, `_compute_loss`, `zero_grad`, `model.backward(losses)`,
  `optimizer.step()`), the encoder built as LibMTL's QM9 example builds it: PyTorch Geometric `NNConv` (mean
  aggregation) whose edge network runs inside every message-passing step, `torch.nn.GRU`, PyG `Set2Set`.
  EW is LibMTL's `EW`. DB-MTL is LibMTL's `DB_MTL` when the installed LibMTL has it (the GitHub source tree: put
  it on the path with LIBMTL_SRC=/path/to/LibMTL-repo); LibMTL 1.1.5 from PyPI has none, and then the DB-MTL row
  is `DBMTLOnLibMTL` below: DB-MTL's update written here on LibMTL's own AbsWeighting helpers
  (`_compute_grad_dim`, `_compute_grad(mode='backward')`, `_reset_grad`), labelled as such in the output.
- `libmtl-once`: the same, with the edge network evaluated once per forward pass (its output, the per-edge
  kernels, fed to the three steps): the change our encoder makes; the same function and gradients.
- `door`, `door-once`: keras_dbmtl's door 3 in a plain PyTorch loop on the two PyG encoders above (the same model
  and batch as `libmtl` / `libmtl-once` / `torchjd` / `torchjd-once`): one step = `optimizer.zero_grad()`, the
  forward pass, the losses dict (MSE of each Linear(64, 1) head), `keras_dbmtl.torch.Balancer(method).backward(
  losses, shared_parameters=encoder.parameters())`, `optimizer.step()` (torch.optim.Adam 1e-3); methods EW,
  DB-MTL, UPGrad (the door's CPU default, `vectorize=False`: one `torch.autograd.grad` per task).
- `torchjd`, `torchjd-once`: TorchJD's `mtl_backward(losses, features=...)` + `jac_to_grad(encoder params,
  UPGrad())` on the two PyG encoders above (torch.optim.Adam step), against our `upgrad` balancer.

Timing: one worker process per framework (TensorFlow: tf-graph and tf-xla; keras on torch; JAX; the reference
side: LibMTL, door 3 and TorchJD in plain torch), each with the same thread count (default 2). The workers build
and warm up their steps, then the coordinator asks them, in turn, for `--per-round` timed steps of one
configuration at a time (the order reversed every other round), so only one worker computes at any moment and a
slow phase of the shared machine hits every configuration alike. Reported: medians of wall clock and of the
worker's CPU time (all its threads) over the rounds. `--report` also prints the door's ratios (`door_ratio_table`):
door / LibMTL (DB-MTL, EW), door / TorchJD (UPGrad) and door / our `torch` side, each as the ratio of the medians
and as the median and range of the per-round ratios (the two configurations' steps of the same round).

Peak memory (`--memory`): each configuration in a fresh process (memory.py's counters): the process' peak
resident set size over building, 2 warm-up steps and 3 more steps, and the transient peak of a step alone.

Missing optional packages (LibMTL, torch_geometric, torchjd; the door sides need torch_geometric) skip their
side with a message; nothing fails. Install them outside the project's environment, e.g.

    pip install --no-deps --target $BENCHDEPS LibMTL torch_geometric torchjd xxhash psutil quadprog qpsolvers
    PYTHONPATH=$BENCHDEPS:$PWD nice -n 15 python benchmarks/libmtl_compare.py --rounds 5 \
        --json benchmarks/results_libmtl/step_time.json
    PYTHONPATH=$BENCHDEPS:$PWD nice -n 15 python benchmarks/libmtl_compare.py --memory \
        --json benchmarks/results_libmtl/memory.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks import common  # noqa: E402

MARK = "LIBMTL_COMPARE_JSON "
BATCH = 32
OURS = ("tf-xla", "tf-graph", "torch", "jax")
REFERENCE = ("libmtl", "libmtl-once", "door", "door-once", "torchjd", "torchjd-once")
SIDES = OURS + REFERENCE
METHODS = ("ew", "dbmtl", "upgrad")
# Which worker process runs a side (one framework per process: Keras fixes its backend at import).
WORKER_OF = {"tf-xla": "tensorflow", "tf-graph": "tensorflow-graph", "torch": "torch", "jax": "jax",
             **{side: "reference" for side in REFERENCE}}
METHODS_OF = {"tf-graph": ("ew", "dbmtl"), "tf-xla": ("ew", "dbmtl"), "jax": ("ew", "dbmtl"),  # upgrad: torch only
              "libmtl": ("ew", "dbmtl"), "libmtl-once": ("ew", "dbmtl"), "door": METHODS, "door-once": METHODS,
              "torchjd": ("upgrad",), "torchjd-once": ("upgrad",)}
PACKAGES_OF = {"libmtl": ("LibMTL", "torch_geometric"), "libmtl-once": ("LibMTL", "torch_geometric"),
               "door": ("torch_geometric",), "door-once": ("torch_geometric",),
               "torchjd": ("torchjd", "torch_geometric"), "torchjd-once": ("torchjd", "torch_geometric")}
INSTALL_HINT = ("pip install --no-deps --target DIR LibMTL torch_geometric torchjd xxhash psutil quadprog "
                "qpsolvers, then PYTHONPATH=DIR:$PWD")


def paper_size():
    """The paper's QM9 model (common.QM9_PAPER) at batch BATCH."""
    return dict(common.QM9_PAPER, batch=BATCH)


def configurations(sides, methods):
    """[(side, method)] in a fixed order: the sides as given, each side's methods in METHODS order."""
    return [(s, m) for s in sides for m in METHODS if m in methods and m in METHODS_OF.get(s, METHODS)]


def missing_packages(side, find_spec=importlib.util.find_spec):
    """The optional packages a side needs and this environment lacks ([] for our sides)."""
    missing = []
    for name in PACKAGES_OF.get(side, ()):
        try:
            if find_spec(name) is None:
                missing.append(name)
        except (ImportError, ValueError):
            missing.append(name)
    return missing


def skip_message(side, missing):
    return f"{side}: skipped, {', '.join(missing)} not importable ({INSTALL_HINT})"


# --------------------------------------------------------------------------- data


def paper_batch(seed=0):
    """(x, y): the padded disjoint-mode batch our model reads (common.make_qm9_batch, complete graphs)."""
    import numpy as np

    return common.make_qm9_batch(BATCH, np.random.default_rng(seed), edges=paper_size()["edges"])


def pyg_batch(x, y):
    """The same molecules as a PyTorch Geometric batch (padding removed) and LibMTL's label dict."""
    import numpy as np
    import torch
    from torch_geometric.data import Data

    n_real = int((x["node_graph"] < BATCH).sum())
    real = x["edge_src"] < n_real
    data = Data(x=torch.from_numpy(x["nodes"][:n_real]),
                edge_index=torch.from_numpy(np.stack([x["edge_src"][real], x["edge_dst"][real]]).astype(np.int64)),
                edge_attr=torch.from_numpy(x["edges"][real]),
                batch=torch.from_numpy(x["node_graph"][:n_real].astype(np.int64)))
    data.num_graphs = BATCH
    labels = {t: torch.from_numpy(y[t]) for t in common.QM9_TASKS}
    return data, labels


# --------------------------------------------------------------------------- the reference side (plain torch)


def pyg_encoder(edge_net_once):
    """The QM9 encoder as LibMTL's example builds it (NNConv + GRU + Set2Set); `edge_net_once` evaluates the edge
    network once per forward pass and gives its output to the three steps instead."""
    import torch
    from torch import nn
    from torch.nn import functional as F
    from torch_geometric.nn import NNConv
    from torch_geometric.nn.aggr import Set2Set

    size = paper_size()
    dim = size["dim"]

    class KernelNNConv(NNConv):
        """NNConv whose `edge_attr` argument is already the edge network's output (E, in * out)."""

        def message(self, x_j, edge_attr):
            kernel = edge_attr.view(-1, self.in_channels_l, self.out_channels)
            return torch.matmul(x_j.unsqueeze(1), kernel).squeeze(1)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(11, dim)
            edge_net = nn.Sequential(nn.Linear(5, size["edge_hidden"]), nn.ReLU(),
                                     nn.Linear(size["edge_hidden"], dim * dim))
            conv_class = KernelNNConv if edge_net_once else NNConv
            self.conv = conv_class(dim, dim, edge_net, aggr="mean")
            self.gru = nn.GRU(dim, dim)
            self.set2set = Set2Set(dim, processing_steps=size["set2set_steps"])
            self.readout = nn.Linear(2 * dim, size["out_dim"])

        def forward(self, data):
            out = F.relu(self.embed(data.x))
            h = out.unsqueeze(0)
            edge_input = self.conv.nn(data.edge_attr) if edge_net_once else data.edge_attr
            for _ in range(size["steps"]):
                m = F.relu(self.conv(out, data.edge_index, edge_input))
                out, h = self.gru(m.unsqueeze(0), h)
                out = out.squeeze(0)
            pooled = self.set2set(out, data.batch, dim_size=BATCH)
            return F.relu(self.readout(pooled))

    return Encoder


def import_libmtl():
    """Imports LibMTL (from LIBMTL_SRC, a LibMTL source tree, when set). LibMTL's __init__ imports LibMTL.model
    (ResNets, which need torchvision); this benchmark uses none of them, so without torchvision an empty
    LibMTL.model stands in for it. Returns a note saying which LibMTL was imported."""
    import types

    source = os.environ.get("LIBMTL_SRC")
    if source and source not in sys.path:
        sys.path.insert(0, source)
    note = ""
    if "LibMTL" not in sys.modules and importlib.util.find_spec("torchvision") is None:
        sys.modules["LibMTL.model"] = types.ModuleType("LibMTL.model", "stand-in: torchvision is not installed")
        note = " (LibMTL.model, its torchvision ResNets, not imported)"
    import LibMTL

    where = "LIBMTL_SRC" if source else "the installed package"
    return f"LibMTL from {where}{note}"


def dbmtl_weighting():
    """(class, label): LibMTL's DB_MTL when the installed LibMTL has it, else DBMTLOnLibMTL."""
    import_libmtl()
    import LibMTL.weighting as weighting

    if hasattr(weighting, "DB_MTL"):
        return weighting.DB_MTL, "LibMTL's DB_MTL"
    return dbmtl_on_libmtl(), ("DB-MTL written here on LibMTL's AbsWeighting helpers (this LibMTL has no DB_MTL: "
                               "_compute_grad(mode='backward') of log(loss + 1e-8), EMA, max-norm scaling, "
                               "_reset_grad)")


def dbmtl_on_libmtl():
    """DB-MTL's update (paper Eq. 5-7) on LibMTL's AbsWeighting machinery, for a LibMTL without DB_MTL.

        g_t = grad_shared log(l_t + 1e-8)           (LibMTL's _compute_grad, one backward per task)
        ema_t <- g_t + beta_k (ema_t - g_t),  beta_k = beta / k**beta_sigma
        d = sum_t (max_j ||ema_j|| / (||ema_t|| + 1e-8)) ema_t   -> written to the shared .grad (_reset_grad)
    Heads keep the gradient of their own log-loss, accumulated by the per-task backward passes.
    """
    import numpy as np
    import torch
    from LibMTL.weighting import AbsWeighting

    class DBMTLOnLibMTL(AbsWeighting):
        def init_param(self):
            self.step = 0
            self._compute_grad_dim()
            self.grad_buffer = torch.zeros(self.task_num, self.grad_dim, device=self.device)

        def backward(self, losses, **kwargs):
            self.step += 1
            beta_k = kwargs.get("DB_beta", 0.9) / self.step ** kwargs.get("DB_beta_sigma", 0.0)
            self._compute_grad_dim()
            grads = self._compute_grad(torch.log(losses + 1e-8), mode="backward")
            self.grad_buffer = grads + beta_k * (self.grad_buffer - grads)
            norms = self.grad_buffer.norm(dim=-1)
            scale = norms.max() / (norms + 1e-8)
            self._reset_grad((scale[:, None] * self.grad_buffer).sum(0))
            return np.ones(self.task_num)

    return DBMTLOnLibMTL


def libmtl_trainer(weighting, encoder_class, decoders, weight_args):
    """LibMTL's `Trainer` (HPS, Adam 1e-3, MSE on every QM9 task) on the CPU, in training mode."""
    import torch
    from LibMTL import Trainer
    from LibMTL.architecture import HPS
    from LibMTL.loss import AbsLoss

    class MSE(AbsLoss):
        def compute_loss(self, pred, gt):
            return torch.nn.functional.mse_loss(pred, gt)

    class CPUTrainer(Trainer):
        """LibMTL 1.1.5's Trainer fixes the device to cuda:0; on this machine the step runs on the CPU."""

        def _prepare_model(self, *args):
            self.device = torch.device("cpu")
            super()._prepare_model(*args)

    task_dict = {t: {"metrics": ["MAE"], "metrics_fn": None, "loss_fn": MSE(), "weight": [0]}
                 for t in common.QM9_TASKS}
    trainer = CPUTrainer(task_dict=task_dict, weighting=weighting, architecture=HPS, encoder_class=encoder_class,
                         decoders=decoders, rep_grad=False, multi_input=False,
                         optim_param={"optim": "adam", "lr": 1e-3}, scheduler_param=None,
                         weight_args=weight_args, arch_args={})
    trainer.model.train()
    if weight_args:
        # LibMTL 1.1.5 clears the shared gradients between tasks with encoder.zero_grad(), which on torch >= 2.0
        # sets them to None, and _reset_grad then fails on `param.grad.data`; LibMTL's current source zeroes them
        # in place (zero_grad(set_to_none=False)), which is what this does.
        trainer.model.zero_grad_share_params = lambda: trainer.model.encoder.zero_grad(set_to_none=False)
    return trainer


def libmtl_trainer_step(trainer, data, labels):
    """The body of `Trainer.train`'s batch loop (the meter's metric update left out), as a step function."""
    def step():
        preds = trainer.model(data)
        losses = trainer._compute_loss(preds, labels)
        trainer.optimizer.zero_grad()
        trainer.model.backward(losses, **trainer.kwargs["weight_args"])
        trainer.optimizer.step()
        for loss in trainer.meter.losses.values():  # the per-batch loss records of the meter (reset per epoch)
            loss._reinit()
        return losses

    return step


def libmtl_step(side, method, x, y):
    """(step function, info) for LibMTL's Trainer on the PyG encoder."""
    import torch

    source = import_libmtl()
    from LibMTL.weighting import EW

    torch.manual_seed(0)
    data, labels = pyg_batch(x, y)
    if method == "ew":
        weighting, label = EW, "LibMTL's EW"
    else:
        weighting, label = dbmtl_weighting()
    encoder = pyg_encoder(edge_net_once=side == "libmtl-once")
    decoders = torch.nn.ModuleDict({t: torch.nn.Linear(paper_size()["out_dim"], 1) for t in common.QM9_TASKS})
    weight_args = {"DB_beta": 0.9, "DB_beta_sigma": 0.0} if method == "dbmtl" else {}
    trainer = libmtl_trainer(weighting, encoder, decoders, weight_args)
    encoder_params = sum(p.numel() for p in trainer.model.encoder.parameters())
    return (libmtl_trainer_step(trainer, data, labels),
            {"weighting": label, "libmtl": source, "num_shared_parameters": encoder_params})


def mtl_losses(encoder, heads, inputs, targets):
    """losses_of() -> ({task: MSE of its head on the encoder's output}, that output z): one forward pass."""
    import torch

    def losses_of():
        z = encoder(inputs)
        return {t: torch.nn.functional.mse_loss(head(z), target)
                for t, head, target in zip(common.QM9_TASKS, heads, targets)}, z

    return losses_of


def pyg_model(edge_net_once, x, y):
    """(encoder, heads, optimizer, losses_of) of the plain-torch sides (door, TorchJD) on the PyG encoder: its weights
    from torch.manual_seed(0), 11 Linear(64, 1) heads, torch.optim.Adam 1e-3 on both, `mtl_losses` on the batch."""
    import torch

    torch.manual_seed(0)
    data, labels = pyg_batch(x, y)
    encoder = pyg_encoder(edge_net_once)()
    heads = torch.nn.ModuleList([torch.nn.Linear(paper_size()["out_dim"], 1) for _ in common.QM9_TASKS])
    optimizer = torch.optim.Adam(list(encoder.parameters()) + list(heads.parameters()), lr=1e-3)
    return encoder, heads, optimizer, mtl_losses(encoder, heads, data, [labels[t] for t in common.QM9_TASKS])


def door_train_step(method, encoder, optimizer, losses_of, features=False):
    """(step, balancer): door 3's step, `optimizer.zero_grad()`, the forward pass (`losses_of`),
    `keras_dbmtl.torch.Balancer(method).backward(losses, shared_parameters=encoder.parameters())` (with
    `features=z` when `features`), `optimizer.step()`. Needs Keras on the torch backend."""
    import keras_dbmtl

    balancer = keras_dbmtl.torch.Balancer(method)

    def step():
        optimizer.zero_grad()
        losses, z = losses_of()
        if features:
            balancer.backward(losses, shared_parameters=encoder.parameters(), features=z)
        else:
            balancer.backward(losses, shared_parameters=encoder.parameters())
        optimizer.step()
        return losses

    return step, balancer


def torchjd_train_step(shared, optimizer, losses_of, chunk):
    """TorchJD's step: `optimizer.zero_grad()`, the forward pass, `mtl_backward(losses, features=z,
    parallel_chunk_size=chunk or None)`, `jac_to_grad(shared, UPGrad())`, `optimizer.step()`."""
    from torchjd.aggregation import UPGrad
    from torchjd.autojac import jac_to_grad, mtl_backward

    aggregator = UPGrad()
    shared = list(shared)

    def step():
        optimizer.zero_grad()
        losses, z = losses_of()
        mtl_backward(list(losses.values()), features=z, parallel_chunk_size=chunk or None)
        jac_to_grad(shared, aggregator)
        optimizer.step()
        return losses

    return step


def door_step(side, method, x, y):
    """(step function, info): door 3 (`keras_dbmtl.torch.Balancer(method).backward`) + Adam on the PyG encoder."""
    encoder, _, optimizer, losses_of = pyg_model(side == "door-once", x, y)
    step, balancer = door_train_step(method, encoder, optimizer, losses_of)
    return step, {"code": f"keras_dbmtl.torch.Balancer({method!r}).backward(losses, "
                          "shared_parameters=encoder.parameters()) + torch.optim.Adam",
                  "vectorize": balancer.vectorize,
                  "num_shared_parameters": sum(p.numel() for p in encoder.parameters())}


TORCHJD_CHUNK = int(os.environ.get("TORCHJD_CHUNK", "1"))


def torchjd_step(side, x, y, chunk=None):
    """(step function, info): TorchJD's mtl_backward + UPGrad on the PyG encoder, Adam.

    `chunk` is mtl_backward's parallel_chunk_size (env TORCHJD_CHUNK, default 1: one task's backward at a time,
    as LibMTL; 0 = None, TorchJD's default, all tasks at once through torch.vmap, which on this model falls back
    to a per-sample loop for the GRU's backward and was ~1.5-2x slower than chunk 1, see RESULTS_libmtl.md)."""
    chunk = TORCHJD_CHUNK if chunk is None else chunk
    encoder, _, optimizer, losses_of = pyg_model(side == "torchjd-once", x, y)
    shared = list(encoder.parameters())
    return torchjd_train_step(shared, optimizer, losses_of, chunk), {
        "aggregator": "torchjd UPGrad() (quadprog projector)", "parallel_chunk_size": chunk or None,
        "num_shared_parameters": sum(p.numel() for p in shared)}


# --------------------------------------------------------------------------- our side (keras_dbmtl)


def keras_step(mode, method, x, y):
    """(step function, info): keras_dbmtl's compiled train function (common.TrainFunctionRunner)."""
    from applications.qm9.model import build_model

    import keras

    keras.utils.set_random_seed(0)
    s = paper_size()
    model = build_model(common.QM9_TASKS, dim=s["dim"], edge_hidden=s["edge_hidden"], steps=s["steps"],
                        set2set_steps=s["set2set_steps"], out_dim=s["out_dim"])
    common.compile_model(model, {t: "mse" for t in common.QM9_TASKS}, mode, balancer=method)
    runner = common.TrainFunctionRunner(model, x, y)
    return runner, {"num_shared_parameters": common.num_shared_parameters(model)}


def build_step(side, method, x, y):
    if side in OURS:
        return keras_step(side, method, x, y)
    if side.startswith("libmtl"):
        return libmtl_step(side, method, x, y)
    if side.startswith("door"):
        return door_step(side, method, x, y)
    return torchjd_step(side, x, y)


# --------------------------------------------------------------------------- worker processes


def _send(payload):
    print(MARK + json.dumps(payload, default=float), flush=True)


def worker(sides, methods, warmup):
    """Builds the steps of its sides, warms them up, then times steps on request (stdin: one JSON a line)."""
    x, y = paper_batch()
    steps, infos = {}, {}
    for side, method in configurations(sides, methods):
        name = f"{side}:{method}"
        missing = missing_packages(side)
        if missing:
            infos[name] = {"skipped": skip_message(side, missing)}
            continue
        t0 = time.perf_counter()
        try:
            step, info = build_step(side, method, x, y)
            for _ in range(max(1, warmup)):
                step()
        except Exception as error:  # a side that cannot run is reported, not fatal
            infos[name] = {"skipped": f"{side}: {type(error).__name__}: {error}"[:500]}
            continue
        info["setup_s"] = time.perf_counter() - t0
        steps[name], infos[name] = step, info
    _send({"ready": True, "infos": infos})
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("cmd") == "quit":
            break
        step = steps[request["name"]]
        wall, cpu = [], []
        for _ in range(int(request["n"])):
            c0, t0 = time.process_time(), time.perf_counter()
            step()
            t1, c1 = time.perf_counter(), time.process_time()
            wall.append(t1 - t0)
            cpu.append(c1 - c0)
        _send({"wall": wall, "cpu": cpu})


def _read(proc):
    for line in proc.stdout:
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise RuntimeError(f"worker exited (rc {proc.wait()})")


def _backend_of(group):
    return {"reference": "torch", "tensorflow-graph": "tensorflow"}.get(group, group)


def _worker_env(group, threads):
    env = dict(os.environ)
    env["KERAS_BACKEND"] = _backend_of(group)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


def start_worker(group, group_sides, methods, threads, warmup):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", group, "--sides", ",".join(group_sides),
           "--methods", ",".join(methods), "--threads", str(threads), "--warmup", str(warmup)]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=_worker_env(group, threads), cwd=os.path.dirname(HERE))


def run_timing(sides, methods, rounds, per_round, threads, warmup, save=None):
    groups, infos, procs, runnable, samples = {}, {}, {}, [], {}
    for side in sides:
        missing = missing_packages(side)
        if missing:  # skipped here, without starting a worker
            infos.update({f"{side}:{m}": {"skipped": skip_message(side, missing)} for m in METHODS})
        else:
            groups.setdefault(WORKER_OF[side], []).append(side)
    try:
        # The workers build in parallel (their steps are timed only once all are ready).
        for group, group_sides in groups.items():
            procs[group] = start_worker(group, group_sides, methods, threads, warmup)
        for group, proc in procs.items():
            try:
                ready = _read(proc)
            except RuntimeError as error:
                for side in groups[group]:
                    infos[side] = {"skipped": f"{side}: worker failed: {error}"}
                continue
            infos.update(ready["infos"])
        for side, method in configurations(sides, methods):
            name = f"{side}:{method}"
            info = infos.get(name) or infos.get(side)
            if info is None or "skipped" in info:
                common.log(f"[libmtl_compare] {(info or {}).get('skipped', name + ': not built')}")
                continue
            runnable.append(name)
            common.log(f"[libmtl_compare] {name} ready ({info['setup_s']:.0f} s setup)")
        samples = {name: {"wall": [], "cpu": []} for name in runnable}
        for r in range(rounds):
            order = runnable if r % 2 == 0 else list(reversed(runnable))
            for name in order:
                group = WORKER_OF[name.split(":")[0]]
                if "died" in infos.get(group, {}):
                    continue
                proc = procs[group]
                try:
                    proc.stdin.write(json.dumps({"cmd": "run", "name": name, "n": per_round}) + "\n")
                    proc.stdin.flush()
                    out = _read(proc)
                except (BrokenPipeError, OSError, RuntimeError) as error:  # e.g. killed for memory: go on
                    infos[group] = {"died": f"worker {group} died at {name} (rc {proc.poll()}): {error}"}
                    common.log(f"[libmtl_compare] {infos[group]['died']}")
                    continue
                samples[name]["wall"] += out["wall"]
                samples[name]["cpu"] += out["cpu"]
            common.log(f"[libmtl_compare] round {r + 1}/{rounds} done")
            if save is not None:  # the rounds so far, in case the run is cut short
                save(_timing_rows(sides, methods, infos, samples), r + 1)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                try:
                    proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                    proc.stdin.close()
                except (BrokenPipeError, OSError):
                    pass
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return _timing_rows(sides, methods, infos, samples)


def _timing_rows(sides, methods, infos, samples):
    rows = []
    for side, method in configurations(sides, methods):
        name = f"{side}:{method}"
        info = dict(infos.get(name) or infos.get(side, {}), **infos.get(WORKER_OF.get(side), {}))
        row = {"side": side, "method": method, **info}
        if samples.get(name, {}).get("wall"):
            row["wall_ms"] = 1e3 * statistics.median(samples[name]["wall"])
            row["cpu_ms"] = 1e3 * statistics.median(samples[name]["cpu"])
            row["samples"] = len(samples[name]["wall"])
            row["wall_ms_all"] = [1e3 * v for v in samples[name]["wall"]]
            row["cpu_ms_all"] = [1e3 * v for v in samples[name]["cpu"]]
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- peak memory (fresh processes)


def memory_child(side, method, steps=3):
    from benchmarks import memory

    x, y = paper_batch()
    if side in OURS:
        import keras  # noqa: F401  (framework imported before the baseline)

        if side.startswith("tf"):
            import tensorflow  # noqa: F401
    else:
        import torch  # noqa: F401
        import torch_geometric  # noqa: F401

        if side.startswith("door"):
            import keras_dbmtl  # noqa: F401  (keras and the door, imported before the baseline)
    rss0, counter = memory._reset_peak()
    t0 = time.perf_counter()
    step, info = build_step(side, method, x, y)
    step()
    step()
    setup_peak = memory._peak(counter)
    rss1, counter = memory._reset_peak()
    for _ in range(steps):
        step()
    step_peak = memory._peak(counter)
    return {"side": side, "method": method, **info, "rss_before_mb": rss0, "rss_after_setup_mb": rss1,
            "peak_rss_mb": max(setup_peak, step_peak), "setup_peak_mb": setup_peak - rss0,
            "step_peak_mb": step_peak - rss1, "counter": counter, "seconds": time.perf_counter() - t0}


def run_memory(sides, methods, threads, timeout=900):
    rows = []
    for side, method in configurations(sides, methods):
        missing = missing_packages(side)
        if missing:
            rows.append({"side": side, "method": method, "skipped": skip_message(side, missing)})
            common.log(f"[libmtl_compare memory] {rows[-1]['skipped']}")
            continue
        group = WORKER_OF[side]
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", f"{side}:{method}",
               "--threads", str(threads)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env=_worker_env(group, threads), cwd=os.path.dirname(HERE))
            lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
            if lines:
                rows.append(json.loads(lines[-1][len(MARK):]))
            else:
                rows.append({"side": side, "method": method,
                             "skipped": (proc.stderr or "no output").strip().splitlines()[-1:]})
        except subprocess.TimeoutExpired:
            rows.append({"side": side, "method": method, "skipped": f"timed out after {timeout} s"})
        r = rows[-1]
        common.log(f"[libmtl_compare memory] {side}:{method} "
                   + (f"peak RSS {r['peak_rss_mb']:.0f} MB, step peak {r['step_peak_mb']:.0f} MB"
                      if "peak_rss_mb" in r else f"skipped: {r['skipped']}"))
    return rows


# --------------------------------------------------------------------------- report

WHOSE = {"tf-xla": "keras_dbmtl, TensorFlow jit_compile=True", "tf-graph": "keras_dbmtl, TensorFlow tf.function",
         "torch": "keras_dbmtl, PyTorch (eager)", "jax": "keras_dbmtl, JAX (jax.jit)",
         "libmtl": "LibMTL Trainer, PyG NNConv (edge net per step)",
         "libmtl-once": "LibMTL Trainer, PyG NNConv, edge net once per forward",
         "door": "keras_dbmtl door 3, torch.Balancer.backward, PyG (edge net per step)",
         "door-once": "keras_dbmtl door 3, torch.Balancer.backward, PyG, edge net once per forward",
         "torchjd": "TorchJD mtl_backward + UPGrad, PyG (edge net per step)",
         "torchjd-once": "TorchJD mtl_backward + UPGrad, PyG, edge net once per forward"}


def _cell(row, clock):
    if row is None:
        return "—"
    if "skipped" in row:
        return "skipped"
    return f"{row[clock]:,.0f}"


def timing_table(payload, clock="cpu_ms"):
    """Markdown: one line per side, EW / DB-MTL / UPGrad step times and ratios to LibMTL's."""
    rows = {(r["side"], r["method"]): r for r in payload["rows"]}
    sides = [s for s in SIDES if any(k[0] == s for k in rows)]

    def value(side, method):
        r = rows.get((side, method))
        return r.get(clock) if r else None

    lines = ["| side (whose code) | EW | DB-MTL | UPGrad | DB-MTL / EW | DB-MTL / LibMTL's | DB-MTL / LibMTL-once's |"
             " EW / LibMTL's | EW / LibMTL-once's | UPGrad / TorchJD-once's |", "|---" * 10 + "|"]
    for side in sides:
        ew, db = value(side, "ew"), value(side, "dbmtl")

        def ratio(a, b):
            return f"{a / b:.2f}" if a and b else "—"

        lines.append(f"| `{side}` ({WHOSE[side]}) | {_cell(rows.get((side, 'ew')), clock)} | "
                     f"{_cell(rows.get((side, 'dbmtl')), clock)} | {_cell(rows.get((side, 'upgrad')), clock)} | "
                     f"{ratio(db, ew)} | {ratio(db, value('libmtl', 'dbmtl'))} | "
                     f"{ratio(db, value('libmtl-once', 'dbmtl'))} | {ratio(ew, value('libmtl', 'ew'))} | "
                     f"{ratio(ew, value('libmtl-once', 'ew'))} | "
                     f"{ratio(value(side, 'upgrad'), value('torchjd-once', 'upgrad'))} |")
    return "\n".join(lines)


# (door configuration, the one it is held against, the target for the ratio or None)
DOOR_PAIRS = (("door-once:dbmtl", "libmtl-once:dbmtl", 0.9), ("door:dbmtl", "libmtl:dbmtl", 0.9),
              ("door-once:ew", "libmtl-once:ew", None), ("door:ew", "libmtl:ew", None),
              ("door-once:upgrad", "torchjd-once:upgrad", 1.0), ("door:upgrad", "torchjd:upgrad", 1.0),
              ("door-once:ew", "torch:ew", None), ("door-once:dbmtl", "torch:dbmtl", None),
              ("door-once:upgrad", "torch:upgrad", None))


def paired_ratio(payload, a, b, clock="wall_ms"):
    """a / b ("side:method" each) as the ratio of the medians, and the per-round ratios (round r's median of a over
    round r's median of b, `per_round` steps a round; rounds both have): {"ratio", "rounds", "round_median",
    "round_min", "round_max"}, or None when either has no samples."""
    rows = {f"{r['side']}:{r['method']}": r for r in payload["rows"]}
    ra, rb = rows.get(a, {}), rows.get(b, {})
    key = clock + "_all"
    if not ra.get(key) or not rb.get(key):
        return None
    n = max(1, int(payload.get("per_round", 1)))
    rounds = min(len(ra[key]), len(rb[key])) // n
    per_round = [statistics.median(ra[key][i * n:(i + 1) * n]) / statistics.median(rb[key][i * n:(i + 1) * n])
                 for i in range(rounds)]
    out = {"ratio": ra[clock] / rb[clock], "rounds": per_round}
    if per_round:
        out.update(round_median=statistics.median(per_round), round_min=min(per_round), round_max=max(per_round))
    return out


def door_ratio_table(payload, clock="wall_ms"):
    """Markdown: the door's ratios (DOOR_PAIRS that the payload has both sides of), '' when it has none."""
    lines = []
    for a, b, target in DOOR_PAIRS:
        r = paired_ratio(payload, a, b, clock)
        if r is None:
            continue
        spread = (f"{r['round_median']:.3f} ({r['round_min']:.3f}-{r['round_max']:.3f})"
                  if "round_median" in r else "—")
        met = "—" if target is None else (f"≤ {target}: " + ("met" if r["ratio"] <= target else "not met"))
        lines.append(f"| `{a}` / `{b}` | {r['ratio']:.3f} | {spread} | {len(r['rounds'])} | {met} |")
    if not lines:
        return ""
    return "\n".join(["| ratio | of the medians | per round: median (min-max) | rounds | target |",
                      "|---|---|---|---|---|"] + lines)


def memory_table(payload):
    rows = {(r["side"], r["method"]): r for r in payload["memory"]}
    sides = [s for s in SIDES if any(k[0] == s for k in rows)]

    def cell(side, method, key):
        r = rows.get((side, method))
        if r is None:
            return "—"
        return "skipped" if key not in r else f"{r[key]:,.0f}"

    lines = ["| side | EW peak RSS | DB-MTL peak RSS | UPGrad peak RSS | EW step peak | DB-MTL step peak | "
             "UPGrad step peak |", "|---|---|---|---|---|---|---|"]
    for side in sides:
        lines.append(f"| `{side}` | " + " | ".join(cell(side, m, "peak_rss_mb") for m in METHODS) + " | "
                     + " | ".join(cell(side, m, "step_peak_mb") for m in METHODS) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def _setup_process(group, threads):
    common.use_backend(_backend_of(group), threads)
    if group == "reference":
        import torch

        torch.set_num_threads(int(threads))


def _libraries():
    versions = {}
    for name in ("LibMTL", "torch_geometric", "torchjd", "torch", "keras", "tensorflow", "jax"):
        try:
            from importlib import metadata

            versions[name] = metadata.version(name)
        except Exception:
            versions[name] = None
    versions["LibMTL_src"] = os.environ.get("LIBMTL_SRC")
    return versions


def main(sides=SIDES, methods=METHODS, rounds=5, per_round=1, threads=2, warmup=2, memory=False, out=None):
    payload = {"benchmark": "libmtl_compare", "model": paper_size(), "threads": threads,
               "machine": common.machine_info(), "libraries": _libraries(), "clock": "wall and cpu"}
    t0 = time.perf_counter()
    if memory:
        payload["memory"] = run_memory(list(sides), list(methods), threads)
    else:
        payload.update(rounds=rounds, per_round=per_round, warmup=warmup)

        def save(rows, done):
            if out:
                common.write_json(out, dict(payload, rows=rows, rounds_done=done, machine_after=common.machine_info()))

        payload["rows"] = run_timing(list(sides), list(methods), rounds, per_round, threads, warmup, save)
        payload["rounds_done"] = rounds
    payload["wall_s"] = time.perf_counter() - t0
    payload["machine_after"] = common.machine_info()
    if out:
        common.write_json(out, payload)
    return payload


def _cli(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=1, help="timed steps of a configuration per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory", action="store_true", help="peak memory, one fresh process per configuration")
    parser.add_argument("--json", default=None)
    parser.add_argument("--report", default=None, help="print the markdown tables of these JSON files (comma list)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sides = [s for s in args.sides.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    unknown = [s for s in sides if s not in SIDES] + [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown sides/methods {unknown}; sides: {SIDES}, methods: {METHODS}")
    if args.report:
        for path in args.report.split(","):
            payload = common.read_json(path)
            if "rows" in payload:
                print("CPU ms (median)\n\n" + timing_table(payload, "cpu_ms") + "\n\nwall ms (median)\n\n"
                      + timing_table(payload, "wall_ms") + "\n")
                for clock in ("wall_ms", "cpu_ms"):
                    table = door_ratio_table(payload, clock)
                    if table:
                        print(f"door ratios ({clock[:-3]})\n\n{table}\n")
            if "memory" in payload:
                print("MB\n\n" + memory_table(payload) + "\n")
        return
    if args.worker:
        _setup_process(args.worker, args.threads)
        worker(sides, methods, args.warmup)
        return
    if args.memory_child:
        side, method = args.memory_child.split(":")
        _setup_process(WORKER_OF[side], args.threads)
        _send(memory_child(side, method))
        return
    main(sides, methods, rounds=args.rounds, per_round=args.per_round, threads=args.threads, warmup=args.warmup,
         memory=args.memory, out=args.json)


if __name__ == "__main__":
    _cli()
