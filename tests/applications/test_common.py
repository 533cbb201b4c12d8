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
