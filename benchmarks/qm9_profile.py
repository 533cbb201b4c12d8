"""Per-step cost of the QM9 quick preset on JAX: batch assembly, then CPU time, kernel share and minor page faults
per training step (after one epoch that compiles), measured with getrusage.

    # glibc's default malloc settings, then the ones the QM9 command sets (applications.common.MALLOC_TUNABLES)
    KERAS_BACKEND=jax python benchmarks/qm9_profile.py dbmtl 1 --cache-dir .device_cache/qm9
    GLIBC_TUNABLES=$(python -c "from applications.common import MALLOC_TUNABLES as t; print(t)") \\
        KERAS_BACKEND=jax python benchmarks/qm9_profile.py dbmtl 1 --cache-dir .device_cache/qm9
"""

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402

from applications.qm9 import data as qdata  # noqa: E402
from applications.qm9 import train as qtrain  # noqa: E402


def usage():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("balancer", nargs="?", default="ew")
    p.add_argument("epochs", nargs="?", type=int, default=1, help="timed epochs (after one that compiles)")
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args()
    cfg = dict(qtrain.PRESETS["quick"])
    d = qdata.load_qm9(cache_dir=args.cache_dir, subset=cfg["subset"], progress=False)
    train, _, _, _ = qtrain.make_loaders(d, cfg, list(qdata.TARGETS), 0)
    u0, s0, f0 = usage()
    t0 = time.perf_counter()
    for k in range(len(train)):
        train[k]
    u1, s1, f1 = usage()
    print(f"batches: {1000 * (time.perf_counter() - t0) / len(train):.2f} ms each, minor faults {f1 - f0}")
    keras.utils.set_random_seed(0)
    model = qtrain.build_and_compile(d, cfg, list(qdata.TARGETS), args.balancer)
    model.fit(train, epochs=1, verbose=0)  # compiles
    u0, s0, f0 = usage()
    t0 = time.perf_counter()
    model.fit(train, epochs=args.epochs, verbose=0)
    u1, s1, f1 = usage()
    n = args.epochs * len(train)
    cpu = u1 - u0 + s1 - s0
    print(f"{args.balancer}: {1000 * (time.perf_counter() - t0) / n:.1f} ms/step wall, cpu {1000 * cpu / n:.1f} "
          f"ms/step, kernel share {(s1 - s0) / cpu:.1%}, minor faults/step {(f1 - f0) / n:.0f}")


if __name__ == "__main__":
    main()
