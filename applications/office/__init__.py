"""Office-31 and Office-Home (the paper's Table 4): every domain is a task with its own images.

A shared ResNet-18 encoder (+ Dense(512)-BN-ReLU-Dropout) and one linear head per domain, trained
with ``keras_dbmtl.MultiTaskModel(per_task_inputs=True)``: each step feeds every domain its own
batch (``{domain: images}``), each domain's loss is computed on its own batch through the shared
encoder, and the balancer combines them. Runs on TensorFlow, PyTorch and JAX.

```python
import tempfile
import keras
from applications.office import data, model, train

root = data.write_synthetic(tempfile.mkdtemp(), "office31", per_class=5, image_size=32,
                            num_classes=3)          # or your Office-31 folder with split files
train_sets = data.load_office(root, "office31", "train", batch_size=4, image_size=32)
batches = data.zip_domains(train_sets)              # ({domain: x}, {domain: y}); short domains cycle
net = model.build_office_model(["amazon", "dslr", "webcam"], num_classes=31,
                               backbone="small", image_size=32, hidden_dim=16)
net.compile(optimizer="adam", balancer="dbmtl",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
net.fit(batches, epochs=1, verbose=0)
test_sets = data.load_office(root, "office31", "test", image_size=32)
print(train.evaluate_domains(net, test_sets))       # {domain: test accuracy %}

# or the whole Table 4 protocol (val-selected epoch, Δp, json + markdown in results/office):
train.run(root, "office31", balancer="dbmtl", epochs=1, batch_size=4, image_size=32,
          backbone="small", out_dir=tempfile.mkdtemp(), verbose=0)
```

Command line: ``python -m applications.office --help``; layout of the data: ``data.py``.
"""

# Exports are lazy so that ``python -m applications.office --backend X`` can still choose the
# Keras backend before keras is imported.
_EXPORTS = {
    "data": ("DATASETS", "DomainImages", "ZippedDomains", "cycle_zip", "dataset_spec", "load_office",
             "make_splits", "read_split_file", "write_synthetic", "zip_domains"),
    "model": ("build_backbone", "build_encoder", "build_heads", "build_office_model",
              "shared_classifier", "add_weight_decay"),
    "train": ("train_office", "run", "evaluate_domains", "DomainEvaluator", "PAPER_STL"),
}
__all__ = [name for names in _EXPORTS.values() for name in names]


def __getattr__(name):
    import importlib

    for module, names in _EXPORTS.items():
        if name in names:
            return getattr(importlib.import_module(f"applications.office.{module}"), name)
    if name in _EXPORTS:
        return importlib.import_module(f"applications.office.{name}")
    raise AttributeError(f"module 'applications.office' has no attribute {name!r}")
