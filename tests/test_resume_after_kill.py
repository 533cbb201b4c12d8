"""A training process killed mid-epoch (SIGKILL, no Python exception, no clean-up) resumes with
`keras.callbacks.BackupAndRestore` onto the weights, optimizer variables and balancer state (DB-MTL's EMA
buffers and step counter) that an uninterrupted run had at the same step.

How Keras 3 resumes (keras/src/callbacks/backup_and_restore.py): with `save_freq=<n>` it writes
`model.save_weights(...)` (model, balancer and optimizer variables) and `{"epoch": e, "batch": b}` every n
batches. On restart it loads those weights and sets `initial_epoch = e`; the saved batch is not used, so the
interrupted epoch is replayed from its first batch. The batches of that epoch done before the last backup
are therefore trained on twice, and the resumed run ends a few steps ahead of an uninterrupted one. This test
checks both halves honestly:

1. the state restored at the start of the second process equals, variable for variable, the state of an
   uninterrupted run after the same number of steps (the last backup);
2. the final state of the resumed run equals an uninterrupted run fed the same batch sequence that Keras
   actually trains on (epochs before the backup, the partial epoch up to the backup, then the interrupted
   epoch again from its first batch and the remaining epochs), and differs from the plain uninterrupted run.

The killed and resumed worker is this file run as a script (`python -m tests.test_resume_after_kill killed
<folder>`, twice); the reference runs happen in the test's own process. All use the small model and data of
tests/test_training_matches_reference.py, Adam (so that the optimizer has state) and balancer="dbmtl".
"""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

BATCH = 8              # 48 samples -> 6 steps per epoch
EPOCHS = 3             # 18 steps uninterrupted
SAVE_FREQ = 4          # backups after steps 4, 8, 12, 16 (the counter runs across epochs)
KILL_AFTER = 10        # SIGKILL after step 10 = epoch 1, batch index 3; the last backup is after step 8
LAST_BACKUP = 8        # ... saved as {"epoch": 1, "batch": 1}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------- worker

def _state(model):
    """Every variable that decides the rest of training, as numpy arrays keyed by a stable name."""
    import keras

    def value(variable):
        return keras.ops.convert_to_numpy(keras.ops.convert_to_tensor(variable))

    out = {}
    for i, v in enumerate(model.weights):  # encoder, heads and the balancer's state variables
        out[f"model/{i}/{v.name}"] = value(v)
    for i, v in enumerate(model.optimizer.variables):  # iterations, learning rate, Adam's moments
        out[f"optimizer/{i}"] = value(v)
    out["optimizer/iterations"] = value(model.optimizer.iterations)
    out["balancer/ema_gradients"] = value(model.balancer.ema_gradients)
    out["balancer/iterations"] = value(model.balancer.iterations)
    return out


def _worker(mode, folder):
    if mode == "references":  # both reference runs (the test runs them in its own process)
        _worker("uninterrupted", folder)
        _worker("replayed", folder)
        return
    import keras

    from tests.test_training_matches_reference import make_data, make_model

    X, Y = make_data()
    model = make_model()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", balancer="dbmtl")
    targets = {t: y for t, y in zip(model.task_names, Y)}
    steps_per_epoch = len(X) // BATCH

    class Steps(keras.callbacks.Callback):
        """Counts the steps of this process; dumps the state when asked; kills the process once."""

        def __init__(self, dump_at=(), kill_after=None):
            super().__init__()
            self.step, self.dump_at, self.kill_after = 0, set(dump_at), kill_after

        def on_train_begin(self, logs=None):  # runs after BackupAndRestore's (listed first)
            np.savez(os.path.join(folder, f"{mode}_begin.npz"), **_state(self.model))

        def on_train_batch_end(self, batch, logs=None):
            self.step += 1
            if self.step in self.dump_at:
                np.savez(os.path.join(folder, f"{mode}_step{self.step}.npz"), **_state(self.model))
            marker = os.path.join(folder, "killed")
            if self.step == self.kill_after and not os.path.exists(marker):
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)  # no exception, no on_train_end, no flush

    if mode == "uninterrupted":
        model.fit(X, targets, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0,
                  callbacks=[Steps(dump_at=[LAST_BACKUP])])
    elif mode == "killed":  # the same command twice: killed the first time, resumes and finishes the second
        backup = keras.callbacks.BackupAndRestore(os.path.join(folder, "backup"), save_freq=SAVE_FREQ)
        model.fit(X, targets, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0,
                  callbacks=[backup, Steps(kill_after=KILL_AFTER)])
    elif mode == "replayed":  # what Keras trains on when resuming: see the module docstring
        done_epochs, done_batches = divmod(LAST_BACKUP, steps_per_epoch)
        order = np.arange(len(X))
        sequence = np.concatenate([np.tile(order, done_epochs), order[:done_batches * BATCH],
                                   np.tile(order, EPOCHS - done_epochs)])
        model.fit(X[sequence], {t: y[sequence] for t, y in targets.items()}, batch_size=BATCH, epochs=1,
                  shuffle=False, verbose=0)
    else:
        raise ValueError(mode)
    np.savez(os.path.join(folder, f"{mode}_end.npz"), **_state(model))


