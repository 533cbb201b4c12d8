"""Shared pieces of the benchmarks: backend selection, model/data builders, step runners and interleaved timing.

Everything here is written so that one process runs one Keras backend (KERAS_BACKEND is fixed when keras is first
imported): call `use_backend(name)` before importing keras, or run the scripts with `--backend`.

Models (same sizes everywhere, also reproduced in plain PyTorch by `libmtl_torch.py`):

- ``dense-T<n>``: Dense(IN) -> Dense(H) + ReLU -> Dense(H) + ReLU, n linear Dense(1) heads, MSE losses.
- ``conv``: 32x32x3 images -> 3 Conv2D(3x3) + ReLU (16, 32 s2, 32 s2) -> global average pool -> Dense(64) + ReLU;
  heads: a 10-class softmax classifier and two scalar regressions (T = 3).
- ``qm9``: the paper's MPNN (applications/qm9/model.py: node embedding, edge-conditioned conv + GRU x 3, Set2Set,
  Dense + ReLU), 11 linear heads, MSE, on a synthetic disjoint-mode batch shaped like QM9 (complete graphs of
  9-27 atoms, padded as `applications.qm9.data.collate` pads them).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# --------------------------------------------------------------------------- configuration

DENSE = dict(inputs=32, hidden=256, batch=128)
CONV = dict(size=32, channels=(16, 32, 32), dense=64, batch=32, classes=10)
# QM9: the application's "quick" preset (applications/qm9/train.py PRESETS["quick"]: dim 32, edge network 64,
# bonded edges, batch 64), read from the source without importing it. The paper's size (dim 64, edge network 128,
# complete graphs, batch 128) takes ~27 s per DB-MTL step on 2 CPU threads (measured with the reference library).
QM9 = dict(dim=32, edge_hidden=64, steps=3, set2set_steps=3, out_dim=64, batch=64, edges="bonds",
           min_atoms=9, max_atoms=27)
# The paper's QM9 model (dim 64, edge network 128, complete graphs, Set2Set 3, batch 128): what `--gpu` runs.
QM9_PAPER = dict(dim=64, edge_hidden=128, steps=3, set2set_steps=3, out_dim=64, batch=128, edges="complete",
                 min_atoms=9, max_atoms=27)
# ``qm9-paper``: the paper's model (QM9_PAPER) on the CPU at batch 32 (issue 18's LibMTL comparison and peak
# memory); "qm9" keeps its meaning (the quick preset on the CPU, QM9_PAPER under --gpu).
QM9_PAPER_CPU_BATCH = 32
QM9_TASKS = ("mu", "alpha", "homo", "lumo", "r2", "zpve", "u0", "u", "h", "g", "cv")

MODEL_NAMES = ("qm9", "qm9-paper", "conv", "dense-T2", "dense-T3", "dense-T11", "dense-T40")
QUICK_MODELS = ("conv", "dense-T3", "dense-T11")

# Modes: how the train step is compiled. "tf-graph" is Keras' default on a CPU-only TensorFlow (tf.function, no
# XLA); "tf-xla" is compile(jit_compile=True); "tf-eager" is compile(run_eagerly=True) (not a compiled step);
# "torch" is Keras' default on torch (eager autograd); "jax" is Keras' default on JAX (jax.jit of the whole step).
MODES = {"tensorflow": ("tf-graph", "tf-xla", "tf-eager"), "torch": ("torch",), "jax": ("jax",)}
BACKEND_OF_MODE = {m: b for b, modes in MODES.items() for m in modes}

DEFAULT_THREADS = 1


def use_backend(name, threads=DEFAULT_THREADS):
    """Fix the Keras backend of this process, and the number of compute threads of every framework in it.

    Must run before keras is imported. `threads` (default 1) is the intra-op thread count of TensorFlow, XLA (JAX
    and TF jit_compile) and torch; 0 keeps each framework's default. One thread is the default because the
    machine's 2 cores are shared with other jobs: a multi-threaded step waits for its slowest thread, and the
    per-step CPU time of a single-threaded step does not depend on the other jobs.
    """
    if "keras" in sys.modules:
        import keras

        if keras.backend.backend() != name:
            raise RuntimeError(f"keras is already imported with backend {keras.backend.backend()!r}, not {name!r}")
        return
    os.environ["KERAS_BACKEND"] = name
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ["DBMTL_BENCH_THREADS"] = str(int(threads))
    if threads:
        n = str(int(threads))
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TF_NUM_INTRAOP_THREADS"):
            os.environ[var] = n
        os.environ["TF_NUM_INTEROP_THREADS"] = "1"
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_cpu_multi_thread_eigen" not in flags and int(threads) == 1:
            flags += " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        os.environ["XLA_FLAGS"] = flags.strip()
    if name == "torch":
        import torch

        if threads:
            torch.set_num_threads(int(threads))
            try:
                torch.set_num_interop_threads(1)
            except RuntimeError:  # pragma: no cover - already set
                pass


def threads():
    return int(os.environ.get("DBMTL_BENCH_THREADS", "0"))


def parse_models(spec):
    if spec in (None, "", "all"):
        return list(MODEL_NAMES)
    if spec == "quick":
        return list(QUICK_MODELS)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    for n in names:
        if n not in MODEL_NAMES and not n.startswith("dense-T"):
            raise ValueError(f"unknown model {n!r}; known: {MODEL_NAMES}")
    return names


def is_qm9(model_name):
    return model_name in ("qm9", "qm9-paper")


def num_tasks_of(model_name):
    if is_qm9(model_name):
        return len(QM9_TASKS)
    if model_name == "conv":
        return 3
    return int(model_name.split("-T")[1])


def qm9_available():
    try:
        import importlib.util

        return importlib.util.find_spec("applications.qm9.model") is not None
    except Exception:  # pragma: no cover
        return False


def on_gpu():
    """True when the benchmarks run on a GPU (`run_all.py --gpu` sets DBMTL_BENCH_DEVICE=gpu)."""
    return os.environ.get("DBMTL_BENCH_DEVICE", "cpu") == "gpu"


def qm9_size(model_name="qm9"):
    """The MPNN size and batch used here. "qm9": on a GPU the paper's (QM9_PAPER); else the application's quick
    preset when it has one, else QM9 above. "qm9-paper": the paper's model at batch 32 (QM9_PAPER_CPU_BATCH) on
    the CPU, QM9_PAPER on a GPU."""
    import ast

    if model_name == "qm9-paper" and not on_gpu():
        return dict(QM9_PAPER, batch=QM9_PAPER_CPU_BATCH,
                    source="benchmarks/common.py QM9_PAPER at batch QM9_PAPER_CPU_BATCH (the paper's model)")
    if on_gpu():
        return dict(QM9_PAPER, source="benchmarks/common.py QM9_PAPER (the paper's model, on a GPU)")

    size = dict(QM9)
    size["source"] = "benchmarks/common.py QM9 (no preset found)"
    path = os.path.join(ROOT, "applications", "qm9", "train.py")
    try:
        tree = ast.parse(open(path).read())
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PRESETS" for t in node.targets):
                # PRESETS is a dict of dict(...) calls of literals: evaluate it with nothing but `dict` in scope.
                expression = compile(ast.Expression(node.value), path, "eval")
                quick = eval(expression, {"__builtins__": {}, "dict": dict})["quick"]  # noqa: S307
                for key in ("dim", "edge_hidden", "steps", "set2set_steps", "out_dim", "edges"):
                    if key in quick:
                        size[key] = quick[key]
                if "batch_size" in quick:
                    size["batch"] = int(quick["batch_size"])
                size["source"] = "applications/qm9/train.py PRESETS['quick']"
    except Exception:  # the preset is optional: fall back to QM9 above
        pass
    return size


# --------------------------------------------------------------------------- data (numpy, backend-free)


def make_data(model_name, seed=0):
    """(x, y) numpy batch for a model; y is a dict task -> targets."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if model_name.startswith("dense-T"):
        t = num_tasks_of(model_name)
        b = DENSE["batch"]
        x = rng.normal(size=(b, DENSE["inputs"])).astype("float32")
        y = {f"t{i}": rng.normal(size=(b, 1)).astype("float32") for i in range(t)}
        return x, y
    if model_name == "conv":
        b, s = CONV["batch"], CONV["size"]
        x = rng.normal(size=(b, s, s, 3)).astype("float32")
        y = {
            "cls": rng.integers(0, CONV["classes"], size=(b, 1)).astype("int32"),
            "reg1": rng.normal(size=(b, 1)).astype("float32"),
            "reg2": rng.normal(size=(b, 1)).astype("float32"),
        }
        return x, y
    if is_qm9(model_name):
        size = qm9_size(model_name)
        return make_qm9_batch(size["batch"], rng, edges=size["edges"])
    raise ValueError(model_name)


