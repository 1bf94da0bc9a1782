"""Tests of the alexnet_keras.data package on tiny datasets built in tmp_path: no network, no shared 60k copy."""

from __future__ import annotations

import io
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
from alexnet_keras.data import Data, DataError, load_data, locate_data_dir, random_crop_flip
from alexnet_keras.data import decode as decode_module

CLASSES = ["cat", "ant", "bee"]          # created unsorted on purpose
SORTED = sorted(CLASSES)


pytestmark = pytest.mark.usefixtures("isolated_data")


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

    monkeypatch.setattr(decode_module, "decode_files", no_decoding)
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
    root = locate_data_dir(str(archive)).path
    assert root.parent.parent == cache / "datasets" and root.name == "mydata"
    assert root.parent.name.startswith("mydata-")
    assert (root / "train" / "ant").is_dir()
    assert [p.name for p in (cache / "datasets").iterdir()] == [root.parent.name]   # no temp dirs

    data = load_data(DataConfig(dataset="folder", data_dir=str(archive)), 16, 4, verbose=False)
    assert data.counts["train"] + data.counts["val"] == 12 and data.counts["test"] == 6

    def no_extraction(*args, **kwargs):
        raise AssertionError("extracted again")

    monkeypatch.setattr(tarfile, "open", no_extraction)
    assert locate_data_dir(str(archive)).path == root
    # The env var is the fallback for data_dir.
    monkeypatch.setenv(data_module.DATA_DIR_ENV, str(archive))
    assert locate_data_dir(None).path == root


def test_zip_archive_without_wrapper_folder(tmp_path):
    src = make_layout(tmp_path / "src", n_train=3, n_test=2, junk=False)
    path = tmp_path / "flat.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for file in src.rglob("*"):
            zf.write(file, file.relative_to(src))
    root = locate_data_dir(str(path)).path
    assert (root / "train").is_dir() and (root / "test").is_dir()


def test_broken_archive_leaves_nothing_behind(tmp_path):
    path = tmp_path / "broken.tar.gz"
    path.write_bytes(b"\x1f\x8b" + np.random.default_rng(0).bytes(200))
    with pytest.raises(DataError, match="broken.tar.gz"):
        locate_data_dir(str(path)).path
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


# --------------------------------------------------------------------------------------------
# hostile input (issue 14): nothing runs from data, nothing hangs, nothing stale, nothing left behind
# --------------------------------------------------------------------------------------------

