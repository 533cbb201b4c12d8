"""Scene-understanding multi-task models: encoder + one head per task, as a `keras_dbmtl.MultiTaskModel`.

Architectures (`arch`):

- "hps": the paper's model (Tables 1, 2): a dilated ResNet-50 (output stride 8) shared by all tasks and one
  DeepLab ASPP head per task.
- "mtan": MTAN attention branches over the dilated ResNet, DeepLab heads (Figure 4b).
- "cross_stitch": one dilated ResNet per task joined by cross-stitch units, DeepLab heads (Figure 4a).
- "segnet": SegNet with MTAN attention and the reference's small conv heads (Table 6).

Tasks are a dict task -> output channels: {"segmentation": classes, "depth": 1, "normal": 3}. Segmentation
heads output logits, depth heads a map, normal heads unit vectors.

```python
import numpy as np
from applications.scene.models import build_scene_model

model = build_scene_model({"segmentation": 7, "depth": 1}, arch="hps", backbone="tiny", head_channels=16)
outputs = model(np.zeros((2, 32, 32, 3), "float32"))
assert tuple(outputs["segmentation"].shape) == (2, 32, 32, 7)
assert tuple(outputs["depth"].shape) == (2, 32, 32, 1)
```
"""


import keras_dbmtl
from applications.scene.backbones import build_backbone
from applications.scene.cross_stitch import build_cross_stitch_encoder, cross_stitch_task_layers
from applications.scene.heads import ConvHead, DeepLabHead
from applications.scene.mtan import build_mtan_encoder, mtan_task_layers
from applications.scene.segnet import build_segnet_encoder, segnet_task_layers

ARCHITECTURES = ("hps", "mtan", "cross_stitch", "segnet")
# Input height and width must divide by this, per architecture (exact resizing back to the input size).
SIZE_MULTIPLE = {"hps": 8, "mtan": 8, "cross_stitch": 8, "segnet": 32}


def build_encoder_and_heads(tasks, arch="hps", backbone="resnet50", weights=None, output_stride=8,
                            head_channels=256, segnet_width=64, cross_stitch_init=(1.0, 1.0)):
    """The parts of a scene model: `(encoder, heads, task_layers)`.

    Args:
        tasks: dict task -> output channels.
        arch: one of `ARCHITECTURES`.
        backbone: ResNet variant for the ResNet architectures ("resnet50", "resnet18", "tiny", ...).
        weights: None (random) or a keras-hub preset name / local preset directory ("resnet_50_imagenet").
        output_stride: 8 (paper) or 16 for the ResNet encoders; the ASPP rates scale with it (12/24/36 at 8).
        head_channels: width of the DeepLab heads (256 in the paper).
        segnet_width: first-stage width of SegNet (64 in the paper).
        cross_stitch_init: initial (self, other) cross-stitch weights; the reference uses (1, 1).
    """
    tasks = dict(tasks)
    if arch not in ARCHITECTURES:
        raise ValueError(f"Unknown architecture {arch!r}; expected one of {ARCHITECTURES}.")
    names = list(tasks)
    if arch == "segnet":
        encoder = build_segnet_encoder(names, width=segnet_width)
        heads = {t: ConvHead(k, task=t, channels=segnet_width, normalize=(t == "normal"), name=f"{t}_head")
                 for t, k in tasks.items()}
        return encoder, heads, segnet_task_layers(names)

    def make_backbone(name=None):
        return build_backbone(backbone, weights=weights, output_stride=output_stride, name=name)

    if arch == "hps":
        encoder, task_layers, per_task = make_backbone(), None, False
    elif arch == "mtan":
        encoder, task_layers, per_task = build_mtan_encoder(names, make_backbone()), mtan_task_layers(names), True
    else:
        encoder = build_cross_stitch_encoder(names, make_backbone, *cross_stitch_init)
        task_layers, per_task = cross_stitch_task_layers(names), True
    rates = tuple(r * 8 // output_stride for r in (12, 24, 36))
    heads = {t: DeepLabHead(k, task=t if per_task else None, upsample=output_stride, channels=head_channels,
                            dilation_rates=rates, normalize=(t == "normal"), name=f"{t}_head")
             for t, k in tasks.items()}
    return encoder, heads, task_layers


def build_scene_model(tasks, arch="hps", name=None, **kwargs):
    """A `keras_dbmtl.MultiTaskModel` for the tasks (arguments of `build_encoder_and_heads`)."""
    encoder, heads, task_layers = build_encoder_and_heads(tasks, arch=arch, **kwargs)
    return keras_dbmtl.MultiTaskModel(encoder=encoder, heads=heads, task_layers=task_layers,
                                      name=name or f"{arch}_model")
