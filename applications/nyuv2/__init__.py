"""NYUv2 (the paper's Tables 1 and 6, Figure 4): 13-class segmentation, depth and surface normals.

795 training and 654 test images at 288x384, preprocessed by the MTAN authors (the files LibMTL uses):
`root/{train,val}/{image,label,depth,normal}/<i>.npy`. Download them from the MTAN repository
(https://github.com/lorenmt/mtan, "NYUv2" link) or LibMTL's `examples/nyu` README, and unpack so that
`root/train/image/0.npy` exists.

Command line (`python -m applications.nyuv2 --help`)::

    # the paper's HPS model, DB-MTL, plus the STL baselines for Δp
    python -m applications.nyuv2 --data-root ~/data/nyuv2 --balancer dbmtl --backend jax --stl
    # a minute on a laptop: write 16 synthetic samples, tiny model, 32x32 images
    python -m applications.nyuv2 --data-root /tmp/nyu_fake --write-samples 16 --image-size 32 32 \\
        --backbone tiny --weights none --head-channels 16 --epochs 2 --batch-size 4 --stl

From Python (keeps keras imports out of this module so that `--backend` can still be chosen):

```python
import tempfile
from applications.nyuv2 import NYUV2
from applications.scene.data import write_samples
from applications.scene.train import run

root = write_samples(tempfile.mkdtemp(), num_train=4, num_val=2, image_size=(32, 32), num_classes=13)
summary = run(NYUV2, root, balancer="dbmtl", epochs=1, batch_size=2, backbone="tiny", head_channels=8,
              out_dir=None, verbose=0)
print(summary["markdown"])
assert set(summary["table"]) >= {"seg_mIoU", "depth_AErr", "normal_median", "delta_p"}
```
"""

NYUV2 = {
    "name": "nyuv2",
    "title": "NYUv2",
    "tasks": {"segmentation": 13, "depth": 1, "normal": 3},
    "image_size": (288, 384),
    # The paper's settings (Section 4.1); the SegNet row (Table 6) uses batch 2 and augmentation.
    "defaults": {"epochs": 200, "batch_size": 8, "learning_rate": 1e-4, "weight_decay": 1e-5,
                 "lr_decay_epoch": 100, "augment": False, "backbone": "resnet50", "weights": "resnet_50_imagenet"},
    "arch_defaults": {"segnet": {"batch_size": 2, "augment": True}},
    # STL rows printed in the paper (used for Δp only when no STL model is trained).
    "paper_stl": {
        "hps": {"seg_mIoU": 53.50, "seg_PAcc": 75.39, "depth_AErr": 0.3926, "depth_RErr": 0.1605,
                "normal_mean": 21.99, "normal_median": 15.16, "normal_11.25": 39.04, "normal_22.5": 65.00,
                "normal_30": 75.16},
        "segnet": {"seg_mIoU": 38.30, "seg_PAcc": 63.76, "depth_AErr": 0.6754, "depth_RErr": 0.2780,
                   "normal_mean": 25.01, "normal_median": 19.21, "normal_11.25": 30.14, "normal_22.5": 57.20,
                   "normal_30": 69.15},
    },
    "download": "https://github.com/lorenmt/mtan (preprocessed NYUv2), also linked from LibMTL examples/nyu",
}

__all__ = ["NYUV2"]