class RunsCode:
    """Unpickles into a call of os.system: what a hostile batches.meta can hold."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_cifar_pickle_that_would_run_code_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_fake_cifar_pickles(folder)
    marker = tmp_path / "pwned"
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": RunsCode(f"touch {marker}")}, f)
    with pytest.raises(DataError, match="batches.meta") as err:
        load_data(DataConfig(dataset="cifar10", data_dir=str(tmp_path)), 32, 4, verbose=False)
    assert "refused to load posix.system" in str(err.value) and "not loaded" in str(err.value)
    assert not marker.exists()

    # Any other global is refused as well, in a data batch too; NumPy arrays of every protocol load.
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"plane", b"car", b"bird"]}, f, protocol=5)
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"extra": Path("x")}, f)
    with pytest.raises(DataError, match="data_batch_2.*pathlib"):
        load_data(DataConfig(dataset="cifar10", data_dir=str(tmp_path)), 32, 4, verbose=False)
    for protocol in (2, 3, 4, 5):
        with open(folder / "data_batch_2", "wb") as f:
            pickle.dump({b"data": np.full((6, 3072), protocol, np.uint8), b"labels": [0, 1, 2] * 2}, f,
                        protocol=protocol)
        data = load_data(DataConfig(dataset="cifar10", data_dir=str(tmp_path)), 32, 4, verbose=False)
        assert data.counts["train"] + data.counts["val"] == 30


def test_cifar_labels_out_of_range_fail_before_any_run(tmp_path, mlflow_store, capsys):
    from conftest import all_runs

    from alexnet_keras import cli

    folder = tmp_path / "cifar-10-batches-py"
    write_fake_cifar_pickles(folder)
    with open(folder / "data_batch_3", "wb") as f:    # 3 classes in batches.meta, a label 7
        pickle.dump({b"data": np.zeros((6, 3072), np.uint8), b"labels": [0, 1, 2, 7, 1, 0]}, f)
    with pytest.raises(DataError, match=r"data_batch_3.*outside 0\.\.2.*\[7\]"):
        load_data(DataConfig(dataset="cifar10", data_dir=str(tmp_path)), 32, 4, verbose=False)
    code = cli.main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--variant", "cifar",
                     "--width", "0.125", "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "data_batch_3" in err and "Traceback" not in err
    assert all_runs(mlflow_store) == []


class Watchdog:
    """Unblocks anyone stuck opening the FIFO `path` for reading after `seconds` (by opening it for
    writing), so a regression fails the test instead of hanging it."""

    def __init__(self, path, seconds=60):
        import threading

        self.fired = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(path, seconds), daemon=True)
        self._thread.start()

    def _run(self, path, seconds):
        if not self._stop.wait(seconds):
            self.fired = True
            os.close(os.open(path, os.O_WRONLY))   # a reader is blocked: let it see end-of-file

    def stop(self):
        self._stop.set()
        self._thread.join()


def test_links_and_special_files_are_never_followed_or_opened(tmp_path):
    root = make_flat(tmp_path / "data", per_class=4)
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8), (250, 250, 250)).save(outside)
    ant = root / "ant"
    (ant / "outward.png").symlink_to(outside)           # leads out of the tree
    (ant / "dangling.png").symlink_to(tmp_path / "gone.png")
    (ant / "loop").symlink_to(root)                      # back into the tree: would loop
    (ant / "again.png").symlink_to(ant / "0.png")        # a second copy of a file of the tree
    os.mkfifo(ant / "pipe.png")                          # opening it blocks until a writer comes
    (ant / "sub").mkdir()
    Image.new("RGB", (8, 8), (20, 9, 128)).save(ant / "sub" / "deeper.png")

    walk = data_module.walk_files(ant)
    assert walk.files == ["0.png", "1.png", "2.png", "3.png", "sub/deeper.png"]
    assert walk.skipped == ["again.png", "dangling.png", "loop", "outward.png", "pipe.png"]
    assert "5 entries" in walk.note(ant) and "not followed" in walk.note(ant)

    watchdog = Watchdog(ant / "pipe.png")
    try:
        with pytest.warns(UserWarning, match=r"skipped 5 entries .*ant/again.png") as record:
            data = load_data(DataConfig(dataset="folder", data_dir=str(root), augment=False), 8, 4,
                             verbose=False)
    finally:
        watchdog.stop()
    assert not watchdog.fired, "the FIFO was opened"
    assert "pipe.png" in str(record[0].message) and "loop" in str(record[0].message)
    assert data.counts["train"] + data.counts["val"] + data.counts["test"] == 13   # 12 + deeper.png
    assert data.counts["skipped"] == 5
    seen = np.concatenate([collect(ds)[0] for ds in (data.train, data.val, data.test)])
    assert not (seen == 250).all(axis=(1, 2, 3)).any()    # the image outside the tree was not read


def test_linked_class_folder_is_refused(tmp_path):
    root = make_flat(tmp_path / "data")
    other = make_flat(tmp_path / "elsewhere")
    (root / "cow").symlink_to(other / "ant")
    with pytest.raises(DataError, match="cow.* symbolic link to a folder") as err:
        load_data(DataConfig(dataset="folder", data_dir=str(root)), 8, 4, verbose=False)
    assert "Replace the link" in str(err.value)


def test_empty_or_unreadable_class_folder_is_refused_not_an_extra_class(tmp_path):
    root = make_flat(tmp_path / "data")
    (root / "dog").mkdir()
    (root / "dog" / ".hidden").write_text("not data")
    with pytest.raises(DataError, match=r"'dog' .* hold no files") as err:
        load_data(DataConfig(dataset="folder", data_dir=str(root)), 8, 4, verbose=False)
    assert "Add images to them or remove them" in str(err.value)
    (root / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"'dog' .* hold no readable image"), pytest.warns(UserWarning):
        load_data(DataConfig(dataset="folder", data_dir=str(root)), 8, 4, verbose=False)


def same_size_tar(path: Path, colour) -> None:
    """An uncompressed tar of a 3-class train/ + test/ folder of BMPs in `colour` order: archives made
    with other colours have the same size, member names, member sizes and member mtimes."""
    import io

    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for split, n in (("train", 4), ("test", 2)):
            for c, name in enumerate(SORTED):
                for i in range(n):
                    buffer = io.BytesIO()
                    Image.new("RGB", (8, 8), tuple(np.roll(colour, c))).save(buffer, format="BMP")
                    info = tarfile.TarInfo(f"set/{split}/{name}/{i}.bmp")
                    info.size, info.mtime = len(buffer.getvalue()), 1_700_000_000
                    tar.addfile(info, io.BytesIO(buffer.getvalue()))


def test_archive_replaced_with_same_size_and_mtime_is_extracted_again(tmp_path):
    archive = tmp_path / "set.tar"
    same_size_tar(archive, (200, 30, 30))
    before = archive.stat()
    cfg = DataConfig(dataset="folder", data_dir=str(archive), augment=False)
    first = load_data(cfg, 8, 4, verbose=False)
    old_pixels = collect(first.test)[0]

    replacement = tmp_path / "other.tar"
    same_size_tar(replacement, (30, 200, 30))
    archive.write_bytes(replacement.read_bytes())        # in place: same path, same inode
    os.utime(archive, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = archive.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)

    second = load_data(cfg, 8, 4, verbose=False)
    assert second.digest != first.digest
    new_pixels = collect(second.test)[0]
    assert not np.array_equal(new_pixels, old_pixels)
    np.testing.assert_array_equal(new_pixels.mean(axis=(1, 2)).argmax(axis=1),
                                  (old_pixels.mean(axis=(1, 2)).argmax(axis=1) + 1) % 3)
    assert len(list((tmp_path / "cache" / "datasets").iterdir())) == 2

    # The hash is remembered while the file is unchanged (not read again), forgotten once it changes.
    from alexnet_keras.data import archives

    (remembered,) = [p for p in (tmp_path / "cache" / "archive-sha256").iterdir()
                     if p.read_text() == archives.archive_sha256(archive)]
    remembered.write_text("f" * 64)
    assert archives.archive_sha256(archive) == "f" * 64
    os.utime(archive, ns=(before.st_atime_ns, before.st_mtime_ns))   # sets ctime: a new key
    assert archives.archive_sha256(archive) != "f" * 64


def test_interrupted_or_failed_extraction_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    import gzip

    datasets = tmp_path / "cache" / "datasets"
    # A real archive cut in half: extraction fails mid-way, after writing its first members.
    whole = tmp_path / "whole.tar.gz"
    with tarfile.open(whole, "w:gz") as tar:
        for i in range(20):
            member = tmp_path / f"noise{i}.bin"
            member.write_bytes(np.random.default_rng(i).bytes(50_000))
            tar.add(member, arcname=f"set/noise{i}.bin")
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(DataError, match="could not extract .*cut.tar.gz"):
        locate_data_dir(str(cut)).path
    assert list(datasets.iterdir()) == []

    # Ctrl-C while a member is being written: tarfile's copy writes the member's first MiB, then the
    # KeyboardInterrupt that Ctrl-C raises arrives (at that point on purpose: a thread sending
    # interrupt_main() when it sees the file missed the window on a loaded machine).
    big = tmp_path / "big.tar.gz"
    with gzip.open(big, "wb", compresslevel=1) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        info = tarfile.TarInfo("set/zeros.bin")
        info.size = 8 * 2 ** 20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    copy = tarfile.copyfileobj
    written = []

    def copy_then_ctrl_c(src, dst, length=None, *args, **kwargs):
        copy(src, dst, 2 ** 20, *args, **kwargs)
        dst.flush()
        written.extend(datasets.glob(".big-*/set/zeros.bin"))
        raise KeyboardInterrupt

    monkeypatch.setattr(tarfile, "copyfileobj", copy_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        locate_data_dir(str(big)).path
    assert written and written[0].name == "zeros.bin"      # it was interrupted mid-member, in the cache
    assert list(datasets.iterdir()) == []


def test_read_only_cache_gives_one_clear_message(tmp_path, read_only_folder, monkeypatch, archive, mlflow_store,
                                                 capsys):
    from conftest import all_runs

    from alexnet_keras import cli

    monkeypatch.setenv(data_module.CACHE_ENV, str(read_only_folder / "cache"))
    with pytest.raises(DataError, match="not writable") as err:
        locate_data_dir(str(archive)).path
    assert data_module.CACHE_ENV in str(err.value) and str(read_only_folder) in str(err.value)
    assert cli.main(["train", "--dataset", "folder", "--data-dir", str(archive), "--epochs", "1"]) == 2
    message = capsys.readouterr().err
    assert "Set ALEXNET_KERAS_CACHE to a writable folder" in message and "Traceback" not in message
    assert all_runs(mlflow_store) == []

    # A plain folder still loads: its decoded arrays are only not cached (a warning says so).
    root = make_flat(tmp_path / "flat")
    with pytest.warns(UserWarning, match="could not write the cache file"):
        data = load_data(DataConfig(dataset="folder", data_dir=str(root)), 8, 4, verbose=False)
    assert data.counts["train"] + data.counts["val"] + data.counts["test"] == 30


def test_non_deterministic_training_pipeline_still_gives_every_image_once_per_epoch(tmp_path):
    # deterministic=False (TrainConfig.deterministic off) lets the parallel stages hand out images in
    # the order they are ready: every epoch still holds every training image exactly once.
    root = make_flat(tmp_path / "flat", per_class=20)
    for max_memory_mb in (None, 0):   # in memory, and streamed from the files
        extra = {} if max_memory_mb is None else {"max_memory_mb": max_memory_mb}
        cfg = DataConfig(dataset="folder", data_dir=str(root), augment=False, **extra)

        def epoch(deterministic):
            data = load_data(cfg, 8, 4, seed=5, verbose=False, deterministic=deterministic)
            x, y = collect(data.train)
            return sorted(zip(image_ids(x), y.tolist()))

        unordered = epoch(False)
        assert unordered == epoch(True)
        assert len(set(unordered)) == len(unordered) == 43   # 60 less 12 test and 5 validation images


def test_a_file_name_that_is_not_utf8_is_skipped_with_a_warning_naming_it(tmp_path):
    root = make_flat(tmp_path / "data", per_class=4)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(os.fsencode(root / "ant") + b"/bad\xff.png", format="PNG")
    with pytest.warns(UserWarning, match=r"skipped 1 entry .*ant/bad\\xff.png"):
        data = load_data(DataConfig(dataset="folder", data_dir=str(root), augment=False), 8, 4, verbose=False)
    assert data.counts["skipped"] == 1
    assert data.counts["train"] + data.counts["val"] + data.counts["test"] == 12


def test_an_encrypted_zip_member_gives_one_clear_message(tmp_path):
    archive = tmp_path / "locked.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ("a/0.png", "b/0.png"):
            zf.writestr(name, b"not really encrypted")
    raw = bytearray(archive.read_bytes())   # the "encrypted" bit of every member's local and central header
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = raw.find(signature)
        while start >= 0:
            raw[start + offset] |= 0x1
            start = raw.find(signature, start + 4)
    archive.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="could not extract .*locked.zip.*encrypted"):
        locate_data_dir(str(archive))


def test_a_deflate64_zip_member_gives_one_clear_message(tmp_path):
    archive = tmp_path / "deflate64.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ("a/0.png", "b/0.png"):
            zf.writestr(name, b"stored bytes")
    raw = bytearray(archive.read_bytes())   # every member's compression method: 9, Deflate64 (zipfile cannot read it)
    for signature, offset in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        start = raw.find(signature)
        while start >= 0:
            raw[start + offset:start + offset + 2] = (9).to_bytes(2, "little")
            start = raw.find(signature, start + 4)
    archive.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="could not extract .*deflate64.zip") as err:
        locate_data_dir(str(archive))
    assert "\n" not in str(err.value)


def test_a_folder_listing_checks_and_splits_grow_linearly_in_files_and_classes(tmp_path, monkeypatch):
    # Everything a folder goes through but decoding (walk, class checks, test and validation splits,
    # identity) on 200 files in 100 classes and on 2,000 in 1,000, counted as calls and as elements
    # handed to NumPy arrays' methods: ~10x, not the ~100x of a pass over every label per class.
    import sys

    from alexnet_keras.data import sources, split

    monkeypatch.setattr(sources, "decode_cached",
                        lambda root, files, *a, **k: (None, np.arange(len(files)), [0] * len(files)))

    def work(classes):
        root = tmp_path / str(classes)
        for c in range(classes):
            (root / f"n{c:05d}").mkdir(parents=True)
            for i in range(2):
                (root / f"n{c:05d}" / f"{i}.jpg").touch()
        counts = {"calls": 0, "elements": 0}

        def profile(frame, event, arg):
            counts["calls"] += event in ("call", "c_call")
            if event == "c_call" and isinstance(getattr(arg, "__self__", None), np.ndarray):
                counts["elements"] += arg.__self__.size

        sys.setprofile(profile)
        try:
            source = sources.image_folder(root, 32, False, "", 0, max_bytes=0)
            split.train_val_indices(source.train.labels, 0.1, None, 0, own_val=False)
        finally:
            sys.setprofile(None)
        return counts

    with pytest.warns(UserWarning, match="not stratified"):
        small, big = work(100), work(1000)
    assert all(big[k] <= 15 * small[k] for k in small), (small, big)


def test_the_corrupt_file_check_is_one_cached_pass_for_every_size(tmp_path, monkeypatch):
    from alexnet_keras.data.files import folder_layout

    root = make_layout(tmp_path / "data")
    files = folder_layout(root, "").files
    _, good, _ = decode_module.decode_cached(root, files, 8, False, keep=False)
    assert len(good) == len(files) - 3                    # corrupt.jpg, empty.png, notes.txt

    def no_decoding(*args, **kwargs):
        raise AssertionError("checked again for another size")

    monkeypatch.setattr(decode_module, "decode_files", no_decoding)
    images, again, _ = decode_module.decode_cached(root, files, 227, False, keep=False, policy="shorter_side_crop")
    assert images is None and again.tolist() == good.tolist()
