"""Peak memory (CPU: resident set size) of one training configuration, each in a fresh process.

A child process imports its framework, makes the batch, then resets the kernel's peak-RSS counter
(`/proc/self/clear_refs` <- 5, which sets VmHWM to the current RSS) and records:

- `setup_peak_mb`: VmHWM - RSS before the model existed, over building, compiling and 2 warm-up steps
  (includes the compiler's own memory: XLA, tf.function tracing);
- `step_peak_mb`: after the warm-up, the counter is reset again and N more steps run: VmHWM - RSS at the reset,
  the transient memory of a step (activations, the T x P Jacobian, temporaries);
- `peak_mb`: the process's peak RSS from the first reset on (framework imported, batch made) to the last step,
  max(RSS before + setup peak, RSS after setup + step peak): what the issue 18 memory table compares;
- `state_mb`: the exact size of the persistent training state (Keras: every model and optimizer variable,
  including the balancer's EMA buffer; plain torch: parameters, .grad, Adam moments, the EMA buffer).

When /proc/self/clear_refs is not writable, the deltas of `resource.getrusage(...).ru_maxrss` are used instead
(and `counter` says so). Configurations: `keras` (keras_dbmtl on any backend/mode) or `plain` (libmtl_torch's
LibMTL-style trainer).

    python benchmarks/memory.py --configs keras:torch:torch:dense-T40:dbmtl,plain:torch:torch:dense-T40:dbmtl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks import common  # noqa: E402

MARK = "MEMORY_JSON "


def _status():
    values = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmHWM", "VmRSS")):
                key, value = line.split(":")
                values[key] = int(value.split()[0]) / 1024.0
    return values


def _reset_peak():
    """Resets VmHWM to the current RSS; returns (rss_mb, counter name)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _status()["VmRSS"], "VmHWM"
    except OSError:
        return common.peak_rss_mb(), "ru_maxrss"


def _peak(counter):
    return _status()["VmHWM"] if counter == "VmHWM" else common.peak_rss_mb()


def child(impl, backend, mode, model_name, method, steps=3):
    """Runs inside the fresh process. Returns the measurement dict."""
    if impl == "keras":
        common.use_backend(backend)
        import keras  # noqa: F401  (framework imported before the baseline)

        if backend == "tensorflow":
            import tensorflow  # noqa: F401
    else:
        common.use_backend("torch")
        import torch  # noqa: F401
    x, y = common.make_data(model_name)
    rss0, counter = _reset_peak()
    t0 = time.perf_counter()
    if impl == "keras":
        model, losses = common.build_keras_model(model_name)
        common.compile_model(model, losses, mode, balancer=method)
        runner = common.TrainFunctionRunner(model, x, y)
        runner()
        variables = list(model.variables) + list(model.optimizer.variables)
        state_bytes = sum(_nbytes(v) for v in variables)
        step = runner
    else:
        from benchmarks.libmtl_torch import PlainMTL

        trainer = PlainMTL(model_name, method)
        trainer.step()
        trainer.step()
        state_bytes = trainer.state_bytes()
        step = trainer.step
    setup_peak = _peak(counter) - rss0
    rss1, counter = _reset_peak()
    for _ in range(steps):
        step()
    step_peak = _peak(counter) - rss1
    return {
        "impl": impl, "backend": backend, "mode": mode, "model": model_name, "method": method,
        "num_tasks": common.num_tasks_of(model_name),
        "setup_peak_mb": setup_peak, "step_peak_mb": step_peak, "peak_mb": max(rss0 + setup_peak, rss1 + step_peak),
        "state_mb": state_bytes / 2**20,
        "rss_before_mb": rss0, "rss_after_setup_mb": rss1, "counter": counter, "seconds": time.perf_counter() - t0,
    }


def _nbytes(variable):
    import math

    import numpy as np

    return int(math.prod(variable.shape)) * np.dtype(variable.dtype).itemsize


def parse_config(text):
    impl, backend, mode, model_name, method = text.split(":")
    return dict(impl=impl, backend=backend, mode=mode, model_name=model_name, method=method)


def config_text(impl, backend, mode, model_name, method):
    return f"{impl}:{backend}:{mode}:{model_name}:{method}"


def run(configs, parallel=1, steps=3, threads=common.DEFAULT_THREADS, timeout=600):
    """Measures every configuration in its own fresh process (`parallel` at a time). Returns a list of dicts."""
    pending = list(configs)
    running, results = [], []
    while pending or running:
        while pending and len(running) < parallel:
            config = pending.pop(0)
            cmd = [sys.executable, os.path.abspath(__file__), "--child", config, "--steps", str(steps),
                   "--threads", str(threads)]
            env = dict(os.environ)
            env["KERAS_BACKEND"] = parse_config(config)["backend"]
            env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                    cwd=os.path.dirname(HERE))
            running.append((config, proc, time.perf_counter()))
        still = []
        for config, proc, start in running:
            if proc.poll() is None and time.perf_counter() - start < timeout:
                still.append((config, proc, start))
                continue
            if proc.poll() is None:
                proc.kill()
            out, err = proc.communicate()
            lines = [line for line in out.splitlines() if line.startswith(MARK)]
            if lines:
                results.append(json.loads(lines[-1][len(MARK):]))
                r = results[-1]
                common.log(f"[memory {config}] peak {r['peak_mb']:.0f} MB, step peak {r['step_peak_mb']:.1f} MB, "
                           f"setup peak {r['setup_peak_mb']:.1f} MB, state {r['state_mb']:.2f} MB")
            else:
                results.append({**parse_config(config), "error": (err or "no output").strip().splitlines()[-1:]})
                common.log(f"[memory {config}] FAILED: {results[-1]['error']}")
        running = still
        if running:
            time.sleep(0.2)
    return results


def main(configs, parallel=1, steps=3, out=None):
    results = run(configs, parallel=parallel, steps=steps)
    payload = {"benchmark": "memory", "machine": common.machine_info(), "steps": steps, "results": results}
    if out:
        common.write_json(out, payload)
    return payload


def _cli(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--configs", default=None, help="comma list of impl:backend:mode:model:method")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--threads", type=int, default=common.DEFAULT_THREADS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.child:
        config = parse_config(args.child)
        common.use_backend(config["backend"] if config["impl"] == "keras" else "torch", args.threads)
        result = child(steps=args.steps, **config)
        print(MARK + json.dumps(result), flush=True)
        return
    main(args.configs.split(","), parallel=args.parallel, steps=args.steps, out=args.json)


if __name__ == "__main__":
    _cli()
