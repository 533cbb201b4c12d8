"""Step time of the task-gradient options (keras_dbmtl/task_gradients.py) against EW and the exact methods:

    python benchmarks/task_gradients_cost.py <jax|torch|tensorflow> <model, e.g. dense-T11>

EW, DB-MTL, DB-MTL with task_gradients_every=k for k in 2, 5, 10, 20, MGDA and representation-level MGDA on one
model: each the model's compiled train function on one fixed batch (common.TrainFunctionRunner), 5 interleaved
rounds of 20 steps (so that every window holds exactly 20/k refresh steps) after 2 warm-up steps, one thread; CPU
time of the process (robust to other jobs on the machine), medians in ms and ratios to EW.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

CONFIGURATIONS = [
    ("ew", "ew", {}),
    ("dbmtl", "dbmtl", {}),
    ("dbmtl every=2", "dbmtl", {"task_gradients_every": 2}),
    ("dbmtl every=5", "dbmtl", {"task_gradients_every": 5}),
    ("dbmtl every=10", "dbmtl", {"task_gradients_every": 10}),
    ("dbmtl every=20", "dbmtl", {"task_gradients_every": 20}),
    ("mgda", "mgda", {}),
    ("mgda representation", "mgda", {"task_gradients": "representation"}),
]


def main(backend, model_name, rounds=5, steps=20):
    common.use_backend(backend, threads=1)
    import keras
    import numpy as np

    x, y = common.make_data(model_name)
    runners = {}
    for label, balancer, options in CONFIGURATIONS:
        model, losses = common.build_keras_model(model_name)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=losses, balancer=balancer,
                      jit_compile=backend != "torch", **options)
        runners[label] = common.TrainFunctionRunner(model, x, y)
    times = {label: [] for label in runners}
    for _ in range(rounds):
        for label, run in runners.items():
            for _ in range(2):
                run()
            start = time.process_time()
            for _ in range(steps):
                run()
            times[label].append((time.process_time() - start) / steps * 1e3)
    ew = float(np.median(times["ew"]))
    for label, values in times.items():
        median = float(np.median(values))
        print(f"{backend} {model_name} {label}: {median:.2f} ms, {median / ew:.2f} x EW")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
