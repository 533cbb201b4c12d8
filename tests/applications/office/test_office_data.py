"""Office loaders on small images written here (Pillow), in the benchmark's layout."""

import os

import numpy as np
import pytest
from PIL import Image

from applications.office import data

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def _colour(label):
    # well separated colours so a JPEG-decoded image still tells its label
    return np.array([(60 * label) % 256, 255 - (60 * label) % 256, 128], dtype=np.uint8)


def _write(root, rel, colour, size=(32, 32), fmt=None):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = np.broadcast_to(colour, (size[1], size[0], 3)).astype(np.uint8)
    Image.fromarray(img).save(path, format=fmt)
    return path


def _split(root, name, entries):
    with open(os.path.join(root, name), "w") as f:
        f.write("".join(f"{p} {lab}\n" for p, lab in entries))


@pytest.fixture
def office31(tmp_path):
    """Office-31 layout; labels deliberately not in folder order; some images in no split."""
    root = str(tmp_path)
    classes = {"zebra_cls": 0, "apple_cls": 1, "mid_cls": 2}
    for domain, n in (("amazon", 4), ("dslr", 2), ("webcam", 2)):
        splits = {"train": [], "val": [], "test": []}
        for cls, lab in classes.items():
            for i in range(n + 1):  # the (n+1)-th image is in no split file
                rel = f"{domain}/images/{cls}/frame_{i:04d}.jpg"
                _write(root, rel, _colour(lab))
                if i < n:
                    splits[("train", "train", "val", "test")[i % 4] if n == 4
                           else ("train", "val")[i % 2]].append((rel, lab))
        splits["test"] = splits["test"] or splits["val"]
        for s, entries in splits.items():
            _split(root, f"{domain}_{s}.txt", entries)
    return root


def test_split_files_are_honoured_and_labels_come_from_them(office31):
    sets = data.load_office(office31, "office31", "val", batch_size=2, image_size=32)
    assert set(sets) == {"amazon", "dslr", "webcam"}
    amazon = sets["amazon"]
    expected = data.read_split_file(os.path.join(office31, "amazon_val.txt"))
    assert [os.path.relpath(p, office31) for p in amazon.paths] == [p for p, _ in expected]
    assert amazon.labels.tolist() == [lab for _, lab in expected]
    # val keeps file order and every sample; images carry their label's colour
    xs, ys = zip(*(amazon[i] for i in range(len(amazon))))
    x, y = np.concatenate(xs), np.concatenate(ys)
    assert y.tolist() == [lab for _, lab in expected]
    rgb = (x * STD + MEAN) * 255.0
    for img, lab in zip(rgb, y):
        np.testing.assert_allclose(img.mean(axis=(0, 1)), _colour(lab), atol=4)
    # no image outside the split files is read
    assert not any("frame_0004" in p for p in amazon.paths)


def test_train_split_shuffles_keeps_pairs_and_drops_last(office31):
    sets = data.load_office(office31, "office31", "train", batch_size=4, image_size=32, seed=3)
    amazon = sets["amazon"]  # 6 training images -> one full batch of 4, the rest dropped
    assert amazon.num_samples == 6 and len(amazon) == 1
    seen = []
    for epoch in range(4):
        x, y = amazon.batch(0, epoch)
        assert x.shape == (4, 32, 32, 3) and x.dtype == np.float32 and y.dtype == np.int32
        rgb = (x * STD + MEAN) * 255.0
        for img, lab in zip(rgb, y):
            np.testing.assert_allclose(img.mean(axis=(0, 1)), _colour(lab), atol=4)
        seen.append(tuple(amazon.order(epoch)[:4]))
    assert len(set(seen)) > 1  # a new order every pass
    trval = data.load_office(office31, "office31", "trval", batch_size=4, image_size=32)
    assert trval["amazon"].num_samples == 9


def test_normalisation_matches_numpy_on_decoded_image(tmp_path):
    root = str(tmp_path)
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(os.path.join(root, "a.jpg"), quality=95)
    _write(root, "b.png", np.array([200, 10, 90], np.uint8), size=(50, 30))  # resized to 24x24
    ds = data.DomainImages(root, [("a.jpg", 1), ("b.png", 2)], batch_size=2, image_size=24)
    x, y = ds[0]
    decoded = np.asarray(Image.open(os.path.join(root, "a.jpg")).convert("RGB"), np.float64)
    np.testing.assert_allclose(x[0], (decoded / 255.0 - MEAN) / STD, atol=1e-5)
    # a uniform image stays uniform under resizing: every pixel is the normalised colour
    expected = (np.array([200, 10, 90]) / 255.0 - MEAN) / STD
    np.testing.assert_allclose(x[1], np.broadcast_to(expected, (24, 24, 3)), atol=1e-5)
    assert y.tolist() == [1, 2]
    xc, _ = data.DomainImages(root, [("a.jpg", 1)], batch_size=1, image_size=24,
                              data_format="channels_first")[0]
    np.testing.assert_allclose(xc[0], np.transpose(x[0], (2, 0, 1)))


