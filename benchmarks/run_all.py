"""Runs every benchmark (one process per backend) and writes benchmarks/RESULTS.md and benchmarks/figures/*.png.

    .venv/bin/python benchmarks/run_all.py            # full run (~25 min on 2 CPU cores)
    .venv/bin/python benchmarks/run_all.py --quick    # ~2-3 min: one small model, a few balancers
    .venv/bin/python benchmarks/run_all.py --report-only   # rewrite RESULTS.md/figures from benchmarks/results/

Jobs (each a subprocess with its own KERAS_BACKEND, `--jobs` at a time; all timings are CPU time of a
single-threaded process, so two jobs side by side on the 2 cores do not distort each other's ratios):

- tf-xla, tf-graph (+ tf-eager for EW/DB-MTL), jax, torch: step_time.py (every balancer on the sweep models, the
  core balancers on the others) and jacobian.py; the torch job also runs libmtl_torch.py;
- memory: memory.py, one fresh process per configuration.

The timing jobs run with glibc's malloc set as the application commands set it (`applications.common.
MALLOC_TUNABLES`; `KERAS_DBMTL_MALLOC_TUNING=0` or your own GLIBC_TUNABLES turn it off): with glibc's defaults XLA's
per-step temporaries are mapped and unmapped at every call, and their page faults (kernel time, counted in the CPU
time) inflate short compiled calls unevenly (JAX qm9: forward alone 34-56 ms with the defaults, 15 ms tuned). The
memory job keeps the defaults: the tunables keep freed memory resident.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from applications.common import MALLOC_TUNABLES, wants_malloc_tunables  # noqa: E402
from benchmarks import common  # noqa: E402

# Every balancer on every model and mode is ~700 compiled train steps, ~2 h of compilation on 2 cores: the default
# run gives every balancer the dense T = 11 model (all modes) and the core balancers every model; `--sweep-models`
# widens it (e.g. --sweep-models conv,dense-T11,dense-T40,qm9, about an hour and a half).
# The sweep model gets REPRESENTATIVE balancers by default (every loss-level family and the main gradient-level
# ones, solver-based MGDA / Nash-MTL included); `--balancers all` gives it every registered balancer (TF XLA alone
# then takes ~40 min on 2 shared cores, mostly XLA compilation).
REPRESENTATIVE = ["ew", "dbmtl", "uw", "gls", "famo", "imtl_g", "pcgrad", "mgda", "nash_mtl"]
FULL = dict(
    sweep_models=["dense-T11"],
    core_models=["qm9", "conv", "dense-T2", "dense-T3", "dense-T40"],
    core_balancers=["ew", "dbmtl", "uw", "imtl_g", "pcgrad"],
    qm9_balancers=["ew", "dbmtl", "uw"],
    eager_models=["conv", "dense-T3"],
    jacobian_models=["qm9", "conv", "dense-T40"],
    libmtl_models=["qm9", "conv", "dense-T3", "dense-T11", "dense-T40"],
    overhead_model="dense-T11",
    check_host_model="dense-T11",
    balancers=REPRESENTATIVE,
    repeats=8, rounds=4, warmup=1,
    memory_models=["dense-T40", "qm9"],
    memory_libmtl_models=["qm9", "dense-T40"],
)
QUICK = dict(
    sweep_models=[],
    core_models=["dense-T3"],
    eager_models=[],
    jacobian_models=["dense-T3"],
    libmtl_models=["dense-T3"],
    overhead_model="dense-T3",
    check_host_model="dense-T3",
    balancers=None,
    repeats=4, rounds=2, warmup=1,
    memory_models=[],
    memory_libmtl_models=["dense-T3"],
)
QUICK_CORE = ("ew", "dbmtl", "uw", "imtl_g")
# --gpu: the JAX and torch jobs on a GPU (no TensorFlow there), wall-clock timing synchronised with the device, the
# paper's QM9 model (common.QM9_PAPER), one job at a time so that jobs do not share the GPU; no CPU-memory job.
GPU = dict(FULL, sweep_models=[], core_models=["qm9", "conv", "dense-T11"], core_balancers=["ew", "dbmtl", "pcgrad", "mgda"],
           qm9_balancers=["ew", "dbmtl", "pcgrad", "mgda"], jacobian_models=[], overhead_model=None,
           check_host_model="dense-T11", memory_models=[], memory_libmtl_models=[], eager_models=[],
           libmtl_models=["qm9", "conv", "dense-T11"], repeats=6, rounds=3, warmup=2)
GPU_JOBS = ("torch", "jax")

JOBS = {  # name -> (backend, step-time modes, jacobian modes, libmtl)
    "tf-xla": ("tensorflow", ["tf-xla"], ["tf-xla"], False),
    "jax": ("jax", ["jax"], ["jax"], False),
    "tf-graph": ("tensorflow", ["tf-graph", "tf-eager"], ["tf-graph"], False),
    "torch": ("torch", ["torch"], ["torch"], True),
}


# --------------------------------------------------------------------------- workers


def worker(name, config, out_dir, threads):
    backend, step_modes, jacobian_modes, libmtl = JOBS[name]
    common.use_backend(backend, threads)
    from benchmarks import jacobian, step_time

    core = config.get("core_balancers", step_time.CORE_BALANCERS)
    per_model = {"qm9": config["qm9_balancers"]} if config.get("qm9_balancers") else {}
    step_time.main(backend, modes=step_modes, models=config["sweep_models"], balancers=config["balancers"],
                   core_models=config["core_models"], core_balancers=core, per_model_balancers=per_model,
                   repeats=config["repeats"], rounds=config["rounds"], warmup=config["warmup"],
                   overhead_model=config["overhead_model"], check_host_model=config["check_host_model"],
                   eager_models=config.get("eager_models"), out=os.path.join(out_dir, f"step_{name}.json"))
    jacobian.main(backend, modes=jacobian_modes, models=config["jacobian_models"], repeats=config["repeats"],
                  rounds=config["rounds"], warmup=config["warmup"], out=os.path.join(out_dir, f"jacobian_{name}.json"))
    if libmtl:
        from benchmarks import libmtl_torch

        libmtl_torch.main(models=config["libmtl_models"], repeats=config["repeats"], rounds=config["rounds"],
                          warmup=config["warmup"], out=os.path.join(out_dir, "libmtl_torch.json"))


def memory_configs(config):
    configs = []
    default_mode = {"tensorflow": "tf-graph", "torch": "torch", "jax": "jax"}
    for model_name in config["memory_models"]:
        for backend in ("tensorflow", "torch", "jax"):
            for method in ("ew", "dbmtl"):
                configs.append(f"keras:{backend}:{default_mode[backend]}:{model_name}:{method}")
    for model_name in config["memory_libmtl_models"]:
        for method in ("ew", "dbmtl"):
            text = f"keras:torch:torch:{model_name}:{method}"
            if text not in configs:
                configs.append(text)
            configs.append(f"plain:torch:torch:{model_name}:{method}")
    return configs


def run_jobs(config, out_dir, jobs, threads, only=None):
    names = list(only) if only else list(JOBS) + ["memory"]  # in the order given
    pending, running = list(names), []
    config_path = os.path.join(out_dir, "config.json")
    common.write_json(config_path, config)
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            log_path = os.path.join(out_dir, f"log_{name}.txt")
            if name == "memory":
                cmd = [sys.executable, os.path.join(HERE, "memory.py"), "--configs", ",".join(memory_configs(config)),
                       "--threads", str(threads), "--json", os.path.join(out_dir, "memory.json")]
                env_backend = "torch"
            else:
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--config", config_path,
                       "--out", out_dir, "--threads", str(threads)]
                env_backend = JOBS[name][0]
            env = dict(os.environ, KERAS_BACKEND=env_backend, TF_CPP_MIN_LOG_LEVEL="3")
            if name != "memory" and wants_malloc_tunables(env):   # timed as the application commands run
                env["GLIBC_TUNABLES"] = MALLOC_TUNABLES
            fh = open(log_path, "w")
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            running.append((name, proc, fh, time.perf_counter()))
            common.log(f"started {name}: {shlex.join(cmd[1:3])} ... (log {os.path.relpath(log_path, ROOT)})")
        still = []
        for name, proc, fh, start in running:
            if proc.poll() is None:
                still.append((name, proc, fh, start))
                continue
            fh.close()
            common.log(f"finished {name} (exit {proc.returncode}) in {time.perf_counter() - start:.0f} s")
        running = still
        time.sleep(1.0)


# --------------------------------------------------------------------------- report


def _load(out_dir, prefix):
    results = {}
    for fname in sorted(os.listdir(out_dir)):
        if fname.startswith(prefix) and fname.endswith(".json"):
            results[fname[len(prefix):-5]] = common.read_json(os.path.join(out_dir, fname))
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~2-3 minutes: dense-T3, a few balancers")
    parser.add_argument("--gpu", action="store_true",
                        help="on a GPU: JAX and torch jobs, wall clock, the paper's QM9 model; writes RESULTS_gpu.md")
    parser.add_argument("--jobs", type=int, default=2, help="benchmark processes at a time (default 2)")
    parser.add_argument("--threads", type=int, default=common.DEFAULT_THREADS,
                        help="compute threads per process (default 1; 0 = each framework's default)")
    parser.add_argument("--sweep-models", default=None,
                        help="models that get every registered balancer (default: dense-T11; 'all' for all six)")
    parser.add_argument("--balancers", default=None,
                        help="balancers of the sweep models: comma list, or 'all' (default: a representative set)")
    parser.add_argument("--only", default=None, help="comma list of jobs: " + ", ".join(list(JOBS) + ["memory"]))
    parser.add_argument("--out", default=None, help="raw JSON folder (default benchmarks/results[_quick])")
    parser.add_argument("--results-md", default=None, help="default benchmarks/RESULTS.md (quick: RESULTS_quick.md)")
    parser.add_argument("--figures", default=None, help="default benchmarks/figures (quick: figures_quick)")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report from the JSON files")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--config", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, common.read_json(args.config), args.out, args.threads)
        return
    if args.gpu:  # read by common.py in this process and in every job it starts
        os.environ["DBMTL_BENCH_DEVICE"] = "gpu"
        os.environ["DBMTL_BENCH_CLOCK"] = "wall"
        args.jobs, args.threads = 1, 0
        args.only = args.only or ",".join(GPU_JOBS)
    suffix = "_gpu" if args.gpu else ("_quick" if args.quick else "")
    out_dir = args.out or os.path.join(HERE, f"results{suffix}")
    results_md = args.results_md or os.path.join(HERE, f"RESULTS{suffix}.md")
    figures = args.figures or os.path.join(HERE, f"figures{suffix}")
    os.makedirs(out_dir, exist_ok=True)
    command = ".venv/bin/python benchmarks/run_all.py" + (" --quick" if args.quick else "")
    command += " --gpu" if args.gpu else ""
    if args.threads != common.DEFAULT_THREADS and not args.gpu:
        command += f" --threads {args.threads}"
    if args.sweep_models:
        command += f" --sweep-models {args.sweep_models}"
    if args.balancers:
        command += f" --balancers {args.balancers}"
    if not args.report_only:
        config = dict(GPU if args.gpu else QUICK if args.quick else FULL)
        if args.quick:
            config["core_balancers"] = list(QUICK_CORE)
        if args.sweep_models:
            config["sweep_models"] = common.parse_models(args.sweep_models)
            config["qm9_balancers"] = None
            config["core_models"] = [m for m in config["core_models"] if m not in config["sweep_models"]]
        if args.balancers:
            config["balancers"] = None if args.balancers == "all" else args.balancers.split(",")
        t0 = time.perf_counter()
        started = datetime.datetime.now().isoformat(timespec="seconds")
        run_jobs(config, out_dir, args.jobs, args.threads, only=args.only.split(",") if args.only else None)
        import resource

        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        common.write_json(os.path.join(out_dir, "run.json"), {
            "command": command, "only": args.only, "malloc_tunables": wants_malloc_tunables(os.environ),
            "started": started, "wall_s": time.perf_counter() - t0, "jobs": args.jobs,
            "threads": args.threads, "cpu_s": children.ru_utime + children.ru_stime,
            "machine": common.machine_info()})
    from benchmarks import report

    report.write(out_dir, results_md, figures, command)
    common.log(f"wrote {os.path.relpath(results_md, ROOT)} and {os.path.relpath(figures, ROOT)}/")


if __name__ == "__main__":
    main()
