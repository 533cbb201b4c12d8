"""Metrics of the DB-MTL paper's experiments and Delta_p (Eq. 3).

Stateful Keras metrics (accumulate over an epoch, jit-safe, exact counts):

- segmentation: :class:`SegmentationMIoU` (``miou``),
  :class:`SegmentationPixelAccuracy` (``pixel_acc``)
- depth: :class:`DepthAbsError` (``abs_err``), :class:`DepthRelError`
  (``rel_err``)
- normals: :class:`NormalAngleMean` (``angle_mean``),
  :class:`NormalAngleMedian` (``angle_median``), :class:`NormalWithinAngle`
  (``within_11_25`` / ``within_22_5`` / ``within_30``)
- classification: :class:`ClassificationAccuracy` (``accuracy``)
- regression: :class:`DenormalizedMAE` (``mae``)

Training diagnostics: :class:`GradientStatistics` (the task gradients' Gramian and cosines, fed by the model;
see ``keras_dbmtl.callbacks.TaskBalanceMonitor``).

Delta_p: :func:`delta_p`, :func:`delta_p_per_task` (the callback that writes ``val_delta_p`` every epoch is
``keras_dbmtl.callbacks.DeltaP``).
"""

from keras_dbmtl.metrics.classification import ClassificationAccuracy
from keras_dbmtl.metrics.delta_p import default_higher_is_better
from keras_dbmtl.metrics.delta_p import delta_p
from keras_dbmtl.metrics.delta_p import delta_p_per_task
from keras_dbmtl.metrics.delta_p import group_baselines
from keras_dbmtl.metrics.delta_p import is_higher_better
from keras_dbmtl.metrics.depth import DepthAbsError
from keras_dbmtl.metrics.depth import DepthRelError
from keras_dbmtl.metrics.gradient_statistics import GradientStatistics
from keras_dbmtl.metrics.normals import NormalAngleMean
from keras_dbmtl.metrics.normals import NormalAngleMedian
from keras_dbmtl.metrics.normals import NormalWithinAngle
from keras_dbmtl.metrics.regression import DenormalizedMAE
from keras_dbmtl.metrics.segmentation import SegmentationMIoU
from keras_dbmtl.metrics.segmentation import SegmentationPixelAccuracy


def nyuv2_metrics(num_classes=13, ignore_index=-1):
    """Fresh metric objects for NYUv2's three tasks, keyed like the outputs.

    ``{"seg": [...], "depth": [...], "normal": [...]}`` for
    ``compile(metrics=...)``; log keys ``seg_miou``, ``seg_pixel_acc``,
    ``depth_abs_err``, ``depth_rel_err``, ``normal_angle_mean``,
    ``normal_angle_median``, ``normal_within_11_25``, ``normal_within_22_5``,
    ``normal_within_30`` (with ``val_`` on validation).
    """
    return {
        "seg": [SegmentationMIoU(num_classes, ignore_index),
                SegmentationPixelAccuracy(num_classes, ignore_index)],
        "depth": [DepthAbsError(), DepthRelError()],
        "normal": [NormalAngleMean(), NormalAngleMedian(),
                   NormalWithinAngle(11.25), NormalWithinAngle(22.5),
                   NormalWithinAngle(30.0)],
    }


__all__ = [
    "ClassificationAccuracy",
    "DenormalizedMAE",
    "DepthAbsError",
    "DepthRelError",
    "GradientStatistics",
    "NormalAngleMean",
    "NormalAngleMedian",
    "NormalWithinAngle",
    "SegmentationMIoU",
    "SegmentationPixelAccuracy",
    "default_higher_is_better",
    "delta_p",
    "delta_p_per_task",
    "group_baselines",
    "is_higher_better",
    "nyuv2_metrics",
]
