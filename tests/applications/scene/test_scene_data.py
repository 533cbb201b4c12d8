"""NYUv2 / Cityscapes loaders on samples written in the reference's on-disk format."""

import os

import numpy as np
import pytest

from applications.scene.data import SceneDataset, make_tf_dataset

H, W = 24, 32
SCALES = (1.0, 1.2, 1.5)
NYU_TASKS = {"segmentation": 13, "depth": 1, "normal": 3}


def label_of(r, c):
    """Label at source pixel (r, c): -1 on a diagonal pattern, else a class in [0, 13)."""
    return np.where((r + c) % 7 == 0, -1, (3 * r + c) % 13)


def depth_of(r, c):
    return 1.0 + r + 100.0 * c


def write_positional(root, split, count, height=H, width=W, normals=True, label_channel=False):
    """Samples whose image encodes the pixel position (channel 0 = row, 1 = column) and whose targets are
    functions of that position, in root/<split>/{image,label,depth,normal}/<i>.npy."""
    r, c = np.meshgrid(np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32), indexing="ij")
    for folder in ("image", "label", "depth") + (("normal",) if normals else ()):
        os.makedirs(os.path.join(root, split, folder), exist_ok=True)
    for i in range(count):
        image = np.stack([r, c, np.full_like(r, 0.5 + i)], axis=-1)
        label = label_of(r, c).astype(np.float32)
        np.save(os.path.join(root, split, "image", f"{i}.npy"), image)
        np.save(os.path.join(root, split, "label", f"{i}.npy"), label[..., None] if label_channel else label)
        np.save(os.path.join(root, split, "depth", f"{i}.npy"), depth_of(r, c)[..., None].astype(np.float32))
        if normals:
            normal = np.stack([0.01 * c + 0.1, 0.02 * r - 0.3, np.ones_like(r)], axis=-1)
            np.save(os.path.join(root, split, "normal", f"{i}.npy"), normal.astype(np.float32))
    return root


@pytest.fixture()
def nyu_root(tmp_path):
    root = str(tmp_path / "nyu")
    write_positional(root, "train", 4)
    write_positional(root, "val", 3)
    return root


def check_augmented(image, label, depth, normal):
    """Checks one augmented sample against the positional ground truth; returns (scale, flipped)."""
    rows, cols = image[..., 0], image[..., 1]
    # Bilinear resizing of a linear function is exact: the image gives each output pixel's source position.
    assert np.allclose(rows, rows[:, :1], atol=1e-4) and np.allclose(cols, cols[:1, :], atol=1e-4)
    crop_h = rows[-1, 0] - rows[0, 0] + 1
    flipped = cols[0, -1] < cols[0, 0]
    crop_w = abs(cols[0, -1] - cols[0, 0]) + 1
    scale = [s for s in SCALES if int(H / s) == round(crop_h)]
    assert len(scale) == 1 and int(W / scale[0]) == round(crop_w), (crop_h, crop_w)
    scale = scale[0]
    # Depth was sampled at one source pixel (nearest) and divided by the scale.
    undivided = depth[..., 0] * scale
    assert np.allclose(undivided, np.round(undivided), atol=1e-3)
    code = np.round(undivided - 1).astype(np.int64)
    src_r, src_c = code % 100, code // 100
    assert np.all(np.abs(src_r - rows) < 1) and np.all(np.abs(src_c - cols) < 1)
    # The label comes from that same source pixel.
    np.testing.assert_array_equal(label, label_of(src_r, src_c))
    # Normals: bilinear like the image, x component negated when flipped.
    sign = -1.0 if flipped else 1.0
    np.testing.assert_allclose(normal[..., 0], sign * (0.01 * cols + 0.1), atol=1e-5)
    np.testing.assert_allclose(normal[..., 1], 0.02 * rows - 0.3, atol=1e-5)
    np.testing.assert_allclose(normal[..., 2], 1.0, atol=1e-6)
    return scale, flipped


def test_batches_match_files(nyu_root):
    data = SceneDataset(nyu_root, "test", tasks=NYU_TASKS, batch_size=2)
    assert len(data) == 2  # 3 test samples, last batch kept
    images, targets = data[1]
    assert images.shape == (1, H, W, 3) and images.dtype == np.float32
    assert set(targets) == set(NYU_TASKS)
    stored = {folder: np.load(os.path.join(nyu_root, "val", folder, "2.npy"))
              for folder in ("image", "label", "depth", "normal")}
    np.testing.assert_array_equal(images[0], stored["image"])
    assert targets["segmentation"].shape == (1, H, W) and targets["segmentation"].dtype == np.int32
    np.testing.assert_array_equal(targets["segmentation"][0], stored["label"].astype(np.int32))
    assert (targets["segmentation"] == -1).sum() == (stored["label"] == -1).sum() > 0
    np.testing.assert_array_equal(targets["depth"][0], stored["depth"])
    np.testing.assert_array_equal(targets["normal"][0], stored["normal"])


