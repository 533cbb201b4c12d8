"""Loaders for the preprocessed NYUv2 and Cityscapes files, with the reference augmentation.

On disk (the layout of the MTAN / LibMTL preprocessed downloads)::

    root/train/image/0.npy    float32 (H, W, 3)
    root/train/label/0.npy    float32 (H, W) class ids, -1 = unlabelled
    root/train/depth/0.npy    float32 (H, W, 1), 0 = no measurement
    root/train/normal/0.npy   float32 (H, W, 3) unit vectors, 0 = no measurement   (NYUv2 only)
    root/val/...              the test split ("val" on disk, as in the reference code)

A batch is `(images, {"segmentation": (B, H, W) int32, "depth": (B, H, W, 1), "normal": (B, H, W, 3)})`
(only the tasks asked for). Two pipelines share one per-sample loader: `SceneDataset`, a
`keras.utils.PyDataset` (any backend, optional worker threads/processes), and `make_tf_dataset`, a `tf.data`
pipeline (Keras 3 feeds `tf.data` to the JAX and PyTorch backends too; needs TensorFlow installed).

Augmentation (`augment=True`) is the reference's (MTAN issue 34, LibMTL `RandomScaleCrop`):

- a scale `s` drawn from (1.0, 1.2, 1.5); a random `int(H/s) x int(W/s)` window is resized back to H x W,
  bilinearly (corners aligned) for the image and the normals, nearest-neighbour for labels and depth;
  depth is divided by `s` (the crop looks like the scene seen `s` times closer). The interpolated normals are
  not re-normalised (neither are the reference's).
- a horizontal flip with probability 0.5, which negates the x (first) component of the normals, as the
  reference does: mirroring the image mirrors the scene, so surfaces facing left now face right.

Every file is checked when read: a missing file (`MissingDataError`, also a `FileNotFoundError`), an
unreadable or truncated `.npy`, an array of the wrong shape, non-finite values or a label outside
[-1, classes) (`DataError`, a `ValueError`) raise an error that names the file and says what to do; no batch
is ever built from such a file.

```python
import tempfile
from applications.scene.data import SceneDataset, write_samples

root = tempfile.mkdtemp()
write_samples(root, num_train=4, num_val=2, image_size=(32, 48), num_classes=13)   # synthetic files
data = SceneDataset(root, "train", tasks={"segmentation": 13, "depth": 1, "normal": 3},
                    batch_size=2, augment=True, seed=0)
images, targets = data[0]
assert images.shape == (2, 32, 48, 3) and targets["segmentation"].shape == (2, 32, 48)
assert targets["depth"].shape == (2, 32, 48, 1) and targets["normal"].shape == (2, 32, 48, 3)
```
"""

import contextlib
import math
import os

import keras
import numpy as np

from applications.common import DataError, MissingDataError

# Task name -> folder on disk.
TASK_FOLDERS = {"segmentation": "label", "depth": "depth", "normal": "normal"}
IGNORE_LABEL = -1
DEFAULT_SCALES = (1.0, 1.2, 1.5)
SPLITS = {"train": "train", "val": "val", "test": "val"}


# --------------------------------------------------------------------------------------------- reading files

def _split_dir(root, split):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}.")
    return os.path.join(os.path.expanduser(root), SPLITS[split])


_LAYOUT = ("the data root must hold train/ and val/, each with image/, label/, depth/ (and normal/ for NYUv2) "
           "folders of <i>.npy files, as in the MTAN / LibMTL preprocessed downloads; check --data-root")


def _fix(path, clause=False):
    """What to do about a bad sample file (a sentence, or a clause to follow other advice)."""
    folder, name = os.path.split(path)
    image = os.path.join(os.path.dirname(folder), "image", name)
    text = (f"extract that file again from the preprocessed download, or drop sample {os.path.splitext(name)[0]} "
            f"of the split by deleting {image} (and its other files).")
    return text if clause else text[0].upper() + text[1:]


def list_indices(root, split):
    """Sorted sample indices `i` of `root/<split>/image/<i>.npy`."""
    image_dir = os.path.join(_split_dir(root, split), "image")
    if not os.path.isdir(image_dir):
        raise MissingDataError(f"No image folder {image_dir}: {_LAYOUT}.")
    indices = []
    for name in os.listdir(image_dir):
        stem, ext = os.path.splitext(name)
        if ext == ".npy" and stem.isdigit():
            indices.append(int(stem))
    if not indices:
        raise MissingDataError(f"No <i>.npy files in {image_dir}: {_LAYOUT}.")
    return sorted(indices)


