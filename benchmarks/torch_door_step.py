"""Door 3's step (`keras_dbmtl.torch.Balancer(...).backward`) against LibMTL and TorchJD on the paper's QM9 model.

    PYTHONPATH=$BENCHDEPS:$PWD nice -n 5 .venv/bin/python benchmarks/torch_door_step.py --rounds 14 \
        --json benchmarks/results_libmtl/torch_door_step.json
    PYTHONPATH=$BENCHDEPS:$PWD .venv/bin/python benchmarks/torch_door_step.py --quick     # 1 round (smoke)
    PYTHONPATH=$BENCHDEPS:$PWD .venv/bin/python benchmarks/torch_door_step.py --profile door-dbmtl

One model for every side: the paper's QM9 MPNN encoder in plain torch (`libmtl_torch.TorchMPNN`: dim 64, edge
network 5 -> 128 -> 64*64 evaluated once per forward, 3 message-passing steps with mean aggregation and a
GRUCell, Set2Set 3 steps, Linear(128 -> 64) + ReLU; no PyG), 11 Linear(64, 1) heads, MSE, Adam 1e-3, on one
synthetic batch (`libmtl_compare.paper_batch`, seed 0: 32 complete molecular graphs of 9-27 atoms, padded). Every
side builds its own copy with the same initial weights (torch.manual_seed(0)). Sides:

- `door-dbmtl`: `keras_dbmtl.torch.Balancer("dbmtl").backward(losses, shared_parameters=encoder.parameters())`
  + `optimizer.step()` (the door's CPU default: one `torch.autograd.grad` per task, `vectorize=False`);
- `plain-libmtl-dbmtl`: `libmtl_torch.PlainMTL("qm9-paper", "dbmtl")`: LibMTL's DB-MTL step written by hand
  (per-task `.backward(retain_graph=True)`, a (T, P) buffer, EMA, max-norm scaling, `.grad` written back);
- `libmtl-dbmtl`: LibMTL's own `Trainer` (HPS, the TorchMPNN as its encoder class) with LibMTL's `DB_MTL`
  weighting when the installed LibMTL has one, else `libmtl_compare.dbmtl_on_libmtl()` (DB-MTL on LibMTL's own
  AbsWeighting helpers; LibMTL 1.1.5 from PyPI has no `DB_MTL`); one step = the body of `Trainer.train`'s
  batch loop, as `libmtl_compare.libmtl_step` times it;
- `door-upgrad`: `keras_dbmtl.torch.Balancer("upgrad").backward(losses, shared_parameters=...)` + Adam;
- `torchjd-upgrad`: TorchJD's `mtl_backward(losses, features=z, parallel_chunk_size=1)` +
  `jac_to_grad(encoder params, UPGrad())` + Adam (`libmtl_compare.torchjd_step` on this encoder; chunk 1, one
  task's backward at a time, like the door's CPU default; `--torchjd-chunk 0` = TorchJD's default, all tasks
  through torch.vmap);
- `ew`: `sum(losses).backward()` + Adam (the floor);
- `door-upgrad-features` (extra, not a target): the door with `features=z`, the Jacobian with respect to the
  representation (MGDA-UB's level; a different, cheaper algorithm than TorchJD's parameter Jacobian);
- `torchjd-upgrad-vmap` (optional, `--sides`): TorchJD's default `parallel_chunk_size=None` (torch.vmap).

Timing: every side is built and warmed up (`--warmup` steps) in this one process, then `--rounds` rounds, each
timing `--per-round` steps of every side in turn (the order reversed every other round). Reported: the median over
all timed steps of wall clock (`time.perf_counter`) and of the process' CPU time (`time.process_time`, both
threads), the spread across rounds (min, max), and the ratios door / LibMTL (DB-MTL) and door / TorchJD (UPGrad).
The issue's targets: door DB-MTL <= 0.9x LibMTL's same-model step; door UPGrad <= TorchJD's.

Before the timing, the first step of each side is checked against its reference (the shared gradient of the
first step, all sides starting from the same weights): door DB-MTL against PlainMTL and LibMTL, door UPGrad
against TorchJD (relative L2 difference, cosine).

Sides whose optional packages (LibMTL, torchjd) are not importable are skipped with a message. Install them
outside the project's environment:

    .venv/bin/pip install --no-deps --target $BENCHDEPS LibMTL torch_geometric torchjd xxhash psutil quadprog \
        qpsolvers
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

MODEL = "qm9-paper"
SIDES = ("door-dbmtl", "plain-libmtl-dbmtl", "libmtl-dbmtl", "door-upgrad", "torchjd-upgrad", "ew",
         "door-upgrad-features", "torchjd-upgrad-vmap")
DEFAULT_SIDES = SIDES[:-1]
NEEDS = {"libmtl-dbmtl": ("LibMTL",), "torchjd-upgrad": ("torchjd",), "torchjd-upgrad-vmap": ("torchjd",)}


def _missing(side):
    return [name for name in NEEDS.get(side, ()) if importlib.util.find_spec(name) is None]


# --------------------------------------------------------------------------- the model and the batch


def model_and_batch():
    """(encoder, heads: ModuleList of 11 Linear(64, 1), x: dict of torch tensors, ys: list of (32, 1) targets),
    the weights those of torch.manual_seed(0), exactly as PlainMTL("qm9-paper") builds them."""
    import torch

    from benchmarks import libmtl_compare, libmtl_torch

    torch.manual_seed(0)
    encoder, heads = libmtl_torch._torch_modules(MODEL)
    heads = torch.nn.ModuleList([module for _, module, _ in heads])
    x, y = libmtl_compare.paper_batch(0)
    return encoder, heads, libmtl_torch._to_torch(x), [libmtl_torch._to_torch(y[t]) for t in common.QM9_TASKS]


def _adam_and_losses():
    """(encoder, optimizer: torch.optim.Adam 1e-3 on the encoder and the heads, losses_of: one forward pass ->
    ({task: MSE}, z), `libmtl_compare.mtl_losses`) on `model_and_batch()`."""
    import torch

    from benchmarks import libmtl_compare

    encoder, heads, x, ys = model_and_batch()
    optimizer = torch.optim.Adam(list(encoder.parameters()) + list(heads.parameters()), lr=1e-3)
    return encoder, optimizer, libmtl_compare.mtl_losses(encoder, heads, x, ys)


# --------------------------------------------------------------------------- the sides


def door_side(method, features=False):
    from benchmarks import libmtl_compare

    encoder, optimizer, losses_of = _adam_and_losses()
    step, balancer = libmtl_compare.door_train_step(method, encoder, optimizer, losses_of, features=features)
    return step, encoder, {"code": f"keras_dbmtl.torch.Balancer({method!r}).backward("
                                   + ("features=z" if features else "shared_parameters=encoder.parameters()")
                                   + ") + torch.optim.Adam", "vectorize": balancer.vectorize}


def ew_side():
    encoder, optimizer, losses_of = _adam_and_losses()

    def step():
        optimizer.zero_grad()
        losses, _ = losses_of()
        sum(losses.values()).backward()
        optimizer.step()
        return losses

    return step, encoder, {"code": "sum(losses).backward() + torch.optim.Adam"}


def plain_side():
    from benchmarks import libmtl_torch

    plain = libmtl_torch.PlainMTL(MODEL, "dbmtl", lr=1e-3, beta=0.9, beta_sigma=0.0, seed=0)
    return plain.step, plain.encoder, {"code": "benchmarks/libmtl_torch.py PlainMTL('qm9-paper', 'dbmtl').step "
                                               "(LibMTL's DB-MTL step written by hand)"}


def libmtl_side():
    """LibMTL's Trainer with the TorchMPNN as its encoder (libmtl_compare.libmtl_step's setup, without PyG)."""
    import torch

    from benchmarks import libmtl_compare

    source = libmtl_compare.import_libmtl()
    weighting, label = libmtl_compare.dbmtl_weighting()
    encoder, heads, x, ys = model_and_batch()
    labels = dict(zip(common.QM9_TASKS, ys))
    decoders = torch.nn.ModuleDict(dict(zip(common.QM9_TASKS, heads)))
    trainer = libmtl_compare.libmtl_trainer(weighting, lambda: encoder, decoders,
                                            {"DB_beta": 0.9, "DB_beta_sigma": 0.0})
    step = libmtl_compare.libmtl_trainer_step(trainer, x, labels)
    return step, trainer.model.encoder, {"code": f"LibMTL Trainer (HPS, TorchMPNN encoder), weighting: {label}",
                                          "libmtl": source}


def torchjd_side(chunk):
    from benchmarks import libmtl_compare

    encoder, optimizer, losses_of = _adam_and_losses()
    step = libmtl_compare.torchjd_train_step(list(encoder.parameters()), optimizer, losses_of, chunk)
    return step, encoder, {"code": "torchjd mtl_backward(losses, features=z) + jac_to_grad(encoder params, UPGrad()) "
                                   "+ torch.optim.Adam", "parallel_chunk_size": chunk or None}


def build(side, torchjd_chunk=1):
    if side == "door-dbmtl":
        return door_side("dbmtl")
    if side == "door-upgrad":
        return door_side("upgrad")
    if side == "door-upgrad-features":
        return door_side("upgrad", features=True)
    if side == "plain-libmtl-dbmtl":
        return plain_side()
    if side == "libmtl-dbmtl":
        return libmtl_side()
    if side == "torchjd-upgrad":
        return torchjd_side(torchjd_chunk)
    if side == "torchjd-upgrad-vmap":
        return torchjd_side(0)
    if side == "ew":
        return ew_side()
    raise ValueError(side)


# --------------------------------------------------------------------------- checks, timing, profile


def _shared_grad(encoder):
    import torch

    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double()
                      for p in encoder.parameters()])


def _compare(a, b):
    import torch

    return {"rel_l2": float(torch.linalg.norm(a - b) / torch.linalg.norm(b)),
            "cosine": float(torch.dot(a, b) / (torch.linalg.norm(a) * torch.linalg.norm(b)))}


def first_step_checks(first_grads):
    pairs = [("door-dbmtl", "plain-libmtl-dbmtl"), ("door-dbmtl", "libmtl-dbmtl"),
             ("plain-libmtl-dbmtl", "libmtl-dbmtl"), ("door-upgrad", "torchjd-upgrad"),
             ("door-upgrad", "torchjd-upgrad-vmap")]
    return {f"{a} vs {b}": _compare(first_grads[a], first_grads[b])
            for a, b in pairs if a in first_grads and b in first_grads}


def time_sides(steps, rounds, per_round, log_rounds=True, on_round=None):
    names = list(steps)
    samples = {n: {"wall": [], "cpu": [], "round_wall": [], "round_cpu": []} for n in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else list(reversed(names))
        for name in order:
            wall, cpu = [], []
            for _ in range(per_round):
                c0, t0 = time.process_time(), time.perf_counter()
                steps[name]()
                t1, c1 = time.perf_counter(), time.process_time()
                wall.append(t1 - t0)
                cpu.append(c1 - c0)
            samples[name]["wall"] += wall
            samples[name]["cpu"] += cpu
            samples[name]["round_wall"].append(statistics.median(wall))
            samples[name]["round_cpu"].append(statistics.median(cpu))
        if log_rounds:
            common.log(f"[torch_door_step] round {r + 1}/{rounds} done; load {common.machine_info().get('loadavg')}")
        if on_round is not None:  # the rounds so far, in case the run is cut short
            on_round(samples, r + 1)
    return samples


def summarise(samples):
    rows = {}
    for name, s in samples.items():
        rows[name] = {
            "wall_ms": 1e3 * statistics.median(s["wall"]), "cpu_ms": 1e3 * statistics.median(s["cpu"]),
            "wall_ms_min": 1e3 * min(s["round_wall"]), "wall_ms_max": 1e3 * max(s["round_wall"]),
            "cpu_ms_min": 1e3 * min(s["round_cpu"]), "cpu_ms_max": 1e3 * max(s["round_cpu"]),
            "samples": len(s["wall"]),
            "wall_ms_all": [1e3 * v for v in s["wall"]], "cpu_ms_all": [1e3 * v for v in s["cpu"]],
        }
    return rows


def ratios(rows):
    def ratio(a, b, clock):
        return rows[a][clock] / rows[b][clock] if a in rows and b in rows else None

    out = {}
    for clock in ("wall_ms", "cpu_ms"):
        out[clock] = {
            "door-dbmtl / libmtl-dbmtl": ratio("door-dbmtl", "libmtl-dbmtl", clock),
            "door-dbmtl / plain-libmtl-dbmtl": ratio("door-dbmtl", "plain-libmtl-dbmtl", clock),
            "door-upgrad / torchjd-upgrad": ratio("door-upgrad", "torchjd-upgrad", clock),
            "door-upgrad / torchjd-upgrad-vmap": ratio("door-upgrad", "torchjd-upgrad-vmap", clock),
            "door-dbmtl / ew": ratio("door-dbmtl", "ew", clock),
            "libmtl-dbmtl / ew": ratio("libmtl-dbmtl", "ew", clock),
            "door-upgrad / ew": ratio("door-upgrad", "ew", clock),
            "torchjd-upgrad / ew": ratio("torchjd-upgrad", "ew", clock),
        }
    return out


def targets(r):
    """The issue's two targets, judged on both clocks (None: a side is missing)."""
    out = {}
    for clock in ("wall_ms", "cpu_ms"):
        db, jd = r[clock]["door-dbmtl / libmtl-dbmtl"], r[clock]["door-upgrad / torchjd-upgrad"]
        out[clock] = {"door DB-MTL <= 0.9x LibMTL": None if db is None else db <= 0.9,
                      "door UPGrad <= TorchJD": None if jd is None else jd <= 1.0}
    return out


