"""keras_dbmtl on torch: `compile(..., jit_compile=True)` (Keras wraps the train step in `torch.compile`) against
the default `jit_compile=False` (eager autograd), EW and DB-MTL, interleaved in one process.

For each model, one MultiTaskModel per (method, jit_compile) is built and its compiled train function called
round-robin on one fixed batch (`common.interleaved_medians`, CPU time of this process by default). A setting
whose first step fails is reported with its error, not raised. Also reported: the time of the first step (for
jit_compile=True, torch.compile's tracing and code generation) and the relative difference of the trained
weights after the warm-up steps, jit against eager (same seed, same batch).

    KERAS_BACKEND=torch python benchmarks/torch_jit_compile.py --models qm9,dense-T11 --json out.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402


def _weights(model):
    import numpy as np

    return np.concatenate([np.asarray(v.numpy(), dtype=np.float64).ravel() for v in model.trainable_variables])


def time_model(model_name, methods, repeats, rounds, warmup):
    import numpy as np

    x, y = common.make_data(model_name)
    functions, rows, weights = {}, [], {}
    for method in methods:
        for jit in (False, True):
            name = f"{method}:jit={jit}"
            model, losses = common.build_keras_model(model_name)
            model.compile(optimizer=__import__("keras").optimizers.Adam(1e-3), loss=losses, balancer=method,
                          jit_compile=jit)
            t0 = time.perf_counter()
            try:
                runner = common.TrainFunctionRunner(model, x, y)
                runner()
            except Exception as error:  # jit_compile=True may not trace the balanced step: report, do not raise
                rows.append({"method": method, "jit_compile": jit,
                             "error": f"{type(error).__name__}: {error}"[:800]})
                common.log(f"[jit {model_name} {name}] FAILED: {rows[-1]['error'][:300]}")
                continue
            rows.append({"method": method, "jit_compile": jit, "first_steps_s": time.perf_counter() - t0})
            functions[name] = runner
            weights[name] = _weights(model)
    timings = common.interleaved_medians(functions, repeats=repeats, rounds=rounds, warmup=warmup)
    for row in rows:
        name = f"{row['method']}:jit={row['jit_compile']}"
        if name in timings:
            row["ms"] = 1e3 * timings[name]["median"]
            row["wall_ms"] = 1e3 * timings[name]["wall"]
            row["samples"] = timings[name]["samples"]
            eager = f"{row['method']}:jit=False"
            if row["jit_compile"] and eager in weights:
                a, b = weights[eager], weights[name]
                row["weights_rel_diff_after_warmup"] = float(np.linalg.norm(a - b) / np.linalg.norm(a))
    for method in methods:
        by = {r["jit_compile"]: r for r in rows if r["method"] == method and "ms" in r}
        if True in by and False in by:
            by[True]["jit_over_eager"] = by[True]["ms"] / by[False]["ms"]
    return {"model": model_name, "rows": rows, "clock": common.CLOCK, "threads": common.threads()}


def main(models=("qm9", "dense-T11"), methods=("ew", "dbmtl"), repeats=6, rounds=3, warmup=2, out=None):
    common.use_backend("torch")
    results = [time_model(m, methods, repeats, rounds, warmup) for m in models]
    payload = {"benchmark": "torch_jit_compile", "versions": common.backend_versions(),
               "machine": common.machine_info(), "repeats": repeats, "rounds": rounds, "results": results}
    if out:
        common.write_json(out, payload)
    return payload


def _cli(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="qm9,dense-T11")
    parser.add_argument("--methods", default="ew,dbmtl")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=common.DEFAULT_THREADS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    common.use_backend("torch", args.threads)
    payload = main(models=common.parse_models(args.models), methods=args.methods.split(","), repeats=args.repeats,
                   rounds=args.rounds, warmup=args.warmup, out=args.json)
    for result in payload["results"]:
        for row in result["rows"]:
            common.log(result["model"], {k: v for k, v in row.items() if k != "error"}, row.get("error", "")[:200])


if __name__ == "__main__":
    _cli()