def sample_path(root, split, folder, index):
    return os.path.join(_split_dir(root, split), folder, f"{index}.npy")


def read_array(path):
    """`np.load(path)` with errors that name the file and the fix (`MissingDataError`, `DataError`)."""
    if not os.path.isfile(path):
        raise MissingDataError(f"Missing file {path}. " + _fix(path))
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as error:  # truncated or not a .npy file: numpy raises ValueError, EOFError, OSError...
        raise DataError(f"Could not read {path} as a .npy array ({type(error).__name__}: {error}); it is "
                        "truncated or not a .npy file. " + _fix(path)) from error
    if not isinstance(array, np.ndarray):
        raise DataError(f"{path} does not hold a single array (an .npz archive?). " + _fix(path))
    return array


def _check_shape(array, path, height, width, channels, image_path=None):
    """Accept (H, W, C), or (H, W) when C == 1; return (H, W, C) float32 (finite values only)."""
    if array.ndim == 2 and channels == 1:
        array = array[..., None]
    expected = (height, width, channels)
    if array.shape != expected:
        size = f"the size of its image {image_path}" if image_path else f"image size {height}x{width}"
        raise DataError(f"{path} has shape {array.shape}; expected {expected} "
                        f"({size}, {channels} channel(s)). " + _fix(path))
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise DataError(f"{path} has dtype {array.dtype}; expected real numbers. " + _fix(path))
    array = array.astype(np.float32, copy=False)
    finite = np.isfinite(array)
    if not finite.all():
        raise DataError(f"{path} holds {array.size - int(finite.sum())} NaN or infinite value(s); missing "
                        "measurements are stored as 0 in this layout. " + _fix(path))
    return array


def load_sample(root, split, index, tasks, num_classes=None):
    """One sample as a dict: "image" (H, W, 3), "segmentation" (H, W, 1), "depth" (H, W, 1), "normal" (H, W, 3).

    Labels stay float here (-1 = unlabelled) so that every array goes through the same resizing code.
    """
    image_path = sample_path(root, split, "image", index)
    image = read_array(image_path)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise DataError(f"{image_path} has shape {image.shape}; expected (height, width, 3). " + _fix(image_path))
    height, width = image.shape[:2]
    sample = {"image": _check_shape(image, image_path, height, width, 3)}
    for task in tasks:
        path = sample_path(root, split, TASK_FOLDERS[task], index)
        channels = 3 if task == "normal" else 1
        array = _check_shape(read_array(path), path, height, width, channels, image_path)
        if task == "segmentation" and num_classes is not None:
            low, high = float(array.min()), float(array.max())
            if low < IGNORE_LABEL or high > num_classes - 1 or not np.all(array == np.round(array)):
                raise DataError(f"{path} holds labels in [{low}, {high}]; expected integers in "
                                f"[{IGNORE_LABEL}, {num_classes - 1}] ({IGNORE_LABEL} = unlabelled). Map another "
                                f"ignore value (e.g. 255) to {IGNORE_LABEL}, check the number of classes, or "
                                + _fix(path, clause=True))
        sample[task] = array
    return sample


# ------------------------------------------------------------------------------------------ resizing, augmenting