def test_train_split_shuffles_reproducibly_and_drops_last(nyu_root):
    first = SceneDataset(nyu_root, "train", tasks=NYU_TASKS, batch_size=3, seed=7)
    again = SceneDataset(nyu_root, "train", tasks=NYU_TASKS, batch_size=3, seed=7)
    assert len(first) == 1  # 4 samples, batch 3, incomplete batch dropped (as the reference)
    seen = [first[0][0][:, 0, 0, 2]]
    np.testing.assert_array_equal(seen[0], again[0][0][:, 0, 0, 2])
    for _ in range(5):
        first.on_epoch_end()
        seen.append(first[0][0][:, 0, 0, 2])
    assert all(set(s) <= {0.5, 1.5, 2.5, 3.5} and len(set(s)) == 3 for s in seen)
    assert len({tuple(s) for s in seen}) > 1


def test_augmentation_keeps_image_and_targets_aligned(nyu_root):
    data = SceneDataset(nyu_root, "train", tasks=NYU_TASKS, batch_size=4, augment=True, seed=0)
    outcomes = set()
    for epoch in range(12):
        images, targets = data[0]
        for k in range(len(images)):
            outcomes.add(check_augmented(images[k], targets["segmentation"][k], targets["depth"][k],
                                         targets["normal"][k]))
        data.on_epoch_end()
    # every scale, with and without the flip, was exercised
    assert outcomes == {(s, f) for s in SCALES for f in (False, True)}


def test_resize_and_max_samples(nyu_root):
    data = SceneDataset(nyu_root, "test", tasks=NYU_TASKS, batch_size=8, image_size=(12, 16), max_samples=2)
    images, targets = data[0]
    assert images.shape == (2, 12, 16, 3) and targets["normal"].shape == (2, 12, 16, 3)
    # nearest-neighbour labels: only values present in the stored labels, ignore label included
    assert set(np.unique(targets["segmentation"])) <= set(np.unique(label_of(*np.indices((H, W)))))
    assert (targets["segmentation"] == -1).any()


def test_cityscapes_layout_without_normals(tmp_path):
    root = str(tmp_path / "city")
    write_positional(root, "train", 2, normals=False, label_channel=True)
    data = SceneDataset(root, "train", tasks={"segmentation": 13, "depth": 1}, batch_size=2, augment=True, seed=3)
    images, targets = data[0]
    assert set(targets) == {"segmentation", "depth"} and targets["segmentation"].shape == (2, H, W)


def test_tf_data_pipeline_matches_pydataset(nyu_root):
    pytest.importorskip("tensorflow")
    tf_batches = list(make_tf_dataset(nyu_root, "test", tasks=NYU_TASKS, batch_size=2).as_numpy_iterator())
    py = SceneDataset(nyu_root, "test", tasks=NYU_TASKS, batch_size=2)
    assert len(tf_batches) == len(py)
    for (tf_images, tf_targets), i in zip(tf_batches, range(len(py))):
        images, targets = py[i]
        np.testing.assert_array_equal(tf_images, images)
        for task in NYU_TASKS:
            np.testing.assert_array_equal(tf_targets[task], targets[task])
    images, targets = next(make_tf_dataset(nyu_root, "train", tasks=NYU_TASKS, batch_size=4, augment=True,
                                           seed=1).as_numpy_iterator())
    for k in range(4):
        check_augmented(images[k], targets["segmentation"][k], targets["depth"][k], targets["normal"][k])


def test_missing_file_is_named(nyu_root):
    missing = os.path.join(nyu_root, "train", "normal", "2.npy")
    os.remove(missing)
    with pytest.raises(FileNotFoundError, match=missing):
        SceneDataset(nyu_root, "train", tasks=NYU_TASKS, batch_size=2)
    # without the normal task the split is complete
    SceneDataset(nyu_root, "train", tasks={"segmentation": 13, "depth": 1}, batch_size=2)