def table(rows, infos, skipped):
    lines = ["| side | wall ms (median) | wall min-max over rounds | CPU ms (median) | CPU min-max | / ew (wall) |",
             "|---|---|---|---|---|---|"]
    ew = rows.get("ew", {}).get("wall_ms")
    for name in SIDES:
        if name in rows:
            r = rows[name]
            lines.append(f"| `{name}` | {r['wall_ms']:,.0f} | {r['wall_ms_min']:,.0f}-{r['wall_ms_max']:,.0f} | "
                         f"{r['cpu_ms']:,.0f} | {r['cpu_ms_min']:,.0f}-{r['cpu_ms_max']:,.0f} | "
                         + (f"{r['wall_ms'] / ew:.2f} |" if ew else "— |"))
        elif name in skipped:
            lines.append(f"| `{name}` | skipped: {skipped[name]} | | | | |")
    return "\n".join(lines)


def profile(side, torchjd_chunk, steps=1):
    """One step of `side` under torch.profiler (ops by self CPU time) and cProfile (Python calls, cumulative)."""
    import cProfile
    import io
    import pstats

    import torch

    step, _, _ = build(side, torchjd_chunk)
    step()
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    buffer = io.StringIO()
    pstats.Stats(profiler, stream=buffer).sort_stats("cumulative").print_stats(30)
    print(buffer.getvalue())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", default=",".join(DEFAULT_SIDES))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--per-round", type=int, default=1, help="timed steps of every side per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--torchjd-chunk", type=int, default=1,
                        help="mtl_backward's parallel_chunk_size (0: None, TorchJD's default, vmap over the tasks)")
    parser.add_argument("--quick", action="store_true", help="1 round, 1 warm-up step (smoke run)")
    parser.add_argument("--profile", default=None, help="profile one step of this side instead of timing")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    common.use_backend("torch", args.threads)
    if args.profile:
        profile(args.profile, args.torchjd_chunk)
        return None
    import torch

    rounds, warmup = (1, 1) if args.quick else (args.rounds, args.warmup)
    sides = [s for s in args.sides.split(",") if s]
    unknown = [s for s in sides if s not in SIDES]
    if unknown:
        parser.error(f"unknown sides {unknown}; known: {SIDES}")
    machine_before = common.machine_info()
    steps, infos, skipped, first_grads = {}, {}, {}, {}
    for side in sides:
        missing = _missing(side)
        if missing:
            skipped[side] = f"{', '.join(missing)} not importable (pip install --no-deps --target DIR ...; " \
                            "PYTHONPATH=DIR:$PWD)"
            common.log(f"[torch_door_step] {side}: skipped, {skipped[side]}")
            continue
        t0 = time.perf_counter()
        try:
            step, encoder, info = build(side, args.torchjd_chunk)
            step()
            first_grads[side] = _shared_grad(encoder)
            for _ in range(max(0, warmup - 1)):
                step()
        except Exception as error:  # a side that cannot run is reported, not fatal
            skipped[side] = f"{type(error).__name__}: {error}"[:300]
            common.log(f"[torch_door_step] {side}: skipped, {skipped[side]}")
            continue
        info["setup_s"] = time.perf_counter() - t0
        info["num_shared_parameters"] = sum(p.numel() for p in encoder.parameters())
        steps[side], infos[side] = step, info
        common.log(f"[torch_door_step] {side} ready ({info['setup_s']:.1f} s: build + {max(1, warmup)} steps)")
    checks = first_step_checks(first_grads)
    for pair, c in checks.items():
        common.log(f"[torch_door_step] first-step shared gradient, {pair}: rel L2 {c['rel_l2']:.2e}, "
                   f"cosine {c['cosine']:.6f}")
    t0 = time.perf_counter()
    command = " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]) if argv is None else " ".join(argv)

    def result(samples, done):
        rows = summarise(samples)
        r = ratios(rows)
        return rows, r, targets(r), {
            "benchmark": "torch_door_step", "model": dict(common.qm9_size(MODEL)),
            "num_tasks": len(common.QM9_TASKS),
            "sides": {name: dict(infos[name], **rows[name]) for name in rows}, "skipped": skipped,
            "ratios": r, "targets": targets(r), "first_step_checks": checks,
            "rounds": rounds, "rounds_done": done, "per_round": args.per_round, "warmup": warmup, "seed": 0,
            "quick": bool(args.quick), "order": "sides in the order of --sides, reversed every other round",
            "threads": common.threads(), "torch_threads": torch.get_num_threads(),
            "timing_s": time.perf_counter() - t0, "started_utc": started, "machine": machine_before,
            "machine_after": common.machine_info(), "libraries": _libraries(), "command": command,
        }

    def save(samples, done):
        if args.json:
            common.write_json(args.json, result(samples, done)[3])

    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    samples = time_sides(steps, rounds, args.per_round, on_round=save)
    rows, r, met, payload = result(samples, rounds)
    print(table(rows, infos, skipped))
    print()
    for clock in ("wall_ms", "cpu_ms"):
        print(f"ratios ({clock[:-3]}): " + ", ".join(f"{k} {v:.3f}" for k, v in r[clock].items() if v is not None))
        print(f"targets ({clock[:-3]}): {met[clock]}")
    if args.json:
        common.write_json(args.json, payload)
    return payload


def _libraries():
    from importlib import metadata

    versions = {}
    for name in ("torch", "keras", "LibMTL", "torchjd", "quadprog"):
        try:
            versions[name] = metadata.version(name)
        except Exception:
            versions[name] = None
    return versions


if __name__ == "__main__":
    main()
