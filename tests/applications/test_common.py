"""applications/common.py: balancer arguments, coupled weight decay, result files."""

import json

import keras
import numpy as np
import pytest
from keras import ops

from applications.common import add_weight_decay, parse_balancer_args, write_results


def test_parse_balancer_args():
    assert parse_balancer_args("beta=0.5,beta_sigma=0.5,scaling=mean,gradient_balancing=false") == {
        "beta": 0.5, "beta_sigma": 0.5, "scaling": "mean", "gradient_balancing": False}
    assert parse_balancer_args("") == {}
    with pytest.raises(ValueError, match="key=value"):
        parse_balancer_args("beta")


def test_weight_decay_is_torch_coupled_l2():
    """The penalty's gradient is weight_decay * w, what torch.optim.Adam(weight_decay=...) adds."""
    layer = keras.layers.Dense(3)
    layer.build((None, 4))
    add_weight_decay(layer.trainable_variables, 0.01)
    kernel = ops.convert_to_numpy(layer.kernel).astype("float64")
    penalty = float(ops.convert_to_numpy(layer.kernel.regularizer(layer.kernel)))
    np.testing.assert_allclose(penalty, 0.01 / 2 * np.sum(kernel**2), rtol=1e-5)
    add_weight_decay(layer.trainable_variables, 0.0)          # 0 leaves the variables alone
    assert layer.kernel.regularizer is not None


def test_write_results(tmp_path):
    json_path, markdown_path = write_results(str(tmp_path / "out"), "run", {"delta_p": 1.5}, "| a |\n")
    assert json.load(open(json_path)) == {"delta_p": 1.5}
    assert open(markdown_path).read() == "| a |\n"


def test_data_errors_are_value_errors_and_missing_ones_file_not_found_errors():
    from applications.common import DataError, MissingDataError

    assert issubclass(DataError, ValueError)
    assert issubclass(MissingDataError, DataError) and issubclass(MissingDataError, FileNotFoundError)
    error = MissingDataError("Missing file /data/x.npy. Extract it again.")
    assert str(error) == "Missing file /data/x.npy. Extract it again."
    with pytest.raises(ValueError):
        raise error


_FAULTS_SCRIPT = r"""
import os, resource, sys
import numpy as np
from applications.common import rerun_with_malloc_tunables
print("start", os.environ.get("GLIBC_TUNABLES"), flush=True)
if sys.argv[1] == "tuned":
    rerun_with_malloc_tunables()
block = np.ones(8 * 2**20)  # 64 MB: above glibc's default 32 MB ceiling for heap blocks
del block
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # what XLA does with a step's temporaries: allocate, touch, free
    block = np.ones(8 * 2**20)
    del block
print("faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc tunables")
def test_malloc_tunables_stop_the_per_step_page_faults(tmp_path):
    import os
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    script = tmp_path / "faults.py"
    script.write_text(_FAULTS_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "KERAS_DBMTL_MALLOC_TUNING")}
    env["PYTHONPATH"] = root
    out = {}
    for mode in ("plain", "tuned"):
        proc = subprocess.run([sys.executable, str(script), mode], env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        out[mode] = proc.stdout.split("\n")
    # the tuned process re-executed itself once, with the tunables in its environment
    assert out["tuned"][:2] == ["start None", "start " + __import__("applications.common").common.MALLOC_TUNABLES]
    faults = {mode: int(lines[-2].split()[1]) for mode, lines in out.items()}
    # 20 x 64 MB: each allocation is a fresh mapping whose pages fault again without the tunables (16,384 faults
    # with 4 kB pages, 32 with transparent huge pages); with them the freed block is reused
    assert faults["plain"] >= 20 * 30, faults
    assert faults["tuned"] * 20 <= faults["plain"], faults
