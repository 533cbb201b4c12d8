"""Scene understanding (NYUv2, Cityscapes) for keras_dbmtl, in keras-hub's layout: backbone, heads, data.

- `backbones`: `DilatedResNetBackbone`, keras-hub's `ResNetBackbone` with dilated last stages (output stride
  8), ImageNet weights from a keras-hub preset; `build_backbone`.
- `heads`: `DeepLabHead` (keras-hub's DeepLabV3 `SpatialPyramidPooling`, rates 12/24/36) and `ConvHead`.
- `mtan`, `cross_stitch`, `segnet`: the other architectures, each with a `*_task_layers` helper that says which
  encoder layers belong to one task (`MultiTaskModel(task_layers=...)`).
- `models`: `build_scene_model(tasks, arch=...)` -> `keras_dbmtl.MultiTaskModel`.
- `data`: `SceneDataset` (`keras.utils.PyDataset`) and `make_tf_dataset` over the preprocessed `.npy` files,
  with the reference augmentation; `write_samples` for synthetic files.
- `train`: the paper's training protocol, results tables and Δp; `cli`: the shared command line.

Names are loaded on first use, so that importing this package does not import Keras (the command lines pick
the backend first).

```python
import tempfile
import keras
from applications import scene

root = scene.write_samples(tempfile.mkdtemp(), num_train=4, num_val=2, image_size=(32, 32), num_classes=13)
tasks = {"segmentation": 13, "depth": 1, "normal": 3}
train = scene.SceneDataset(root, "train", tasks=tasks, batch_size=2, augment=True, seed=0)
model = scene.build_scene_model(tasks, arch="hps", backbone="tiny", head_channels=8)
model.compile(optimizer=keras.optimizers.Adam(1e-4), loss=scene.train.task_losses(tasks),
              metrics=scene.train.task_metrics(tasks), balancer="dbmtl")
history = model.fit(train, epochs=1, verbose=0)
assert "segmentation_loss" in history.history
```
"""

import importlib

_EXPORTS = {
    "DilatedResNetBackbone": "backbones", "build_backbone": "backbones", "resnet_config": "backbones",
    "DeepLabHead": "heads", "ConvHead": "heads", "L2Normalize": "heads",
    "build_mtan_encoder": "mtan", "mtan_task_layers": "mtan",
    "CrossStitch": "cross_stitch", "build_cross_stitch_encoder": "cross_stitch",
    "cross_stitch_task_layers": "cross_stitch",
    "build_segnet_encoder": "segnet", "segnet_task_layers": "segnet", "MaxPoolWithArgmax": "segnet",
    "MaxUnpool": "segnet",
    "build_scene_model": "models", "build_encoder_and_heads": "models", "ARCHITECTURES": "models",
    "SceneDataset": "data", "SceneSource": "data", "make_tf_dataset": "data", "write_samples": "data",
}
_SUBMODULES = ("backbones", "heads", "mtan", "cross_stitch", "segnet", "models", "data", "train", "cli")

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
