"""The package as a user installs it: `python -m build` makes a wheel and an sdist, `twine check` passes, and the
wheel installed with the `[jax]` extra into a fresh venv (no TensorFlow, no torch pulled) imports, trains a
DB-MTL model, saves it to a `.keras` file and loads it back with the same predictions and balancer state.

Backend-independent (it builds its own environment), so it runs once, on the JAX run of `bash .ci/test`. Needs
pip to reach PyPI (or a warm pip cache): the venv installs keras, jax and their dependencies.
"""

import glob
import os
import subprocess
import sys
import zipfile

import keras
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(keras.backend.backend() != "jax", reason="backend-independent: once, on the JAX run")

USER_SCRIPT = r'''
import importlib.util, json, os, sys
import numpy as np
import keras, keras_dbmtl

assert importlib.util.find_spec("tensorflow") is None, "the [jax] install pulled TensorFlow"
assert importlib.util.find_spec("torch") is None, "the [jax] install pulled torch"
assert keras.backend.backend() == "jax"
assert os.path.dirname(keras_dbmtl.__file__).startswith(sys.prefix), keras_dbmtl.__file__  # the installed copy

rng = np.random.default_rng(0)
x = rng.normal(size=(64, 4)).astype("float32")
y = {"small": 1e-2 * (x @ rng.normal(size=(4, 1))).astype("float32"),
     "large": 1e2 * np.tanh(x[:, :1]).astype("float32")}
keras.utils.set_random_seed(0)
encoder = keras.Sequential([keras.Input((4,)), keras.layers.Dense(16, activation="relu")])
model = keras_dbmtl.MultiTaskModel(encoder=encoder, heads={t: keras.layers.Dense(1) for t in y})
model.compile(optimizer="adam", loss="mse", balancer="dbmtl")
history = model.fit(x, y, batch_size=16, epochs=3, verbose=0)
losses = history.history["loss"]
assert losses[-1] < losses[0], losses
model.save("model.keras")
loaded = keras.models.load_model("model.keras")
np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded.balancer.ema_gradients),
                              keras.ops.convert_to_numpy(model.balancer.ema_gradients))
for task, a in model.predict(x, verbose=0).items():
    np.testing.assert_allclose(loaded.predict(x, verbose=0)[task], a, rtol=1e-6)
print(json.dumps({"keras_dbmtl": keras_dbmtl.__file__, "losses": losses}))
'''


def _run(command, cwd, env=None, timeout=900):
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_the_wheel_builds_checks_installs_alone_and_trains(tmp_path):
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--outdir", str(dist), ROOT], cwd=tmp_path)
    wheels, sdists = glob.glob(str(dist / "*.whl")), glob.glob(str(dist / "*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, os.listdir(dist)
    _run([sys.executable, "-m", "twine", "check", "--strict", *wheels, *sdists], cwd=tmp_path)

    with zipfile.ZipFile(wheels[0]) as wheel:
        names = wheel.namelist()
        metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert {n.split("/")[0] for n in names} == {"keras_dbmtl", "keras_dbmtl-0.1.0.dist-info"}, names
    sources = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "keras_dbmtl", "**", "*.py"),
                                                            recursive=True)}
    assert sources <= set(names), sorted(sources - set(names))      # every module of the package is in it
    assert any(n.endswith("licenses/LICENSE") for n in names)
    for field in ("License-Expression: Apache-2.0", "Provides-Extra: jax", "Provides-Extra: tensorflow",
                  "Provides-Extra: torch", "Classifier: Programming Language :: Python :: 3.11",
                  "Requires-Dist: keras"):
        assert field in metadata, field

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="2")
    _run([python, "-m", "pip", "install", "-q", f"{wheels[0]}[jax]"], cwd=tmp_path, env=env)
    script = tmp_path / "user.py"
    script.write_text(USER_SCRIPT)
    out = _run([python, str(script)], cwd=tmp_path, env=env)
    assert str(venv) in out

    # the README's first command a user runs, from the installed wheel (2 epochs: it runs, prints its table)
    quickstart = os.path.join(ROOT, "examples", "quickstart.py")
    out = _run([python, quickstart], cwd=tmp_path, env={**env, "QUICKSTART_EPOCHS": "2"})
    assert "backend jax, 3 seeds, 2 epochs" in out and out.count("±") == 1 + 4, out