def test_missing_and_corrupt_images_are_named(tmp_path):
    root = str(tmp_path)
    _write(root, "dslr/images/c/ok.jpg", _colour(0))
    with pytest.raises(FileNotFoundError, match="gone.jpg"):
        data.DomainImages(root, [("dslr/images/c/ok.jpg", 0), ("dslr/images/c/gone.jpg", 0)])
    with open(os.path.join(root, "dslr/images/c/bad.jpg"), "wb") as f:
        f.write(b"this is not a jpeg")
    ds = data.DomainImages(root, [("dslr/images/c/ok.jpg", 0), ("dslr/images/c/bad.jpg", 0)],
                           batch_size=2, image_size=8)
    with pytest.raises(ValueError, match="bad.jpg"):
        ds[0]


def test_bad_split_files(tmp_path):
    root = str(tmp_path)
    _split(root, "amazon_train.txt", [("amazon/images/c/x.jpg", 0)])
    with open(os.path.join(root, "amazon_val.txt"), "w") as f:
        f.write("amazon/images/c/x.jpg 0\namazon/images/c/y.jpg\n")
    with pytest.raises(ValueError, match="amazon_val.txt:2"):
        data.read_split_file(os.path.join(root, "amazon_val.txt"))
    with pytest.raises(FileNotFoundError, match="dslr_train.txt"):
        data.find_split_file(root, "office31", "dslr", "train")
    # LibMTL's folder layout is found too
    libmtl = os.path.join(root, "data_txt", "office-31")
    os.makedirs(libmtl)
    _split(libmtl, "dslr_train.txt", [("dslr/images/c/x.jpg", 0)])
    assert data.find_split_file(root, "office-31", "dslr", "train") == \
        os.path.join(libmtl, "dslr_train.txt")
    _split(root, "webcam_test.txt", [("webcam/images/c/x.jpg", 31)])
    with pytest.raises(ValueError, match="label 31"):
        data.load_office(root, "office31", "test", domains=["webcam"], check_files=False)


def _labelled(n, offset):
    """A domain whose sample i has label offset + i (so a batch tells which samples it holds)."""
    return data.DomainImages("/nonexistent", [(f"{i}.jpg", offset + i) for i in range(n)],
                             batch_size=2, shuffle=True, drop_last=True, check_files=False)


def test_zip_domains_cycles_shorter_domains_across_epochs(monkeypatch):
    monkeypatch.setattr(data.DomainImages, "_load",
                        lambda self, i: np.zeros((2, 2, 3), np.uint8))
    long_, short = _labelled(6, 0), _labelled(4, 100)  # 3 and 2 batches
    z = data.zip_domains({"long": long_, "short": short})
    assert len(z) == 3
    steps = []
    for epoch in range(2):
        for i in range(len(z)):
            x, y = z[i]
            assert set(x) == {"long", "short"} and x["long"].shape == (2, 2, 2, 3)
            steps.append((y["long"].tolist(), y["short"].tolist()))
        z.on_epoch_end()
    # the longest domain: every sample exactly once per epoch
    for epoch in range(2):
        got = sorted(sum((s[0] for s in steps[3 * epoch:3 * epoch + 3]), []))
        assert got == list(range(6))
    # the shorter domain: consecutive passes of 2 steps, continuing over the epoch boundary
    for p in range(3):
        got = sorted(sum((s[1] for s in steps[2 * p:2 * p + 2]), []))
        assert got == list(range(100, 104))
    assert z.position("short", 0, epoch=1) == (1, 1)


def test_cycle_zip_restarts_exhausted_loaders():
    a = [(np.full((1, 2), i), np.array([i])) for i in range(3)]
    b = [(np.full((1, 2), 10 + i), np.array([10 + i])) for i in range(2)]
    gen, steps = data.cycle_zip({"a": a, "b": b})
    assert steps == 3
    ys = [next(gen)[1] for _ in range(6)]
    assert [int(y["a"][0]) for y in ys] == [0, 1, 2, 0, 1, 2]
    assert [int(y["b"][0]) for y in ys] == [10, 11, 10, 11, 10, 11]
    with pytest.raises(ValueError, match="steps_per_epoch"):
        data.cycle_zip({"a": iter(a)})


