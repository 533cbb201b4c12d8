"""Office-31 / Office-Home loaders: one image-classification dataset per domain.

Expected layout (the split files and paths of LibMTL's ``examples/office/data_txt``)::

    DATA_ROOT/                               # --data-root
      amazon/images/<class>/<file>.jpg       # Office-31: amazon, dslr, webcam
      Art/<class>/<file>.jpg                 # Office-Home: Art, Clipart, Product, Real_World
    SPLIT_DIR/                               # --split-dir (default: DATA_ROOT, then DATA_ROOT/data_txt/<name>)
      <domain>_train.txt  <domain>_val.txt  <domain>_test.txt

Every split-file line is ``<path relative to DATA_ROOT> <integer label>``, e.g.
``dslr/images/back_pack/frame_0008.jpg 0`` (Office-31) or ``Real_World/Calendar/00020.jpg 0``
(Office-Home). Labels are taken from the file, never from folder names (LibMTL numbers the classes
in order of first appearance, not alphabetically). ``<name>`` above is ``office-31`` or
``office-home``, the folder names LibMTL uses, so a checkout of ``LibMTL/examples/office/data_txt``
copied into DATA_ROOT works as is. ``make_splits`` writes a fresh 60/20/20 split when you have none.

Preprocessing is the reference one for every split: resize to ``image_size`` x ``image_size``
(bilinear, aspect ratio not kept), RGB in [0, 1], ImageNet mean/std normalisation. The reference
uses no augmentation; ``random_flip=True`` adds a horizontal flip (off by default).

Unequal domain sizes (``zip_domains`` / ``cycle_zip``): as in LibMTL's multi-input trainer, an epoch
is as many steps as the *largest* domain has batches; each domain keeps its own stream of shuffled
passes, so a shorter domain starts a new shuffled pass when it runs out and simply continues across
the epoch boundary (LibMTL keeps the iterators alive across epochs and re-creates one when it raises
StopIteration). Training batches drop the last incomplete batch (``drop_last=True`` in LibMTL);
evaluation batches keep it.

Bad files raise ``MissingDataError`` (also a ``FileNotFoundError``: a listed image or a split file that
does not exist) or ``DataError`` (a ``ValueError``: an image Pillow cannot decode, e.g. truncated, a
malformed split-file line, a label out of range), each naming the file and the fix; no batch is built
from them.
"""

import math
import os
import random

import keras
import numpy as np

from applications.common import DataError, MissingDataError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

# name -> (domains as they appear in paths / split-file names, classes, Table 4 column names,
#          LibMTL's data_txt sub-folder)
DATASETS = {
    "office31": {
        "domains": ("amazon", "dslr", "webcam"),
        "num_classes": 31,
        "columns": ("amazon", "dslr", "webcam"),
        "libmtl_name": "office-31",
    },
    "officehome": {
        "domains": ("Art", "Clipart", "Product", "Real_World"),
        "num_classes": 65,
        "columns": ("artistic", "clipart", "product", "real"),
        "libmtl_name": "office-home",
    },
}
_ALIASES = {"office-31": "office31", "office_31": "office31", "office-home": "officehome",
            "office_home": "officehome"}
SPLITS = ("train", "val", "test")