def _bilinear_axis(size_in, size_out):
    """Source rows and weights of an align_corners=True bilinear resize along one axis."""
    if size_out == 1 or size_in == 1:
        position = np.zeros(size_out)
    else:
        position = np.arange(size_out) * ((size_in - 1) / (size_out - 1))
    low = np.clip(np.floor(position).astype(np.int64), 0, size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    return low, high, (position - low).astype(np.float32)


def resize_bilinear(array, height, width):
    """(h, w, C) -> (height, width, C), bilinear with corners aligned (PyTorch `align_corners=True`)."""
    low, high, weight = _bilinear_axis(array.shape[0], height)
    array = array[low] * (1 - weight)[:, None, None] + array[high] * weight[:, None, None]
    low, high, weight = _bilinear_axis(array.shape[1], width)
    return array[:, low] * (1 - weight)[None, :, None] + array[:, high] * weight[None, :, None]


def resize_nearest(array, height, width):
    """(h, w, C) -> (height, width, C), nearest neighbour as PyTorch's `mode="nearest"` (floor(i * in / out))."""
    rows = np.minimum(np.floor(np.arange(height) * (array.shape[0] / height)).astype(np.int64), array.shape[0] - 1)
    cols = np.minimum(np.floor(np.arange(width) * (array.shape[1] / width)).astype(np.int64), array.shape[1] - 1)
    return array[rows][:, cols]


_NEAREST = ("segmentation", "depth")


def resize_sample(sample, height, width):
    """Resize every array of a sample (labels and depth nearest, image and normals bilinear)."""
    return {key: (resize_nearest if key in _NEAREST else resize_bilinear)(value, height, width)
            for key, value in sample.items()}


def random_scale_crop(sample, rng, scales=DEFAULT_SCALES):
    """The reference `RandomScaleCrop`: crop a random 1/s window, resize it back, divide depth by s."""
    height, width = sample["image"].shape[:2]
    scale = scales[int(rng.integers(len(scales)))]
    crop_h, crop_w = int(height / scale), int(width / scale)
    top = int(rng.integers(height - crop_h + 1))
    left = int(rng.integers(width - crop_w + 1))
    cropped = {key: value[top:top + crop_h, left:left + crop_w] for key, value in sample.items()}
    out = resize_sample(cropped, height, width)
    if "depth" in out:
        out["depth"] = out["depth"] / scale
    return out


def horizontal_flip(sample):
    """Mirror left-right; the x component of the normals changes sign."""
    out = {key: value[:, ::-1] for key, value in sample.items()}
    if "normal" in out:
        out["normal"] = out["normal"] * np.array([-1.0, 1.0, 1.0], np.float32)
    return out


def augment_sample(sample, rng, scales=DEFAULT_SCALES, flip_probability=0.5):
    sample = random_scale_crop(sample, rng, scales)
    if rng.random() < flip_probability:
        sample = horizontal_flip(sample)
    return sample


def _finalize(sample):
    """Model-ready arrays: contiguous float32, labels int32 (H, W)."""
    out = {}
    for key, value in sample.items():
        value = np.ascontiguousarray(value, dtype=np.float32)
        if key == "segmentation":
            value = np.rint(value[..., 0]).astype(np.int32)
        out[key] = value
    return out


# ------------------------------------------------------------------------------------------------- pipelines

class SceneSource:
    """What both pipelines share: the file list, checks, per-sample loading, resizing and augmentation.

    Args:
        root: dataset folder (holding `train/` and `val/`).
        split: "train", or "val" / "test" (both read `val/`, the reference's test split).
        tasks: dict task -> outputs (e.g. {"segmentation": 13, "depth": 1, "normal": 3}) or a list of tasks.
        augment: the reference's random scale-crop and flip.
        max_samples: keep the first N samples (smoke runs).
        image_size: (height, width) to resize every sample to; None keeps the stored size.
        scales, flip_probability: augmentation settings (reference: (1.0, 1.2, 1.5), 0.5).
    """

    def __init__(self, root, split="train", tasks=("segmentation", "depth", "normal"), augment=False,
                 max_samples=None, image_size=None, scales=DEFAULT_SCALES, flip_probability=0.5):
        self.root, self.split = root, split
        tasks = dict(tasks) if isinstance(tasks, dict) else {task: None for task in tasks}
        unknown = set(tasks) - set(TASK_FOLDERS)
        if unknown:
            raise ValueError(f"Unknown tasks {sorted(unknown)}; expected some of {sorted(TASK_FOLDERS)}.")
        self.tasks = list(tasks)
        self.num_classes = tasks.get("segmentation")
        self.augment, self.scales, self.flip_probability = augment, tuple(scales), flip_probability
        indices = list_indices(root, split)
        if max_samples is not None:
            indices = indices[:max_samples]
        missing = [sample_path(root, split, TASK_FOLDERS[task], i) for i in indices for task in self.tasks
                   if not os.path.isfile(sample_path(root, split, TASK_FOLDERS[task], i))]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise MissingDataError(f"Missing file {missing[0]}{more}: every image needs its "
                                   f"{', '.join(TASK_FOLDERS[t] for t in self.tasks)} file. " + _fix(missing[0]))
        self.indices = indices
        first = read_array(sample_path(root, split, "image", indices[0]))
        self.stored_size = tuple(first.shape[:2])
        self.image_size = tuple(image_size) if image_size is not None else self.stored_size

    def __len__(self):
        return len(self.indices)

    def load(self, position, rng=None):
        """Sample number `position` (0-based in the file list), model-ready; `rng` drives augmentation."""
        index = self.indices[position]
        sample = load_sample(self.root, self.split, index, self.tasks, self.num_classes)
        size = sample["image"].shape[:2]
        if size != self.stored_size and self.image_size == self.stored_size:
            path = sample_path(self.root, self.split, "image", index)
            raise DataError(f"{path} is {size[0]}x{size[1]} but the first image of the split is "
                            f"{self.stored_size[0]}x{self.stored_size[1]}; pass image_size to resize them all, or "
                            + _fix(path, clause=True))
        if size != self.image_size:
            sample = resize_sample(sample, *self.image_size)
        if self.augment:
            sample = augment_sample(sample, rng if rng is not None else np.random.default_rng(),
                                    self.scales, self.flip_probability)
        return _finalize(sample)

    def signature(self):
        """(name, shape, dtype) of each array of a sample, image first."""
        height, width = self.image_size
        spec = [("image", (height, width, 3), "float32")]
        for task in self.tasks:
            if task == "segmentation":
                spec.append((task, (height, width), "int32"))
            else:
                spec.append((task, (height, width, 3 if task == "normal" else 1), "float32"))
        return spec


class SceneDataset(keras.utils.PyDataset):
    """Batches of NYUv2 / Cityscapes samples as a `keras.utils.PyDataset` (works with every backend).

    Args: those of `SceneSource`, plus
        batch_size: samples per batch.
        shuffle: reshuffle every epoch (default: True for "train").
        drop_last: drop the last incomplete batch (default: True for "train", as the reference).
        seed: seeds the shuffling and the augmentation (reproducible with any number of workers).
        workers, use_multiprocessing, max_queue_size: `keras.utils.PyDataset` options.
    """

    def __init__(self, root, split="train", tasks=("segmentation", "depth", "normal"), batch_size=8,
                 augment=False, shuffle=None, drop_last=None, max_samples=None, image_size=None, seed=None,
                 scales=DEFAULT_SCALES, flip_probability=0.5, **kwargs):
        super().__init__(**kwargs)
        self.source = SceneSource(root, split, tasks, augment, max_samples, image_size, scales, flip_probability)
        is_train = split == "train"
        self.batch_size = int(batch_size)
        self.shuffle = is_train if shuffle is None else shuffle
        self.drop_last = is_train if drop_last is None else drop_last
        self.seed = np.random.SeedSequence(seed).entropy if seed is None else seed
        self.epoch = 0
        if self.drop_last and len(self.source) < self.batch_size:
            raise ValueError(f"{len(self.source)} samples in {root}/{split} is fewer than one batch of "
                             f"{self.batch_size} (drop_last=True).")
        self._order = self._make_order()

    @property
    def tasks(self):
        return self.source.tasks

    def _make_order(self):
        order = np.arange(len(self.source))
        if self.shuffle:
            np.random.default_rng([self.seed, self.epoch]).shuffle(order)
        return order

    def __len__(self):
        count = len(self.source) / self.batch_size
        return int(count) if self.drop_last else math.ceil(count)

    def __getitem__(self, batch):
        if batch >= len(self):
            raise IndexError(f"batch {batch} out of range ({len(self)} batches)")
        positions = self._order[batch * self.batch_size:(batch + 1) * self.batch_size]
        rng = np.random.default_rng([self.seed, self.epoch, batch, 1])
        samples = [self.source.load(int(p), rng) for p in positions]
        images = np.stack([s["image"] for s in samples])
        return images, {task: np.stack([s[task] for s in samples]) for task in self.source.tasks}

    def on_epoch_end(self):
        self.epoch += 1
        self._order = self._make_order()


class _LastDataError:
    """The newest `DataError` raised inside a tf.data pipeline (TensorFlow wraps it in its own error type)."""

    count = 0
    error = None


def _remember_data_error(error):
    _LastDataError.count += 1
    _LastDataError.error = error


@contextlib.contextmanager
def tf_data_errors_unwrapped():
    """Re-raises the loader's `DataError` that a tf.data pipeline (`make_tf_dataset`) wrapped in a TensorFlow
    error (InvalidArgumentError, UnknownError), chained to it, so that `except DataError` works on both loaders."""
    seen = _LastDataError.count
    try:
        yield
    except DataError:
        raise
    except Exception as error:
        if _LastDataError.count > seen and _LastDataError.error is not None:
            raise _LastDataError.error from error
        raise


def make_tf_dataset(root, split="train", tasks=("segmentation", "depth", "normal"), batch_size=8,
                    augment=False, shuffle=None, drop_last=None, max_samples=None, image_size=None, seed=None,
                    scales=DEFAULT_SCALES, flip_probability=0.5):
    """The same batches as `SceneDataset`, as a `tf.data.Dataset` (parallel loading, prefetching)."""
    import tensorflow as tf

    source = SceneSource(root, split, tasks, augment, max_samples, image_size, scales, flip_probability)
    is_train = split == "train"
    shuffle = is_train if shuffle is None else shuffle
    drop_last = is_train if drop_last is None else drop_last
    signature = source.signature()

    def load(position, sample_seed):
        rng = np.random.default_rng(int(sample_seed) & 0x7FFFFFFFFFFFFFFF)
        try:
            sample = source.load(int(position), rng)
        except DataError as error:  # tf.numpy_function wraps it: `tf_data_errors_unwrapped` re-raises it
            _remember_data_error(error)
            raise
        return tuple(sample[name] for name, _, _ in signature)

    def load_tf(position, sample_seed):
        arrays = tf.numpy_function(load, [position, sample_seed], [tf.as_dtype(d) for _, _, d in signature])
        for array, (_, shape, _) in zip(arrays, signature):
            array.set_shape(shape)
        return arrays[0], {name: array for (name, _, _), array in zip(signature[1:], arrays[1:])}

    dataset = tf.data.Dataset.range(len(source))
    if shuffle:
        dataset = dataset.shuffle(len(source), seed=seed, reshuffle_each_iteration=True)
    seeds = tf.data.Dataset.random(seed=seed)
    dataset = tf.data.Dataset.zip((dataset, seeds))
    dataset = dataset.map(load_tf, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return _with_data_errors(dataset.batch(batch_size, drop_remainder=drop_last).prefetch(tf.data.AUTOTUNE))


def _with_data_errors(dataset):
    """`dataset` (the same pipeline, same variant) whose Python iterators raise the loader's `DataError` where
    TensorFlow would raise the error it wrapped it in (InvalidArgumentError from `tf.numpy_function`): iterating
    the dataset, as `for batch in dataset`, Keras' JAX and torch loops and `as_numpy_iterator` do, gives the
    same error as `SceneDataset`. (TensorFlow's own `fit` reads the pipeline inside its compiled step:
    `tf_data_errors_unwrapped` around it does the same there.)"""
    import tensorflow as tf
    from tensorflow.python.data.ops import dataset_ops, iterator_ops

    class DataErrorIterator(iterator_ops.OwnedIterator):
        def __init__(self, source):
            self._data_errors_seen = _LastDataError.count    # a prefetched load may fail before the next() it reaches
            super().__init__(source)

        def _next_internal(self):
            try:
                return super()._next_internal()
            except tf.errors.OutOfRangeError:                # the end of the data: StopIteration in __next__
                raise
            except tf.errors.OpError as error:
                if _LastDataError.count > self._data_errors_seen and _LastDataError.error is not None:
                    raise _LastDataError.error from error
                raise

    class DataErrorDataset(dataset_ops.UnaryUnchangedStructureDataset):
        def __init__(self, source):
            super().__init__(source, source._variant_tensor)

        def __iter__(self):
            if tf.executing_eagerly():
                return DataErrorIterator(self)
            return super().__iter__()

    return DataErrorDataset(dataset)


# -------------------------------------------------------------------------------------------- synthetic files

def write_samples(root, num_train=8, num_val=4, image_size=(32, 32), num_classes=13, normals=True, seed=0):
    """Write synthetic samples in the on-disk layout (for smoke runs and examples; not a benchmark).

    Targets are pixelwise functions of the image (so a model can fit them), with unlabelled pixels (-1) and
    pixels without depth / normal (0), like the real files.
    """
    rng = np.random.default_rng(seed)
    height, width = image_size
    for split, count in (("train", num_train), ("val", num_val)):
        folders = ["image", "label", "depth"] + (["normal"] if normals else [])
        for folder in folders:
            os.makedirs(os.path.join(root, split, folder), exist_ok=True)
        for index in range(count):
            coarse = rng.random((max(height // 8, 1), max(width // 8, 1), 3)).astype(np.float32)
            image = resize_bilinear(coarse, height, width)
            label = np.minimum((image[..., 0] * num_classes).astype(np.int64), num_classes - 1).astype(np.float32)
            invalid = rng.random((height, width)) < 0.05
            label[invalid] = IGNORE_LABEL
            depth = (1.0 + 9.0 * image[..., 1:2]) * (~invalid)[..., None]
            np.save(sample_path(root, split, "image", index), image)
            np.save(sample_path(root, split, "label", index), label)
            np.save(sample_path(root, split, "depth", index), depth.astype(np.float32))
            if normals:
                normal = image - 0.5
                normal = normal / np.linalg.norm(normal, axis=-1, keepdims=True).clip(1e-6)
                np.save(sample_path(root, split, "normal", index), (normal * (~invalid)[..., None]).astype(np.float32))
    return root