def make_qm9_batch(batch, rng, edges="bonds", node_quantum=256, edge_quantum=4096):
    """A synthetic disjoint-mode batch with the layout and padding of applications.qm9.data.collate.

    Molecules of 9-27 atoms (QM9 with hydrogens: 18 on average). edges="complete": every ordered pair of atoms
    (the paper); "bonds": a random spanning tree plus a ring closure per 6 atoms, both directions (~2.2 directed
    edges per atom, as QM9's bonded pairs).
    """
    import numpy as np

    sizes = rng.integers(QM9["min_atoms"], QM9["max_atoms"] + 1, size=batch)
    n_real = int(sizes.sum())
    srcs, dsts, graph = [], [], []
    offset = 0
    for g, n in enumerate(sizes):
        n = int(n)
        if edges == "complete":
            i, j = np.nonzero(~np.eye(n, dtype=bool))
        else:
            parents = np.array([rng.integers(0, k) for k in range(1, n)])
            a = np.concatenate([np.arange(1, n), rng.integers(0, n, size=n // 6)])
            b = np.concatenate([parents, (rng.integers(1, n, size=n // 6) + a[n - 1:]) % n])
            i, j = np.concatenate([a, b]), np.concatenate([b, a])
        srcs.append(i + offset)
        dsts.append(j + offset)
        graph.append(np.full(n, g))
        offset += n
    src = np.concatenate(srcs)
    dst = np.concatenate(dsts)

    def round_up(v, q):
        return int(-(-v // q) * q)

    n_pad = round_up(n_real + 1, node_quantum)
    e_pad = round_up(len(src), edge_quantum)
    nodes = np.zeros((n_pad, 11), np.float32)
    nodes[:n_real, :5] = np.eye(5, dtype=np.float32)[rng.integers(0, 5, size=n_real)]
    nodes[:n_real, 5:] = rng.random(size=(n_real, 6)).astype(np.float32)
    node_graph = np.full(n_pad, batch, np.int32)
    node_graph[:n_real] = np.concatenate(graph)
    edge_src = np.full(e_pad, n_real, np.int32)
    edge_dst = np.full(e_pad, n_real, np.int32)
    edge_src[: len(src)] = src
    edge_dst[: len(dst)] = dst
    features = np.zeros((e_pad, 5), np.float32)
    bonded = np.ones(len(src), bool) if edges == "bonds" else rng.random(len(src)) < 0.1
    features[: len(src), :4][bonded] = np.eye(4, dtype=np.float32)[rng.integers(0, 4, size=int(bonded.sum()))]
    features[: len(src), 4] = rng.uniform(1.0, 6.0, size=len(src)).astype(np.float32)
    x = dict(nodes=nodes, edges=features, edge_src=edge_src, edge_dst=edge_dst, node_graph=node_graph,
             graph_mask=np.ones(batch, np.float32))
    y = {t: rng.normal(size=(batch, 1)).astype(np.float32) for t in QM9_TASKS}
    return x, y


def data_shapes(model_name):
    x, y = make_data(model_name)
    if isinstance(x, dict):
        return {k: tuple(v.shape) for k, v in x.items()}
    return tuple(x.shape)


# --------------------------------------------------------------------------- keras models


def build_keras_model(model_name, seed=0):
    """An unbuilt keras_dbmtl.MultiTaskModel and its loss dict."""
    import keras

    import keras_dbmtl

    keras.utils.set_random_seed(seed)
    layers = keras.layers
    if model_name.startswith("dense-T"):
        t = num_tasks_of(model_name)
        encoder = keras.Sequential(
            [layers.Dense(DENSE["hidden"], activation="relu"), layers.Dense(DENSE["hidden"], activation="relu")],
            name="dense_encoder",
        )
        heads = {f"t{i}": layers.Dense(1, name=f"head_t{i}") for i in range(t)}
        losses = {name: "mse" for name in heads}
    elif model_name == "conv":
        c1, c2, c3 = CONV["channels"]
        encoder = keras.Sequential(
            [
                layers.Conv2D(c1, 3, padding="same", activation="relu"),
                layers.Conv2D(c2, 3, strides=2, padding="same", activation="relu"),
                layers.Conv2D(c3, 3, strides=2, padding="same", activation="relu"),
                layers.GlobalAveragePooling2D(),
                layers.Dense(CONV["dense"], activation="relu"),
            ],
            name="conv_encoder",
        )
        heads = {
            "cls": layers.Dense(CONV["classes"], name="head_cls"),
            "reg1": layers.Dense(1, name="head_reg1"),
            "reg2": layers.Dense(1, name="head_reg2"),
        }
        losses = {
            "cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            "reg1": "mse",
            "reg2": "mse",
        }
    elif is_qm9(model_name):
        from applications.qm9.model import build_model

        s = qm9_size(model_name)
        model = build_model(QM9_TASKS, dim=s["dim"], edge_hidden=s["edge_hidden"], steps=s["steps"],
                            set2set_steps=s["set2set_steps"], out_dim=s["out_dim"])
        return model, {t: "mse" for t in QM9_TASKS}
    else:
        raise ValueError(model_name)
    return keras_dbmtl.MultiTaskModel(encoder=encoder, heads=heads, name=model_name.replace("-", "_")), losses


def to_backend(tree):
    import keras

    return keras.tree.map_structure(lambda a: keras.ops.convert_to_tensor(a), tree)


def compile_model(model, losses, mode, balancer="ew", vectorize=None, learning_rate=1e-3):
    import keras

    kwargs = {}
    if mode == "tf-xla":
        kwargs["jit_compile"] = True
    elif mode == "tf-graph":
        kwargs["jit_compile"] = False
    elif mode == "tf-eager":
        kwargs["run_eagerly"] = True
    elif mode == "jax":
        kwargs["jit_compile"] = True
    elif mode == "torch":
        kwargs["jit_compile"] = False
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=losses, balancer=balancer,
                  vectorize_jacobian=vectorize, **kwargs)
    return model


def num_shared_parameters(model):
    import math

    return int(sum(math.prod(v.shape) for v in model.shared_variables()))


def num_parameters(model):
    import math

    return int(sum(math.prod(v.shape) for v in model.trainable_variables))


# --------------------------------------------------------------------------- step runners


def synchronize(value):
    """Wait until `value` (any nest of backend tensors) is computed."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        jax.block_until_ready(value)
    elif backend == "tensorflow":
        import tensorflow as tf

        for leaf in keras.tree.flatten(value):
            if isinstance(leaf, tf.Tensor):
                leaf.numpy()
                break
    elif backend == "torch":
        import torch

        if torch.cuda.is_available():  # CUDA kernels run asynchronously; on the CPU torch is synchronous
            torch.cuda.synchronize()


class TrainFunctionRunner:
    """Calls the model's compiled train function directly on one fixed batch (no fit/train_on_batch overhead).

    JAX: the state (variables, optimizer and metric variables) is threaded by hand, as `fit` does.
    """

    def __init__(self, model, x, y):
        import keras

        self.model = model
        self.backend = keras.backend.backend()
        model.train_on_batch(x, y)  # builds the model, the optimizer and the train function (one traced step)
        self.data = (to_backend(x), to_backend(y), None)
        if self.backend == "jax":
            import jax.numpy as jnp

            state = model._get_jax_state(trainable_variables=True, non_trainable_variables=True,
                                         optimizer_variables=True, metrics_variables=True)
            # The jitted step donates its state: give it copies, so the model's own variables stay valid.
            self.state = keras.tree.map_structure(jnp.copy, state)

    def __call__(self):
        if self.backend == "jax":
            logs, self.state = self.model.train_function(self.state, iter([self.data]))
            synchronize((logs, self.state))
            return logs
        logs = self.model.train_function([self.data])
        synchronize(logs)
        return logs


class TrainOnBatchRunner:
    """`model.train_on_batch(x, y)` (resets the metrics, syncs state and converts the logs to numpy each call)."""

    def __init__(self, model, x, y):
        self.model = model
        self.x, self.y = to_backend(x), to_backend(y)
        model.train_on_batch(self.x, self.y)

    def __call__(self):
        return self.model.train_on_batch(self.x, self.y)


def forward_backward_functions(model, x, y, mode):
    """Two zero-argument callables: forward (task losses summed) and forward + backward (gradient of that sum with
    respect to every trainable variable), compiled like the train step of `mode`. The model must be built."""
    import keras

    xs, ys = to_backend(x), to_backend(y)
    backend = keras.backend.backend()

    def loss_value(y_pred):
        return keras.ops.sum(model._task_losses(ys, y_pred, None))

    if backend == "jax":
        import jax
        import jax.numpy as jnp

        tv = [jnp.copy(v.value) for v in model.trainable_variables]
        ntv = [jnp.copy(v.value) for v in model.non_trainable_variables]

        def loss_fn(tv, ntv, x):
            y_pred, _ = model.stateless_call(tv, ntv, x, training=True)
            return loss_value(y_pred)

        f = jax.jit(loss_fn)
        fb = jax.jit(jax.value_and_grad(loss_fn))

        def forward():
            out = f(tv, ntv, xs)
            jax.block_until_ready(out)

        def forward_backward():
            out = fb(tv, ntv, xs)
            jax.block_until_ready(out)

        return forward, forward_backward
    if backend == "tensorflow":
        import tensorflow as tf

        variables = model.trainable_variables

        def f(x):
            return loss_value(model(x, training=True))

        def fb(x):
            with tf.GradientTape() as tape:
                loss = loss_value(model(x, training=True))
            return loss, tape.gradient(loss, variables)

        if mode != "tf-eager":
            f = tf.function(f, jit_compile=(mode == "tf-xla"), reduce_retracing=True)
            fb = tf.function(fb, jit_compile=(mode == "tf-xla"), reduce_retracing=True)

        def forward():
            f(xs).numpy()

        def forward_backward():
            loss, grads = fb(xs)
            loss.numpy()

        return forward, forward_backward
    import torch

    params = [v.value for v in model.trainable_variables]

    def forward():
        loss_value(model(xs, training=True))

    def forward_backward():
        loss = loss_value(model(xs, training=True))
        torch.autograd.grad(loss, params, allow_unused=True)

    return forward, forward_backward


# --------------------------------------------------------------------------- timing


def floor_ratio(forward, forward_backward, num_tasks):
    """The cost floor of a per-task-gradient method, relative to one forward + one backward pass.

    forward = F (forward alone), forward_backward = F + B (forward + backward of the summed losses), so B is their
    difference (clamped to a tiny positive value where timing noise makes it <= 0): (F + T B) / (F + B). With
    B = 2 F this is the issue's (1 + 2T) / 3.
    """
    backward = max(forward_backward - forward, 1e-12)
    return (forward + num_tasks * backward) / (forward + backward)


def interleaved_medians(functions, repeats, rounds=None, warmup=2, budget_s=None, slow_s=1.0):
    """Median time per call of each function, calls interleaved round-robin.

    functions: dict name -> zero-argument callable that returns once its work is done (synchronised).
    Every function is called `warmup` times first; then `repeats` timed calls each, spread over `rounds` rounds
    (each round calls every function repeats/rounds times in a row; odd rounds go in reverse order), so that a
    slow phase of a shared machine hits every configuration alike. `budget_s` stops early after a full round.
    A function whose last warm-up call took more than `slow_s` seconds is called once per round only.
    Each call is timed twice: wall clock (`time.perf_counter`) and CPU time of this process (`time.process_time`,
    all threads). Returns dict name -> {"wall": median s, "cpu": median s, "median": the primary clock's median,
    "samples": n}; the primary clock is `CLOCK` ("cpu" by default).
    """
    names = list(functions)
    slow = set()
    for name in names:
        for _ in range(max(1, warmup)):
            t0 = time.perf_counter()
            functions[name]()
            if time.perf_counter() - t0 > slow_s:
                slow.add(name)
    rounds = max(1, min(rounds or min(repeats, 5), repeats))
    per_round = max(1, -(-repeats // rounds))
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(rounds):
        order = names if r % 2 == 0 else list(reversed(names))
        for name in order:
            fn = functions[name]
            for _ in range(1 if name in slow else per_round):
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                t1, c1 = time.perf_counter(), time.process_time()
                wall[name].append(t1 - t0)
                cpu[name].append(c1 - c0)
        if budget_s is not None and time.perf_counter() - start > budget_s:
            break
    result = {}
    for n in names:
        w, c = statistics.median(wall[n]), statistics.median(cpu[n])
        result[n] = {"wall": w, "cpu": c, "median": c if CLOCK == "cpu" else w, "samples": len(wall[n])}
    return result


CLOCK = os.environ.get("DBMTL_BENCH_CLOCK", "cpu")


# --------------------------------------------------------------------------- environment and IO


def machine_info():
    # os.cpu_count(), not `nproc`: nproc obeys the OMP_NUM_THREADS that use_backend(threads=...) sets.
    info = {"python": platform.python_version(), "platform": platform.platform(), "nproc": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:  # pragma: no cover
        pass
    try:
        with open("/proc/loadavg") as fh:
            info["loadavg"] = fh.read().split()[:3]
    except OSError:  # pragma: no cover
        pass
    if on_gpu():
        info["gpu"] = gpu_name()
    return info


def gpu_name():
    """The GPU's name, read with nvidia-smi (no framework import), or None."""
    try:
        name = os.popen("nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null").read().strip()
        return name.splitlines()[0] if name else None
    except Exception:  # pragma: no cover
        return None


def backend_versions():
    import keras

    versions = {"keras": keras.__version__, "backend": keras.backend.backend()}
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        versions["tensorflow"] = tf.__version__
    elif backend == "torch":
        import torch

        versions["torch"] = torch.__version__
        versions["torch_threads"] = torch.get_num_threads()
    elif backend == "jax":
        import jax

        versions["jax"] = jax.__version__
    return versions


def write_json(path, payload):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=1, default=float)


def read_json(path):
    with open(path) as fh:
        return json.load(fh)


def peak_rss_mb():
    """Peak resident set size of this process so far (ru_maxrss, KiB on Linux), in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def log(*args):
    print(*args, file=sys.stderr, flush=True)