def dataset_spec(name):
    """The dict of DATASETS for ``name`` (``office31``/``office-31``/``officehome``/``office-home``)."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        raise ValueError(f"Unknown Office dataset {name!r}; expected one of {sorted(DATASETS)}.")
    return DATASETS[key]


# ----------------------------------------------------------------------------------------------
# split files
# ----------------------------------------------------------------------------------------------
def read_split_file(path):
    """Reads ``<relative path> <label>`` lines; returns a list of (path, int label)."""
    if not os.path.isfile(path):
        raise MissingDataError(f"Split file not found: {path}. Pass --split-dir, or write the split files "
                               "with applications.office.data.make_splits.")
    entries = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(maxsplit=1)  # paths may contain spaces, the label never does
            if len(parts) != 2:
                raise DataError(f"{path}:{lineno}: expected '<path> <label>', got {line!r}. Fix or delete "
                                "that line (a truncated copy? compare with LibMTL's data_txt).")
            try:
                label = int(parts[1])
            except ValueError:
                raise DataError(f"{path}:{lineno}: label {parts[1]!r} is not an integer. Fix or delete that "
                                "line (a truncated copy? compare with LibMTL's data_txt).") from None
            entries.append((parts[0], label))
    return entries


def find_split_file(data_root, dataset, domain, split, split_dir=None):
    """Path of ``<domain>_<split>.txt``: in ``split_dir`` if given, else DATA_ROOT, else
    DATA_ROOT/data_txt/<office-31|office-home> (LibMTL's folder)."""
    name = f"{domain}_{split}.txt"
    if split_dir is not None:
        return os.path.join(split_dir, name)
    candidates = [
        os.path.join(data_root, name),
        os.path.join(data_root, "data_txt", dataset_spec(dataset)["libmtl_name"], name),
    ]
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise MissingDataError(
        f"No split file {name} for domain {domain!r}; looked in: " + ", ".join(candidates)
        + ". Pass --split-dir, copy LibMTL's examples/office/data_txt/<name>/ there, or write one "
          "with applications.office.data.make_splits."
    )


def make_splits(data_root, dataset, out_dir=None, fractions=(0.6, 0.2, 0.2), seed=0, domains=None):
    """Writes ``<domain>_{train,val,test}.txt`` from the image folders (a per-class random
    60/20/20 split; labels = index of the class folder in sorted order). Returns the folder."""
    spec = dataset_spec(dataset)
    out_dir = out_dir or data_root
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(seed)
    exts = (".jpg", ".jpeg", ".png", ".bmp")
    for domain in domains or spec["domains"]:
        base = os.path.join(data_root, domain)
        if os.path.isdir(os.path.join(base, "images")):
            base = os.path.join(base, "images")  # Office-31 keeps classes under <domain>/images
        if not os.path.isdir(base):
            raise MissingDataError(f"Domain folder not found: {base}. --data-root must hold the domain folders "
                                   "(amazon/images/<class>/..., or Art/<class>/...).")
        classes = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)))
        parts = {s: [] for s in SPLITS}
        for label, cls in enumerate(classes):
            files = sorted(f for f in os.listdir(os.path.join(base, cls)) if f.lower().endswith(exts))
            rng.shuffle(files)
            n_train = int(round(fractions[0] * len(files)))
            n_val = int(round(fractions[1] * len(files)))
            chunks = (files[:n_train], files[n_train:n_train + n_val], files[n_train + n_val:])
            for split, chunk in zip(SPLITS, chunks):
                rel = os.path.relpath(os.path.join(base, cls), data_root).replace(os.sep, "/")
                parts[split] += [f"{rel}/{f} {label}" for f in chunk]
        for split in SPLITS:
            with open(os.path.join(out_dir, f"{domain}_{split}.txt"), "w", encoding="utf-8") as f:
                f.write("\n".join(parts[split]) + ("\n" if parts[split] else ""))
    return out_dir


# ----------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------
_IMAGE_FIX = ("Copy that image again from the dataset archive, or remove its line from the split file "
              "(<domain>_<split>.txt).")


