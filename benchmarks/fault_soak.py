"""Fault soak: many fits of random small multi-task models with a random fault injected, on one backend.

Not a CI test (minutes per backend): a search for the fault no one wrote a test for. Each run draws a model (1-4
tasks, width 2-16, a balancer from `BALANCERS`), data and one fault:

- ``none``: a plain fit; it must train with finite weights and no skipped step;
- ``nan_batch``: NaN inputs in one random batch; that step must be skipped, counted and warned about, the others
  applied, every weight finite;
- ``sigkill``: a worker process (this file, ``--worker``) trains with `keras.callbacks.BackupAndRestore` and
  SIGKILLs itself at a random step; a second worker resumes; the state it restores must equal, bit for bit, the
  state of an uninterrupted run (this process) after the last backup's step;
- ``corrupt_backup``: the backup's weights file is overwritten with garbage before the fit that would restore it;
  the fit must raise an error that names the file (or the backup folder);
- ``disk_full``: `BackupAndRestore` writes to a folder on a full disk (a 64 KiB tmpfs with 1-24 KiB free, mounted by
  this script: root only, else the fault counts as ``unavailable``); the fit must raise an OSError that names the
  backup's file or folder, and the process must not crash.

Outcomes: ``ok`` (what the fault calls for), ``resumed_exact``, ``clear_error``, ``unavailable``, and ``other`` (anything else:
must be 0; each is printed with its traceback's last line). The counts go to
`benchmarks/results/fault_soak/<backend>.json`; `--write-results` puts the table of every backend into RESULTS.md
(as `benchmarks/report.py` does when run_all.py regenerates it).

    KERAS_BACKEND=jax .venv/bin/python benchmarks/fault_soak.py --runs 200
    KERAS_BACKEND=jax .venv/bin/python benchmarks/fault_soak.py --runs 200 --resume   # after a stop
    .venv/bin/python benchmarks/fault_soak.py --write-results
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

BALANCERS = ("dbmtl", "ew", "upgrad", "mgda", "pcgrad", "nash_mtl", "fairgrad", "uw", "cagrad", "imtl")
FAULTS = ("none", "nan_batch", "sigkill", "corrupt_backup", "disk_full")
OUT = os.path.join(ROOT, "benchmarks", "results", "fault_soak")
SAMPLES, BATCH, EPOCHS = 32, 8, 2                     # 4 steps an epoch, 8 a fit


def draw_spec(seed):
    rng = np.random.default_rng(seed)
    return {
        "seed": int(seed),
        "tasks": int(rng.integers(1, 5)),
        "width": int(rng.integers(2, 17)),
        "balancer": str(rng.choice(BALANCERS)),
        "fault": str(rng.choice(FAULTS)),
        "fault_step": int(rng.integers(1, EPOCHS * SAMPLES // BATCH)),      # 1..7
    }


def build(spec):
    import keras

    import keras_dbmtl

    keras.utils.set_random_seed(spec["seed"])
    rng = np.random.default_rng(spec["seed"])
    x = rng.normal(size=(SAMPLES, 5)).astype("float32")
    names = [f"t{k}" for k in range(spec["tasks"])]
    y = {t: (x @ rng.normal(size=(5, 1))).astype("float32") for t in names}
    encoder = keras.Sequential([keras.Input((5,)), keras.layers.Dense(spec["width"], activation="relu")])
    model = keras_dbmtl.MultiTaskModel(encoder=encoder, heads={t: keras.layers.Dense(1) for t in names})
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", balancer=spec["balancer"])
    return model, x, y


def state(model):
    import keras

    values = {f"w{i}": keras.ops.convert_to_numpy(v) for i, v in enumerate(model.weights)}
    values.update({f"o{i}": keras.ops.convert_to_numpy(v) for i, v in enumerate(model.optimizer.variables)})
    return values


def finite(model):
    return all(np.all(np.isfinite(v)) for v in state(model).values() if np.issubdtype(v.dtype, np.floating))


def fit(model, x, y, callbacks=(), steps=None):
    import keras

    class Stop(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.count = 0

        def on_train_batch_end(self, batch, logs=None):
            self.count += 1
            if steps is not None and self.count >= steps:
                self.model.stop_training = True

    return model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0,
                     callbacks=list(callbacks) + [Stop()])


def names_the_path(error, *paths):
    text = f"{type(error).__name__}: {error}"
    cause = error.__cause__ or error.__context__
    if cause is not None:
        text += f" {cause}"
    return any(p in text for p in paths)


# ------------------------------------------------------------------------------------------------- faults

def run_none(spec, folder):
    model, x, y = build(spec)
    history = fit(model, x, y)
    good = finite(model) and history.history["skipped_steps"] == [0.0] * EPOCHS
    return ("ok" if good else "other"), history.history["skipped_steps"]


def run_nan_batch(spec, folder):
    model, x, y = build(spec)
    step = spec["fault_step"] % (SAMPLES // BATCH)
    x = x.copy()
    x[step * BATCH:(step + 1) * BATCH] = np.nan
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        history = fit(model, x, y)
    warned = any("skipped" in str(w.message) for w in record)
    good = finite(model) and history.history["skipped_steps"] == [1.0] * EPOCHS and warned
    return ("ok" if good else "other"), history.history["skipped_steps"]


def run_sigkill(spec, folder):
    import keras

    backup = os.path.join(folder, "backup")
    save_freq = 2
    kill_after = max(spec["fault_step"], save_freq + 1)
    if kill_after % save_freq == 0:          # a backup written at the very step of the kill: take the next one
        kill_after += 1
    command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec), folder,
               str(save_freq), str(kill_after)]
    env = dict(os.environ, PYTHONPATH=ROOT)
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if first.returncode != -signal.SIGKILL:
        return "other", f"worker exit {first.returncode}: {first.stderr[-300:]}"
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if second.returncode != 0:
        return "other", f"resume exit {second.returncode}: {second.stderr[-300:]}"
    last_backup = (kill_after // save_freq) * save_freq
    model, x, y = build(spec)
    fit(model, x, y, steps=last_backup)
    restored = dict(np.load(os.path.join(folder, "restored.npz")))
    expected = state(model)
    keras.backend.clear_session()
    same = sorted(restored) == sorted(expected) and all(
        np.array_equal(restored[k], expected[k]) for k in expected)
    del backup
    return ("resumed_exact" if same else "other"), f"killed after {kill_after}, restored step {last_backup}"


def worker(spec, folder, save_freq, kill_after):
    import keras

    model, x, y = build(spec)

    class Probe(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.count = 0

        def on_train_begin(self, logs=None):           # after BackupAndRestore's restore (listed first)
            if os.path.exists(os.path.join(folder, "killed")):
                np.savez(os.path.join(folder, "restored.npz"), **state(self.model))

        def on_train_batch_end(self, batch, logs=None):
            self.count += 1
            marker = os.path.join(folder, "killed")
            if self.count == kill_after and not os.path.exists(marker):
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)

    backup = keras.callbacks.BackupAndRestore(os.path.join(folder, "backup"), save_freq=save_freq)
    model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0, callbacks=[backup, Probe()])


def run_corrupt_backup(spec, folder):
    import keras

    backup = os.path.join(folder, "backup")
    model, x, y = build(spec)
    fit(model, x, y, callbacks=[keras.callbacks.BackupAndRestore(backup, save_freq=2, delete_checkpoint=False)],
        steps=2 + spec["fault_step"] % 5)
    files = [os.path.join(d, f) for d, _, fs in os.walk(backup) for f in fs if f.endswith(".h5")]
    if not files:
        return "other", f"no backup written in {backup}"
    for path in files:
        with open(path, "wb") as handle:
            handle.write(np.random.default_rng(spec["seed"]).bytes(200))
    model, x, y = build(spec)
    try:
        fit(model, x, y, callbacks=[keras.callbacks.BackupAndRestore(backup, save_freq=2)])
    except Exception as error:                          # noqa: BLE001 (classified below)
        return ("clear_error" if names_the_path(error, backup) else "other"), _last_line(error)
    return "other", "a corrupt backup was accepted"


def run_disk_full(spec, folder):
    import keras

    free_kib = 1 + spec["seed"] % 24                      # fills up at file creation or in the middle of a file
    disk = full_disk(free_kib)
    if disk is None:
        return "unavailable", "no small filesystem could be mounted (needs root)"
    backup = os.path.join(disk, "backup")
    model, x, y = build(spec)
    try:
        fit(model, x, y, callbacks=[keras.callbacks.BackupAndRestore(backup, save_freq=2)])
    except Exception as error:                          # noqa: BLE001
        return ("clear_error" if names_the_path(error, backup) else "other"), _last_line(error)
    finally:
        shutil.rmtree(backup, ignore_errors=True)
    return "ok", f"{free_kib} KiB were enough for the backups"


_FULL_DISK = {}


def full_disk(free_kib):
    """A folder on a 64 KiB tmpfs with `free_kib` KiB free (writes past it fail with ENOSPC), mounted once; None
    where mounting is not allowed."""
    if "path" not in _FULL_DISK:
        path = tempfile.mkdtemp(prefix="soak-full-disk-")
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", path],
                                 capture_output=True).returncode == 0
        _FULL_DISK["path"] = path if mounted else None
    if _FULL_DISK["path"]:
        with open(os.path.join(_FULL_DISK["path"], "filler"), "wb") as handle:
            handle.write(b"\0" * ((64 - free_kib) * 1024))
    return _FULL_DISK["path"]


def unmount_full_disk():
    if _FULL_DISK.get("path"):
        subprocess.run(["umount", _FULL_DISK["path"]], capture_output=True)


def _last_line(error):
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"


RUNNERS = {"none": run_none, "nan_batch": run_nan_batch, "sigkill": run_sigkill,
           "corrupt_backup": run_corrupt_backup, "disk_full": run_disk_full}


def soak(runs, first_seed=0, previous=None, save=None):
    """Runs `runs` fits from seed `first_seed` on, after the `previous` result's runs (resumed: its counts are
    kept and its seeds skipped); `save(result)` is called after every run, so that a stopped soak keeps its counts."""
    import keras

    previous = previous or {"runs": 0, "seconds": 0.0, "outcomes": {}, "by_fault": {}, "others": []}
    counts = collections.Counter(previous["outcomes"])
    by_fault = collections.defaultdict(collections.Counter,
                                       {k: collections.Counter(v) for k, v in previous["by_fault"].items()})
    others = list(previous["others"])
    begin = time.time() - previous["seconds"]
    for index in range(previous["runs"], runs):
        spec = draw_spec(first_seed + index)
        folder = tempfile.mkdtemp(prefix="soak-")
        try:
            outcome, detail = RUNNERS[spec["fault"]](spec, folder)
        except Exception as error:                      # noqa: BLE001 (an unexpected error is an outcome)
            outcome, detail = "other", "".join(traceback.format_exception_only(type(error), error))[-300:]
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            keras.backend.clear_session()
        counts[outcome] += 1
        by_fault[spec["fault"]][outcome] += 1
        if outcome == "other":
            others.append({"spec": spec, "detail": str(detail)})
            print(f"  OTHER run {index}: {spec} -> {detail}", flush=True)
        print(f"[{index + 1}/{runs}] {spec['fault']:14s} {spec['balancer']:9s} T={spec['tasks']} -> {outcome}"
              f" ({time.time() - begin:.0f} s)", flush=True)
        result = {"backend": keras.backend.backend(), "runs": index + 1, "first_seed": first_seed,
                  "seconds": round(time.time() - begin, 1), "outcomes": dict(counts),
                  "by_fault": {k: dict(v) for k, v in by_fault.items()}, "others": others,
                  "faults_injected": index + 1 - by_fault["none"].total()}
        if save is not None:
            save(result)
    return result


def write_results(results_md=os.path.join(ROOT, "benchmarks", "RESULTS.md")):
    """Puts the soak's section into RESULTS.md in place (`benchmarks/report.py` writes the same section when
    run_all.py regenerates the file)."""
    from benchmarks import report

    section = "\n".join(report.fault_soak_section(OUT))
    text = open(results_md).read() if os.path.exists(results_md) else ""
    start = text.find(report.FAULT_SOAK_HEADING)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    else:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + ("\n" + text[end + 1:] if end >= 0 else "\n")
    with open(results_md, "w") as handle:
        handle.write(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--worker", nargs=4, metavar=("SPEC", "FOLDER", "SAVE_FREQ", "KILL_AFTER"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--resume", action="store_true",
                        help="go on from the counts stored for this backend (a soak that was stopped)")
    parser.add_argument("--write-results", action="store_true",
                        help="only put the stored counts of every backend into benchmarks/RESULTS.md")
    args = parser.parse_args()
    if args.write_results:
        write_results()
        return
    if args.worker:
        spec, folder, save_freq, kill_after = args.worker
        worker(json.loads(spec), folder, int(save_freq), int(kill_after))
        return
    import keras

    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, f"{keras.backend.backend()}.json")
    previous = None
    if args.resume and os.path.exists(path):
        with open(path) as handle:
            previous = json.load(handle)
        if previous["first_seed"] != args.first_seed:
            parser.error(f"{path} started from seed {previous['first_seed']}, not {args.first_seed}")

    def save(result):
        with open(path, "w") as handle:
            json.dump(result, handle, indent=1)

    try:
        result = soak(args.runs, args.first_seed, previous, save)
    finally:
        unmount_full_disk()
    print(json.dumps({k: result[k] for k in ("backend", "runs", "faults_injected", "outcomes", "seconds")}))
    sys.exit(1 if result["outcomes"].get("other") else 0)


if __name__ == "__main__":
    main()
