"""Mean absolute error in the units of the paper's Table 3 (QM9)."""

import keras
from keras import ops

from keras_dbmtl.metrics import _utils


def _as_float_or_list(x):
    if isinstance(x, (list, tuple)):
        return [float(v) for v in x]
    try:
        return float(x)
    except TypeError:  # numpy array
        return [float(v) for v in x]


@keras.saving.register_keras_serializable(package="keras_dbmtl")
class DenormalizedMAE(_utils.MeanOverValid):
    """MAE of de-normalised predictions, times a unit scale (Table 3).

    Targets and predictions are z-scored during training; this metric maps
    both back with ``x * std + mean`` and reports
    ``unit_scale * mean |pred - true|`` over every element seen since the last
    reset (sample-weighted over the epoch, as LibMTL's ``QM9Metric``).
    ``unit_scale=1000`` turns eV into meV (QM9's eps_HOMO, eps_LUMO, ZPVE, U0,
    U, H, G in Table 3).  ``mean``/``std`` are scalars or one value per
    column of the last axis.  (``mean`` cancels in the difference; it is
    accepted so the de-normalisation reads as it is written.)  Lower is
    better.  Log key: ``<output>_mae``.
    """

    higher_is_better = False

    def __init__(self, mean=0.0, std=1.0, unit_scale=1.0, name="mae",
                 dtype=None):
        super().__init__(name=name, dtype=dtype, scale=unit_scale)
        self.mean = _as_float_or_list(mean)
        self.std = _as_float_or_list(std)
        self.unit_scale = float(unit_scale)

    def _values(self, y_true, y_pred):
        y_true = ops.cast(y_true, "float32")
        y_pred = ops.cast(y_pred, "float32")
        if len(y_true.shape) == len(y_pred.shape) + 1:
            y_true = _utils.squeeze_trailing_one(y_true, len(y_pred.shape))
        elif len(y_pred.shape) == len(y_true.shape) + 1:
            y_pred = _utils.squeeze_trailing_one(y_pred, len(y_true.shape))
        std = ops.convert_to_tensor(self.std, dtype="float32")
        mean = ops.convert_to_tensor(self.mean, dtype="float32")
        err = ops.abs((y_pred * std + mean) - (y_true * std + mean))
        return err, ops.ones_like(err, dtype="bool")

    def get_config(self):
        config = super().get_config()
        config.update({"mean": self.mean, "std": self.std,
                       "unit_scale": self.unit_scale})
        return config
