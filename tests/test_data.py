"""Tests of alexnet_keras.data on tiny datasets built in tmp_path: no network, no shared 60k copy."""

from __future__ import annotations

import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from alexnet_keras import data as data_module
from alexnet_keras.config import DataConfig
from alexnet_keras.data import Data, DataError, load_data, random_crop_flip, resolve_data_dir

CLASSES = ["cat", "ant", "bee"]          # created unsorted on purpose
SORTED = sorted(CLASSES)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    # Caches go to this test's tmp_path, and a data dir set in the shell cannot leak in.
    monkeypatch.setenv(data_module.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(data_module.DATA_DIR_ENV, raising=False)


def collect(ds: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for x, y in ds:
        xs.append(x.numpy())
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys)


def colour_of(label: int) -> tuple[int, int, int]:
    rgb = [40, 40, 40]
    rgb[label] = 220
    return tuple(rgb)


def make_layout(root: Path, n_train: int = 8, n_test: int = 3, junk: bool = True) -> Path:
    """train/ + test/ with 3 classes of small images in assorted sizes, modes and formats."""
    sizes = [(20, 37), (37, 20), (16, 16), (50, 31), (24, 24), (9, 13), (40, 40), (33, 17)]
    for split, n in (("train", n_train), ("test", n_test)):
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            colour = colour_of(SORTED.index(name))
            for i in range(n):
                size = sizes[i % len(sizes)]
                kind = i % 6
                if kind == 0:
                    Image.new("RGB", size, colour).save(folder / f"{i}.png")
                elif kind == 1:
                    Image.new("RGB", size, colour).save(folder / f"{i}.jpg", quality=95)
                elif kind == 2:
                    Image.new("L", size, 128).save(folder / f"{i}.png")               # grayscale
                elif kind == 3:
                    Image.new("RGBA", size, colour + (90,)).save(folder / f"{i}.png")  # alpha
                elif kind == 4:
                    Image.new("RGB", size, colour).save(folder / f"{i}.gif")
                else:
                    Image.new("RGB", size, colour).save(folder / f"{i}.bmp")
    if junk:
        bad = root / "train" / "ant"
        (bad / "corrupt.jpg").write_bytes(np.random.default_rng(0).bytes(300))
        (bad / "empty.png").write_bytes(b"")
        (bad / "notes.txt").write_text("not an image")
        (bad / ".DS_Store").write_bytes(b"\x00\x01hidden")      # hidden: ignored, not counted
    return root


def make_flat(root: Path, per_class: int = 10, size: int = 8) -> Path:
    """<class>/* with solid-colour images whose (R, G) pair identifies each image uniquely."""
    for c, name in enumerate(SORTED):
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            Image.new("RGB", (size, size), (20 + 80 * c, 5 + 4 * k, 128)).save(root / name / f"{k}.png")
    return root


def image_ids(x: np.ndarray) -> list[tuple[int, int]]:
    return [(int(r), int(g)) for r, g in np.rint(x[:, 0, 0, :2]).astype(int)]


def synthetic(**kw) -> DataConfig:
    kw.setdefault("synthetic_samples", 64)
    kw.setdefault("synthetic_classes", 4)
    kw.setdefault("augment", False)
    return DataConfig(dataset="synthetic", **kw)


# --------------------------------------------------------------------------------------------
# synthetic
# --------------------------------------------------------------------------------------------

def test_synthetic_shapes_counts_and_determinism():
    cfg = synthetic()
    data = load_data(cfg, image_size=16, batch_size=10, verbose=False)
    assert isinstance(data, Data)
    assert data.counts == {"train": 57, "val": 7, "test": 16, "skipped": 0}
    assert data.class_names == ["class_0", "class_1", "class_2", "class_3"]
    assert data.num_classes == 4 and data.image_size == 16 and data.source == "synthetic"
    assert data.steps_per_epoch == 6
    assert len(data.digest) == 16
    assert len(list(data.train)) == 6 and len(list(data.val)) == 1 and len(list(data.test)) == 2

    x, y = collect(data.train)
    assert x.shape == (57, 16, 16, 3) and x.dtype == np.float32 and y.dtype == np.int32
    assert x.min() >= 0 and x.max() <= 255 and np.all(x == np.rint(x))
    assert set(y) == {0, 1, 2, 3}
    xt, yt = collect(data.test)
    assert xt.shape == (16, 16, 16, 3)
    np.testing.assert_array_equal(yt, data.test_labels)

    again = load_data(cfg, image_size=16, batch_size=10, verbose=False)
    assert again.digest == data.digest
    np.testing.assert_array_equal(collect(again.test)[0], xt)
    np.testing.assert_array_equal(collect(again.val)[0], collect(data.val)[0])
    assert load_data(synthetic(split_seed=1), 16, 10, verbose=False).digest != data.digest
    assert load_data(cfg, 20, 10, verbose=False).digest != data.digest


def test_synthetic_is_learnable():
    # Nearest class mean on raw pixels already separates the classes: a CNN will, quickly.
    data = load_data(synthetic(synthetic_samples=256), 16, 64, verbose=False)
    x, y = collect(data.train)
    xt, yt = collect(data.test)
    means = np.stack([x[y == c].mean(axis=0).ravel() for c in range(4)])
    pred = np.argmin(((xt.reshape(len(xt), -1)[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == yt).mean() > 0.9


def test_mean_std_match_numpy_over_train_split():
    data = load_data(synthetic(), 16, 16, verbose=False)
    x = collect(data.train)[0].astype(np.float64)
    np.testing.assert_allclose(data.mean, x.mean(axis=(0, 1, 2)), rtol=1e-9)
    np.testing.assert_allclose(data.std, x.std(axis=(0, 1, 2)), rtol=1e-9)


def test_val_split_is_stratified_and_train_limit_too():
    data = load_data(synthetic(synthetic_samples=200, val_fraction=0.2, train_limit=40), 8, 32,
                     verbose=False)
    assert data.counts["val"] == 40 and data.counts["train"] == 40
    _, yv = collect(data.val)
    _, yt = collect(data.train)
    assert np.bincount(yv).tolist() == [10] * 4
    assert np.bincount(yt).tolist() == [10] * 4


# --------------------------------------------------------------------------------------------
# image folders
# --------------------------------------------------------------------------------------------

@pytest.fixture
def layout(tmp_path):
    return make_layout(tmp_path / "layout")


def test_folder_layout_loads_and_skips_bad_files(layout):
    cfg = DataConfig(dataset="folder", data_dir=str(layout), augment=False)
    with pytest.warns(UserWarning, match=r"skipped 3 file\(s\)") as record:
        data = load_data(cfg, image_size=24, batch_size=5, verbose=False)
    message = str(record[0].message)
    assert "corrupt.jpg" in message and "empty.png" in message and "notes.txt" in message
    assert ".DS_Store" not in message
    assert data.class_names == SORTED
    assert data.counts["skipped"] == 3
    assert data.counts["train"] + data.counts["val"] == 24 and data.counts["test"] == 9
    assert data.source == str(layout)

    for ds in (data.train, data.val, data.test):
        x, y = collect(ds)
        assert x.shape[1:] == (24, 24, 3) and x.min() >= 0 and x.max() <= 255
        # Labels follow the sorted class folders: colour images are dominated by their label's channel.
        coloured = np.ptp(x.mean(axis=(1, 2)), axis=1) > 60
        assert coloured.any()
        np.testing.assert_array_equal(x[coloured].mean(axis=(1, 2)).argmax(axis=1), y[coloured])
        # Grayscale images come out as three equal channels.
        grey = ~coloured
        np.testing.assert_allclose(x[grey][..., 0], x[grey][..., 2], atol=2)
    assert sorted(data.test_labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_decoded_folder_is_cached_on_disk(layout, monkeypatch):
    cfg = DataConfig(dataset="folder", data_dir=str(layout), augment=False)
    with pytest.warns(UserWarning):
        first = load_data(cfg, 24, 8, verbose=False)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(data_module, "_decode_files", no_decoding)
    with pytest.warns(UserWarning, match="skipped 3"):
        second = load_data(cfg, 24, 8, verbose=False)
    assert second.digest == first.digest and second.counts == first.counts
    np.testing.assert_array_equal(collect(second.test)[0], collect(first.test)[0])
    cached = list((Path(os.environ[data_module.CACHE_ENV]) / "decoded").iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".npz"     # no temp files left behind


def test_flat_folder_carves_stratified_test_and_val(tmp_path):
    root = make_flat(tmp_path / "flat")
    data = load_data(DataConfig(dataset="folder", data_dir=str(root), augment=False), 8, 4,
                     verbose=False)
    assert data.counts == {"train": 21, "val": 3, "test": 6, "skipped": 0}
    assert sorted(data.test_labels.tolist()) == [0, 0, 1, 1, 2, 2]
    _, yv = collect(data.val)
    assert sorted(yv.tolist()) == [0, 1, 2]


def test_splits_are_disjoint_seeded_and_cover_everything(tmp_path):
    root = make_flat(tmp_path / "flat", per_class=20)

    def split_ids(split_seed):
        cfg = DataConfig(dataset="folder", data_dir=str(root), augment=False, val_fraction=0.3,
                         split_seed=split_seed)
        data = load_data(cfg, 8, 16, verbose=False)
        return [set(image_ids(collect(ds)[0])) for ds in (data.train, data.val, data.test)]

    train, val, test = split_ids(0)
    assert not train & val and not train & test and not val & test
    assert len(train | val | test) == 60
    assert split_ids(0)[1] == val
    assert split_ids(1)[1] != val


def test_train_val_test_folder_uses_given_val(tmp_path):
    root = make_layout(tmp_path / "tvt", junk=False)
    for name in CLASSES:
        (root / "val" / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (10, 10), colour_of(SORTED.index(name))).save(root / "val" / name / f"{i}.png")
    data = load_data(DataConfig(dataset="folder", data_dir=str(root)), 16, 8, verbose=False)
    assert data.counts == {"train": 24, "val": 6, "test": 9, "skipped": 0}


# --------------------------------------------------------------------------------------------
# CIFAR-10 pickles and archives
# --------------------------------------------------------------------------------------------

def write_fake_cifar_pickles(folder: Path, per_batch: int = 6):
    """The official cifar-10-batches-py format, with 3 classes and a few images per batch."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    originals = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        images = rng.integers(0, 256, size=(per_batch, 32, 32, 3), dtype=np.uint8)
        labels = [i % 3 for i in range(per_batch)]
        flat = images.transpose(0, 3, 1, 2).reshape(per_batch, 3072)   # R plane, G plane, B plane
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": flat, b"labels": labels, b"batch_label": name.encode()}, f)
        originals[name] = (images, np.asarray(labels))
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"plane", b"car", b"bird"], b"num_vis": 3072}, f)
    return originals


def test_cifar_pickles_load_in_official_layout(tmp_path):
    originals = write_fake_cifar_pickles(tmp_path / "parent" / "cifar-10-batches-py")
    x_test, y_test = originals["test_batch"]
    train_set = {img.tobytes() for name, (imgs, _) in originals.items() if name != "test_batch"
                 for img in imgs}
    for data_dir in (tmp_path / "parent", tmp_path / "parent" / "cifar-10-batches-py"):
        data = load_data(DataConfig(dataset="cifar10", data_dir=str(data_dir), augment=False), 32, 4,
                         verbose=False)
        assert data.class_names == ["plane", "car", "bird"]
        assert data.counts == {"train": 27, "val": 3, "test": 6, "skipped": 0}
        xt, yt = collect(data.test)
        np.testing.assert_array_equal(xt.astype(np.uint8), x_test)
        np.testing.assert_array_equal(yt, y_test)
        np.testing.assert_array_equal(data.test_labels, y_test)
        seen = {img.astype(np.uint8).tobytes() for ds in (data.train, data.val) for img in collect(ds)[0]}
        assert seen == train_set

    # Other sizes are made per batch from the 32-px arrays.
    big = load_data(DataConfig(dataset="cifar10", data_dir=str(tmp_path / "parent"), augment=True),
                    48, 4, verbose=False)
    x, _ = next(iter(big.train))
    assert x.shape == (4, 48, 48, 3) and x.dtype == tf.float32
    assert next(iter(big.test))[0].shape == (4, 48, 48, 3)


@pytest.fixture
def archive(tmp_path):
    src = tmp_path / "src"
    make_layout(src / "mydata", n_train=4, n_test=2, junk=False)
    path = tmp_path / "mydata.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src / "mydata", arcname="mydata")
    return path


def test_archive_is_extracted_once_into_cache_and_loaded(archive, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    root = resolve_data_dir(str(archive))
    assert root.parent.parent == cache / "datasets" and root.name == "mydata"
    assert root.parent.name.startswith("mydata-")
    assert (root / "train" / "ant").is_dir()
    assert [p.name for p in (cache / "datasets").iterdir()] == [root.parent.name]   # no temp dirs

    data = load_data(DataConfig(dataset="folder", data_dir=str(archive)), 16, 4, verbose=False)
    assert data.counts["train"] + data.counts["val"] == 12 and data.counts["test"] == 6

    def no_extraction(*args, **kwargs):
        raise AssertionError("extracted again")

    monkeypatch.setattr(data_module.tarfile, "open", no_extraction)
    assert resolve_data_dir(str(archive)) == root
    # The env var is the fallback for data_dir.
    monkeypatch.setenv(data_module.DATA_DIR_ENV, str(archive))
    assert resolve_data_dir(None) == root


def test_zip_archive_without_wrapper_folder(tmp_path):
    src = make_layout(tmp_path / "src", n_train=3, n_test=2, junk=False)
    path = tmp_path / "flat.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for file in src.rglob("*"):
            zf.write(file, file.relative_to(src))
    root = resolve_data_dir(str(path))
    assert (root / "train").is_dir() and (root / "test").is_dir()


def test_broken_archive_leaves_nothing_behind(tmp_path):
    path = tmp_path / "broken.tar.gz"
    path.write_bytes(b"\x1f\x8b" + np.random.default_rng(0).bytes(200))
    with pytest.raises(DataError, match="broken.tar.gz"):
        resolve_data_dir(str(path))
    assert not any((tmp_path / "cache" / "datasets").iterdir())


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------

def folder_cfg(path) -> DataConfig:
    return DataConfig(dataset="folder", data_dir=str(path))


def test_missing_dir(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="does not exist") as err:
        load_data(folder_cfg(missing), 16, 4)
    assert str(missing) in str(err.value) and "--data-dir" in str(err.value)


def test_empty_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders") as err:
        load_data(folder_cfg(tmp_path / "empty"), 16, 4)
    assert str(tmp_path / "empty") in str(err.value)


def test_one_class(tmp_path):
    (tmp_path / "one" / "cats").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "one" / "cats" / "a.png")
    with pytest.raises(DataError, match="only one class") as err:
        load_data(folder_cfg(tmp_path / "one"), 16, 4)
    assert str(tmp_path / "one") in str(err.value)


def test_only_non_image_files(tmp_path):
    for name in ("a", "b"):
        (tmp_path / "junk" / name).mkdir(parents=True)
        (tmp_path / "junk" / name / "readme.txt").write_text("hello")
    with pytest.raises(DataError, match="no readable images") as err:
        load_data(folder_cfg(tmp_path / "junk"), 16, 4, verbose=False)
    assert str(tmp_path / "junk") in str(err.value)


def test_test_classes_must_match_train(tmp_path):
    root = make_layout(tmp_path / "mismatch", n_train=2, n_test=1, junk=False)
    (root / "test" / "cat").rename(root / "test" / "dog")
    with pytest.raises(DataError, match="do not match") as err:
        load_data(folder_cfg(root), 16, 4, verbose=False)
    assert "dog" in str(err.value) and str(root / "test") in str(err.value)


def test_missing_env_data_dir_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(data_module.DATA_DIR_ENV, str(tmp_path / "gone"))
    with pytest.raises(DataError, match=data_module.DATA_DIR_ENV):
        load_data(DataConfig(dataset="cifar10"), 32, 4)


def test_cifar10_offline_says_how_to_point_at_data(monkeypatch):
    def offline():
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(keras.datasets.cifar10, "load_data", offline)
    with pytest.raises(DataError, match="could not be downloaded") as err:
        load_data(DataConfig(dataset="cifar10"), 32, 4)
    assert "--data-dir" in str(err.value) and data_module.DATA_DIR_ENV in str(err.value)


# --------------------------------------------------------------------------------------------
# augmentation and pipelines
# --------------------------------------------------------------------------------------------

def test_random_crop_flip_eager_and_in_tf_data():
    images = np.random.default_rng(0).integers(0, 256, size=(6, 16, 16, 3), dtype=np.uint8)
    seed = tf.constant([3, 4], tf.int64)
    eager = random_crop_flip(images, seed).numpy()
    assert eager.shape == images.shape and eager.dtype == np.uint8

    ds = tf.data.Dataset.from_tensors(images).map(lambda x: random_crop_flip(x, seed))
    np.testing.assert_array_equal(next(iter(ds)).numpy(), eager)
    assert not np.array_equal(random_crop_flip(images, seed + 1).numpy(), eager)
    floats = random_crop_flip(images.astype(np.float32), seed).numpy()
    np.testing.assert_array_equal(floats, eager.astype(np.float32))

    # Each output is a crop of the reflect-padded image (pad 16 // 8 = 2), flipped or not.
    pad = 2
    padded = np.pad(images, [(0, 0), (pad, pad), (pad, pad), (0, 0)], mode="reflect")
    moves = set()
    for i, out in enumerate(eager):
        matches = [(dy, dx, flip) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                   for flip in (False, True)
                   if np.array_equal(out, (lambda c: c[:, ::-1] if flip else c)(
                       padded[i, dy:dy + 16, dx:dx + 16]))]
        assert matches, f"image {i} is not a padded crop"
        moves.add(matches[0])
    assert len(moves) > 1   # drawn per image, not once per batch


def test_augmented_train_differs_between_epochs_and_stays_valid():
    cfg = synthetic(augment=True)
    data = load_data(cfg, 16, 8, seed=3, verbose=False)
    x1, y1 = collect(data.train)
    x2, y2 = collect(data.train)
    assert x1.shape == x2.shape == (57, 16, 16, 3)
    assert x1.min() >= 0 and x1.max() <= 255
    assert not np.array_equal(y1, y2) and not np.array_equal(x1, x2)
    assert sorted(y1.tolist()) == sorted(y2.tolist())
    # Same seed, same run: the same augmented epochs.
    again = load_data(cfg, 16, 8, seed=3, verbose=False)
    np.testing.assert_array_equal(collect(again.train)[0], x1)
    assert not np.array_equal(collect(load_data(cfg, 16, 8, seed=4, verbose=False).train)[0], x1)


def test_unaugmented_pipelines_are_deterministic_and_train_is_reshuffled():
    data = load_data(synthetic(), 16, 8, verbose=False)
    for ds in (data.val, data.test):
        a, b = collect(ds), collect(ds)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    (x1, y1), (x2, y2) = collect(data.train), collect(data.train)
    assert not np.array_equal(y1, y2)
    # Same images, new order: no augmentation without cfg.augment.
    key = lambda x: sorted(img.tobytes() for img in x)  # noqa: E731
    assert key(x1) == key(x2)
    # The last partial batch is kept.
    assert [len(y) for _, y in data.train][-1] == 57 % 8