def test_truncated_file_is_named(nyu_root):
    path = os.path.join(nyu_root, "val", "depth", "1.npy")
    with open(path, "rb") as handle:
        content = handle.read()
    with open(path, "wb") as handle:
        handle.write(content[: len(content) // 2])
    data = SceneDataset(nyu_root, "test", tasks=NYU_TASKS, batch_size=1)
    data[0]
    with pytest.raises(ValueError, match=path):
        data[1]


def test_wrong_shape_is_named(nyu_root):
    path = os.path.join(nyu_root, "val", "normal", "0.npy")
    np.save(path, np.zeros((H, W, 2), np.float32))
    with pytest.raises(ValueError, match=path + r" has shape \(24, 32, 2\); expected \(24, 32, 3\)"):
        SceneDataset(nyu_root, "test", tasks=NYU_TASKS, batch_size=1)[0]


def test_label_outside_classes_is_named(nyu_root):
    path = os.path.join(nyu_root, "val", "label", "0.npy")
    label = np.load(path)
    label[0, 0] = 255  # an ignore value other than -1
    np.save(path, label)
    with pytest.raises(ValueError, match=path):
        SceneDataset(nyu_root, "test", tasks=NYU_TASKS, batch_size=1)[0]


# ------------------------------------------------------------------ bad files: DataError naming the file and the fix

def _truncate(path, keep):
    with open(path, "rb") as handle:
        content = handle.read()
    with open(path, "wb") as handle:
        handle.write(content[:keep(len(content))])


CORRUPTIONS = {
    # name -> (folder, how to damage root/val/<folder>/1.npy, expected message fragment)
    "deleted": ("depth", os.remove, "Missing file"),
    "truncated_data": ("normal", lambda p: _truncate(p, lambda n: n - 100), "truncated or not a .npy file"),
    "truncated_header": ("label", lambda p: _truncate(p, lambda n: 40), "truncated or not a .npy file"),
    "empty": ("image", lambda p: _truncate(p, lambda n: 0), "truncated or not a .npy file"),
    "not_npy": ("depth", lambda p: open(p, "w").write("not an array"), "truncated or not a .npy file"),
    "pickled": ("depth", lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True),
                "truncated or not a .npy file"),
    "wrong_channels": ("normal", lambda p: np.save(p, np.zeros((H, W, 1), np.float32)), "has shape (24, 32, 1)"),
    "transposed": ("depth", lambda p: np.save(p, np.ones((W, H, 1), np.float32)), "has shape (32, 24, 1)"),
    "image_size": ("image", lambda p: np.save(p, np.zeros((H + 1, W, 3), np.float32)), "the size of its image"),
    "nan": ("depth", lambda p: np.save(p, np.full((H, W, 1), np.nan, np.float32)), "NaN or infinite"),
    "strings": ("label", lambda p: np.save(p, np.full((H, W), "a")), "expected real numbers"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_bad_file_raises_data_error_naming_the_file_and_the_fix(nyu_root, kind):
    from applications.common import DataError, MissingDataError

    folder, damage, fragment = CORRUPTIONS[kind]
    path = os.path.join(nyu_root, "val", folder, "1.npy")
    image = os.path.join(nyu_root, "val", "image", "1.npy")
    data = SceneDataset(nyu_root, "test", tasks=NYU_TASKS, batch_size=1)
    damage(path)  # after the dataset was made: the files are read (and checked) batch by batch
    assert data[0][0].shape == (1, H, W, 3)  # the other samples still load
    with pytest.raises(DataError) as error:
        data[1]
    message = str(error.value)
    assert path in message and fragment in message, message
    assert f"deleting {image}" in message, message  # the fix: re-extract, or drop the sample
    if kind == "deleted":
        assert isinstance(error.value, MissingDataError) and isinstance(error.value, FileNotFoundError)
        with pytest.raises(MissingDataError, match=path):  # and found up front by a new dataset
            SceneDataset(nyu_root, "test", tasks=NYU_TASKS, batch_size=1)
    assert isinstance(error.value, ValueError)


def test_bad_file_in_tf_data_pipeline_names_the_file(nyu_root):
    pytest.importorskip("tensorflow")
    path = os.path.join(nyu_root, "val", "depth", "2.npy")
    _truncate(path, lambda n: n // 2)
    dataset = make_tf_dataset(nyu_root, "test", tasks=NYU_TASKS, batch_size=1)
    with pytest.raises(Exception) as error:
        for _ in dataset:
            pass
    assert path in str(error.value) and "truncated" in str(error.value)


def test_truncated_label_in_tf_data_pipeline_raises_the_numpy_paths_data_error(nyu_root):
    """Iterating `make_tf_dataset` (a loop, `as_numpy_iterator`, Keras' JAX and torch loops) raises the loader's
    DataError, with the message `SceneDataset` gives for the same file, not TensorFlow's InvalidArgumentError."""
    pytest.importorskip("tensorflow")
    from applications.common import DataError

    path = os.path.join(nyu_root, "val", "label", "1.npy")
    _truncate(path, lambda n: n - 100)
    with pytest.raises(DataError) as numpy_path:
        SceneDataset(nyu_root, "test", tasks=NYU_TASKS, batch_size=1)[1]
    dataset = make_tf_dataset(nyu_root, "test", tasks=NYU_TASKS, batch_size=1)
    for iterate in (iter, lambda d: d.as_numpy_iterator()):
        with pytest.raises(DataError) as error:
            for _ in iterate(dataset):
                pass
        assert str(error.value) == str(numpy_path.value)
        assert path in str(error.value) and "truncated or not a .npy file" in str(error.value)


def test_missing_layout_names_the_folder(tmp_path):
    from applications.common import MissingDataError

    with pytest.raises(MissingDataError, match=r"train.image.*--data-root"):
        SceneDataset(str(tmp_path), "train", tasks=NYU_TASKS)
    os.makedirs(tmp_path / "train" / "image")
    with pytest.raises(MissingDataError, match=r"No <i>.npy files"):
        SceneDataset(str(tmp_path), "train", tasks=NYU_TASKS)
