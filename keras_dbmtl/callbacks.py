"""Callbacks: `DeltaP` writes `val_delta_p` (Eq. 3 against single-task baselines) into the epoch logs."""

from keras_dbmtl.metrics.delta_p import DeltaP

__all__ = ["DeltaP"]