# ------------------------------------------------------------------------------------------------- test

def _start(mode, folder):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.Popen([sys.executable, "-m", "tests.test_resume_after_kill", mode, str(folder)], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(process):
    """(return code, end of stderr) of a worker."""
    try:
        _, err = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return process.returncode, err[-3000:]


def _load(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _assert_same_state(actual, expected, what, exact):
    """Every variable equal: bit for bit (`exact`), else to float32 precision."""
    assert sorted(actual) == sorted(expected), what
    for key in expected:
        if exact:
            np.testing.assert_array_equal(actual[key], expected[key], err_msg=f"{what}: {key}")
        else:
            np.testing.assert_allclose(actual[key], expected[key], rtol=1e-6, atol=1e-7, err_msg=f"{what}: {key}")


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_resume_after_sigkill_restores_weights_optimizer_and_balancer_state(tmp_path):
    killed = _start("killed", tmp_path)
    _worker("references", str(tmp_path))  # the two reference runs, here, while the first worker runs
    code, err = _finish(killed)
    assert code == -signal.SIGKILL, (code, err)
    assert os.path.exists(tmp_path / "killed")
    assert os.path.exists(tmp_path / "backup" / "latest.weights.h5")
    with open(tmp_path / "backup" / "training_metadata.json") as handle:  # Keras restarts this epoch
        assert json.load(handle) == {"epoch": LAST_BACKUP // 6, "batch": LAST_BACKUP % 6 - 1}
    assert not os.path.exists(tmp_path / "killed_end.npz")
    code, err = _finish(_start("killed", tmp_path))  # the same command again: resumes and finishes
    assert code == 0, err
    assert not os.path.exists(tmp_path / "backup")  # removed by BackupAndRestore when a fit finishes

    restored = _load(tmp_path / "killed_begin.npz")
    at_backup = _load(tmp_path / f"uninterrupted_step{LAST_BACKUP}.npz")
    # 1. Restored: weights, optimizer variables (Adam's moments, iterations) and DB-MTL's EMA buffers and step
    #    counter are those of the uninterrupted run after the last backup, not the initial ones.
    #    Bit for bit: the backup stores the float32 values themselves.
    _assert_same_state(restored, at_backup, "restored state vs uninterrupted run at the last backup", exact=True)
    assert int(restored["balancer/iterations"]) == int(restored["optimizer/iterations"]) == LAST_BACKUP
    assert np.abs(restored["balancer/ema_gradients"]).max() > 0
    initial = _load(tmp_path / "uninterrupted_begin.npz")
    assert int(initial["balancer/iterations"]) == 0 and not np.any(initial["balancer/ema_gradients"])

    # 2. Finished: the same as an uninterrupted run over the batches Keras actually trains on after resuming.
    final = _load(tmp_path / "killed_end.npz")
    #    (Bit for bit on CPU in practice; compared to float32 precision so that a reordered reduction on other
    #    hardware does not fail it.)
    _assert_same_state(final, _load(tmp_path / "replayed_end.npz"), "resumed run vs replayed sequence", exact=False)
    steps_per_epoch = 48 // BATCH
    resumed_steps = LAST_BACKUP + (EPOCHS - LAST_BACKUP // steps_per_epoch) * steps_per_epoch
    assert int(final["balancer/iterations"]) == resumed_steps == 20
    uninterrupted = _load(tmp_path / "uninterrupted_end.npz")
    assert int(uninterrupted["balancer/iterations"]) == EPOCHS * steps_per_epoch == 18
    assert int(final["optimizer/iterations"]) == 20 and int(uninterrupted["optimizer/iterations"]) == 18
    assert not np.allclose(final["model/0/kernel"], uninterrupted["model/0/kernel"])


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