def decode_image(path, image_size):
    """The image at ``path`` as uint8 RGB, resized (bilinear) to image_size x image_size.

    Raises ``MissingDataError`` / ``DataError`` naming the file (a truncated file fails to decode: Pillow
    refuses truncated images unless ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` was set)."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise MissingDataError(f"Image not found: {path}. " + _IMAGE_FIX)
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), Image.BILINEAR)
            image = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise DataError(f"Cannot decode image {path} ({type(e).__name__}: {e}); it is truncated or not an "
                        "image. " + _IMAGE_FIX) from e
    if image.shape != (image_size, image_size, 3):
        raise DataError(f"Image {path} decoded to shape {image.shape}, expected "
                        f"{(image_size, image_size, 3)}. " + _IMAGE_FIX)
    return image


def normalize(images_uint8):
    """uint8 RGB (..., H, W, 3) -> float32 (x / 255 - mean) / std with the ImageNet statistics."""
    x = images_uint8.astype(np.float32) / 255.0
    return (x - IMAGENET_MEAN) / IMAGENET_STD


class DomainImages(keras.utils.PyDataset):
    """One domain, one split: batches ``(images, labels)``, images float32 (B, H, W, 3)
    normalised (or (B, 3, H, W) with ``data_format="channels_first"``), labels int32 (B,).

    Random access: ``batch(index, epoch)`` is a pure function of (seed, epoch, index), so
    ``zip_domains`` can cycle this domain at its own pace and worker threads are safe.
    """

    def __init__(self, root, entries, batch_size=64, image_size=224, shuffle=False,
                 drop_last=False, random_flip=False, seed=0, cache=False, data_format=None,
                 name=None, check_files=True, **kwargs):
        super().__init__(**kwargs)
        if not entries:
            raise DataError(f"No samples for {name or 'this domain'} (empty split file?). Check the split "
                            "file, or write new ones with applications.office.data.make_splits.")
        self.root = root
        self.paths = [os.path.join(root, p) for p, _ in entries]
        self.labels = np.asarray([lab for _, lab in entries], dtype=np.int32)
        self.batch_size = int(batch_size)
        self.image_size = int(image_size)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.random_flip = random_flip
        self.seed = int(seed)
        self.data_format = data_format or keras.config.image_data_format()
        self.name = name
        self.epoch = 0
        self._cache = {} if cache else None
        if drop_last and len(self.paths) < self.batch_size:
            raise ValueError(
                f"{name or 'domain'}: {len(self.paths)} samples < batch_size {self.batch_size} with "
                "drop_last=True: no batch at all. Use a smaller batch size.")
        if check_files:
            missing = [p for p in self.paths if not os.path.isfile(p)]
            if missing:
                more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
                raise MissingDataError(
                    f"{len(missing)} image(s) listed in the {name or ''} split are missing under "
                    f"{root}: " + ", ".join(missing[:5]) + more + ". " + _IMAGE_FIX)

    def __len__(self):
        n = len(self.paths) / self.batch_size
        return int(math.floor(n) if self.drop_last else math.ceil(n))

    @property
    def num_samples(self):
        return len(self.paths)

    def order(self, epoch):
        """Sample order of pass number ``epoch`` (identity without shuffle)."""
        if not self.shuffle:
            return np.arange(len(self.paths))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.paths))

    def _load(self, i):
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        img = decode_image(self.paths[i], self.image_size)
        if self._cache is not None:
            self._cache[i] = img
        return img

    def batch(self, index, epoch=0):
        """Batch ``index`` of pass ``epoch``."""
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range [0, {len(self)})")
        idx = self.order(epoch)[index * self.batch_size:(index + 1) * self.batch_size]
        images = np.stack([self._load(int(i)) for i in idx])
        if self.random_flip:
            flip = np.random.default_rng([self.seed, epoch, index, 1]).random(len(idx)) < 0.5
            images[flip] = images[flip, :, ::-1]
        x = normalize(images)
        if self.data_format == "channels_first":
            x = np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))
        return x, self.labels[idx]

    def __getitem__(self, index):
        return self.batch(index, self.epoch)

    def on_epoch_end(self):
        self.epoch += 1


class ZippedDomains(keras.utils.PyDataset):
    """Zips per-domain ``DomainImages`` into dict batches ``({domain: x}, {domain: y})`` for
    ``MultiTaskModel(per_task_inputs=True).fit``.

    ``len`` = the largest domain's number of batches (or ``steps_per_epoch``). Global step
    ``k = epoch * len + i`` reads batch ``k mod n_t`` of pass ``k // n_t`` of domain t (n_t its
    number of batches): shorter domains cycle through fresh shuffled passes, continuing across
    epochs, as LibMTL's multi-input trainer does.
    """

    def __init__(self, datasets, steps_per_epoch=None, **kwargs):
        super().__init__(**kwargs)
        if not datasets:
            raise ValueError("zip_domains needs at least one domain")
        self.datasets = dict(datasets)
        for t, d in self.datasets.items():
            if len(d) == 0:
                raise ValueError(f"domain {t!r} yields no batch")
        self.steps = int(steps_per_epoch or max(len(d) for d in self.datasets.values()))
        self.epoch = 0

    def __len__(self):
        return self.steps

    def position(self, task, index, epoch=None):
        """(pass, batch) of domain ``task`` read at step ``index`` of ``epoch``."""
        epoch = self.epoch if epoch is None else epoch
        k = epoch * self.steps + index
        n = len(self.datasets[task])
        return k // n, k % n

    def __getitem__(self, index):
        if not 0 <= index < self.steps:
            raise IndexError(index)
        xs, ys = {}, {}
        for t, d in self.datasets.items():
            p, b = self.position(t, index)
            xs[t], ys[t] = d.batch(b, p)
        return xs, ys

    def on_epoch_end(self):
        self.epoch += 1


def zip_domains(datasets, steps_per_epoch=None, **kwargs):
    """``{domain: DomainImages}`` -> a ZippedDomains PyDataset of dict batches (see its doc)."""
    return ZippedDomains(datasets, steps_per_epoch=steps_per_epoch, **kwargs)


def _to_numpy(v):
    if isinstance(v, np.ndarray):
        return v
    if hasattr(v, "detach"):  # torch tensor
        v = v.detach().cpu()
    return np.asarray(v)


def cycle_zip(loaders, steps_per_epoch=None):
    """Zips any per-task iterables (tf.data.Dataset, torch DataLoader, PyDataset, list of
    ``(x, y)`` batches) into an endless generator of ``({task: x}, {task: y})`` numpy batches.

    A loader that runs out is re-iterated (``iter(loader)`` again, which reshuffles a shuffling
    DataLoader / tf.data dataset), like LibMTL. Returns ``(generator, steps_per_epoch)``; pass both
    to ``fit(generator, steps_per_epoch=steps)``. ``steps_per_epoch`` defaults to the largest
    ``len(loader)``; it is required when no loader has a length.
    """
    loaders = dict(loaders)
    if steps_per_epoch is None:
        lengths = []
        for t, l in loaders.items():
            try:
                lengths.append(len(l))
            except TypeError:
                pass
        if not lengths:
            raise ValueError("cycle_zip: no loader has a len(); pass steps_per_epoch")
        steps_per_epoch = max(lengths)

    def _next(its, t):
        try:
            return next(its[t])
        except StopIteration:
            its[t] = iter(loaders[t])
            try:
                return next(its[t])
            except StopIteration:
                raise ValueError(f"loader for task {t!r} yields no batch") from None

    def generator():
        its = {t: iter(l) for t, l in loaders.items()}
        while True:
            xs, ys = {}, {}
            for t in loaders:
                x, y = _next(its, t)[:2]
                xs[t], ys[t] = _to_numpy(x), _to_numpy(y)
            yield xs, ys

    return generator(), int(steps_per_epoch)


# ----------------------------------------------------------------------------------------------
# the benchmark
# ----------------------------------------------------------------------------------------------
def _subsample(entries, max_samples, seed):
    if max_samples is None or len(entries) <= max_samples:
        return entries
    keep = np.sort(np.random.default_rng(seed).permutation(len(entries))[:max_samples])
    return [entries[i] for i in keep]


def load_office(data_root, dataset="office31", split="train", domains=None, batch_size=64,
                image_size=224, max_samples=None, split_dir=None, seed=0, random_flip=False,
                cache=False, data_format=None, **kwargs):
    """``{domain: DomainImages}`` for one split. Training (``split="train"`` or ``"trval"``,
    train+val like LibMTL's ``trval``) shuffles and drops the last incomplete batch; val/test
    keep the file order and every sample. ``max_samples`` keeps a seeded random subset of at
    most that many samples per domain. Keyword ``workers``/``use_multiprocessing`` go to PyDataset.
    """
    spec = dataset_spec(dataset)
    domains = tuple(domains or spec["domains"])
    unknown = set(domains) - set(spec["domains"])
    if unknown:
        raise ValueError(f"Unknown domain(s) {sorted(unknown)} for {dataset}; "
                         f"expected some of {spec['domains']}")
    parts = ("train", "val") if split == "trval" else (split,)
    if any(p not in SPLITS for p in parts):
        raise ValueError(f"split must be one of {SPLITS + ('trval',)}, got {split!r}")
    training = split in ("train", "trval")
    out = {}
    for k, domain in enumerate(domains):
        entries = []
        for p in parts:
            split_file = find_split_file(data_root, dataset, domain, p, split_dir)
            part = read_split_file(split_file)
            bad = [(path, lab) for path, lab in part if not 0 <= lab < spec["num_classes"]]
            if bad:
                raise DataError(f"{split_file}: label {bad[0][1]} (of {bad[0][0]}) outside "
                                f"[0, {spec['num_classes']}) for {dataset}. Is it the split file of another "
                                "dataset? Fix the labels or pass the right --dataset / --split-dir.")
            entries += part
        entries = _subsample(entries, max_samples, seed + 1000 * k)
        out[domain] = DomainImages(
            data_root, entries, batch_size=batch_size, image_size=image_size, shuffle=training,
            drop_last=training and len(entries) >= batch_size, random_flip=random_flip and training,
            seed=seed + k, cache=cache, data_format=data_format, name=f"{domain}/{split}", **kwargs)
    return out


def write_synthetic(root, dataset="office31", per_class=5, image_size=48, num_classes=None,
                    domains=None, seed=0):
    """Writes a small synthetic dataset in the benchmark's layout, with split files: JPEGs whose
    colour depends on the class (learnable), ``per_class`` images per class and domain, split
    60/20/20 per class by ``make_splits``. For demos and smoke runs; returns ``root``."""
    from PIL import Image

    spec = dataset_spec(dataset)
    num_classes = num_classes or spec["num_classes"]
    rng = np.random.default_rng(seed)
    office31 = spec is DATASETS["office31"]
    for k, domain in enumerate(domains or spec["domains"]):
        for c in range(num_classes):
            folder = os.path.join(root, domain, "images", f"class_{c:02d}") if office31 \
                else os.path.join(root, domain, f"Class_{c:02d}")
            os.makedirs(folder, exist_ok=True)
            colour = np.array([(37 * c) % 256, (91 * c + 40 * k) % 256, (151 * c) % 256], float)
            for i in range(per_class):
                noise = rng.normal(0, 20, (image_size, image_size, 3))
                img = np.clip(colour + noise, 0, 255).astype(np.uint8)
                Image.fromarray(img).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
    make_splits(root, dataset, seed=seed, domains=domains)
    return root
