"""Cityscapes (the paper's Table 2): 7-class segmentation and depth.

2,975 training and 500 test images at 128x256, preprocessed by the MTAN authors (the files LibMTL uses):
`root/{train,val}/{image,label,depth}/<i>.npy` (7-class labels, -1 = unlabelled; no normals). Download them
from the MTAN repository (https://github.com/lorenmt/mtan, "Cityscapes" link) or LibMTL's
`examples/cityscapes` README, and unpack so that `root/train/image/0.npy` exists.

Command line (`python -m applications.cityscapes --help`)::

    python -m applications.cityscapes --data-root ~/data/cityscapes --balancer dbmtl --backend jax --stl
    python -m applications.cityscapes --data-root /tmp/city_fake --write-samples 16 --image-size 32 64 \\
        --backbone tiny --weights none --head-channels 16 --epochs 2 --batch-size 4 --stl

```python
import tempfile
from applications.cityscapes import CITYSCAPES
from applications.scene.data import write_samples
from applications.scene.train import run

root = write_samples(tempfile.mkdtemp(), num_train=4, num_val=2, image_size=(32, 64), num_classes=7,
                     normals=False)
summary = run(CITYSCAPES, root, balancer="ew", epochs=1, batch_size=2, backbone="tiny", head_channels=8,
              out_dir=None, verbose=0)
assert set(summary["table"]) == {"seg_mIoU", "seg_PAcc", "depth_AErr", "depth_RErr", "delta_p"}
```
"""

CITYSCAPES = {
    "name": "cityscapes",
    "title": "Cityscapes",
    "tasks": {"segmentation": 7, "depth": 1},
    "image_size": (128, 256),
    "defaults": {"epochs": 200, "batch_size": 64, "learning_rate": 1e-4, "weight_decay": 1e-5,
                 "lr_decay_epoch": 100, "augment": False, "backbone": "resnet50", "weights": "resnet_50_imagenet"},
    "arch_defaults": {},
    "paper_stl": {"hps": {"seg_mIoU": 69.06, "seg_PAcc": 91.54, "depth_AErr": 0.01282, "depth_RErr": 43.53}},
    "download": "https://github.com/lorenmt/mtan (preprocessed Cityscapes), also linked from LibMTL "
                "examples/cityscapes",
}

__all__ = ["CITYSCAPES"]