def test_make_splits_60_20_20(tmp_path):
    root = str(tmp_path)
    for c in ("b", "a"):
        for i in range(10):
            _write(root, f"Art/{c}/{i:05d}.jpg", _colour(0), size=(4, 4))
    data.make_splits(root, "officehome", domains=["Art"], seed=1)
    parts = {s: data.read_split_file(os.path.join(root, f"Art_{s}.txt")) for s in data.SPLITS}
    assert [len(parts[s]) for s in data.SPLITS] == [12, 4, 4]
    paths = [p for s in data.SPLITS for p, _ in parts[s]]
    assert len(set(paths)) == 20
    assert all((lab == 0) == p.startswith("Art/a/") for s in data.SPLITS for p, lab in parts[s])


def test_random_flip_mirrors_whole_images(tmp_path):
    root = str(tmp_path)
    img = np.zeros((8, 8, 3), np.uint8)
    img[:, :4] = 255  # white left half, black right half
    Image.fromarray(img).save(os.path.join(root, "half.png"))
    ds = data.DomainImages(root, [("half.png", 0)] * 4, batch_size=4, image_size=8, shuffle=True,
                           random_flip=True, seed=0)
    plain = data.normalize(img[None])[0]
    seen = set()
    for epoch in range(6):
        for x in ds.batch(0, epoch)[0]:
            if np.allclose(x, plain, atol=1e-5):
                seen.add("plain")
            else:
                np.testing.assert_allclose(x, plain[:, ::-1], atol=1e-5)
                seen.add("flipped")
    assert seen == {"plain", "flipped"}


def _damage_truncate(path):
    with open(path, "rb") as f:
        blob = f.read()
    with open(path, "wb") as f:
        f.write(blob[: len(blob) // 2])


IMAGE_DAMAGE = {
    "truncated_jpeg": (_damage_truncate, "truncated or not an image"),
    "empty": (lambda p: open(p, "wb").close(), "truncated or not an image"),
    "text": (lambda p: open(p, "w").write("not an image"), "truncated or not an image"),
    "deleted": (os.remove, "Image not found"),
}


@pytest.mark.parametrize("kind", sorted(IMAGE_DAMAGE))
def test_damaged_image_raises_data_error_naming_the_file_and_the_fix(tmp_path, kind):
    from applications.common import DataError, MissingDataError

    root = str(tmp_path)
    rng = np.random.default_rng(0)
    rels = [f"dslr/images/c/{i}.jpg" for i in range(3)]
    for rel in rels:  # noisy images: a JPEG of some size, so that half of it is a truncated image
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, quality=90)
    ds = data.DomainImages(root, [(rel, 0) for rel in rels], batch_size=1, image_size=16)
    damage, fragment = IMAGE_DAMAGE[kind]
    path = os.path.join(root, rels[1])
    damage(path)
    assert ds[0][0].shape == (1, 16, 16, 3) and ds[2][0].shape == (1, 16, 16, 3)
    with pytest.raises(DataError) as error:
        ds[1]
    message = str(error.value)
    assert path in message and fragment in message and "remove its line from the split file" in message, message
    assert isinstance(error.value, ValueError)
    if kind == "deleted":
        assert isinstance(error.value, (MissingDataError, FileNotFoundError))
        # a new dataset finds it up front (check_files=True), naming it
        with pytest.raises(MissingDataError, match=rels[1]):
            data.DomainImages(root, [(rel, 0) for rel in rels], batch_size=1, image_size=16)


def test_bad_split_file_label_names_the_split_file(office31):
    from applications.common import DataError

    path = os.path.join(office31, "dslr_val.txt")
    with open(path, "a") as f:
        f.write("dslr/images/apple_cls/frame_0000.jpg 40\n")
    with pytest.raises(DataError, match="dslr_val.txt: label 40"):
        data.load_office(office31, "office31", "val", domains=["dslr"])
    with open(path, "a") as f:
        f.write("dslr/images/apple_cls/frame_0001.jpg\n")  # a truncated line
    with pytest.raises(DataError, match=r"dslr_val.txt:\d+: expected '<path> <label>'.*delete that line"):
        data.load_office(office31, "office31", "val", domains=["dslr"])
