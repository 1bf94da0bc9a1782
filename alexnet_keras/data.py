"""Images in, `tf.data` pipelines out: CIFAR-10, a user's image folder, or a synthetic stand-in.

`load_data` turns a `DataConfig` into a `Data`: batched train/val/test pipelines of float32 images in
0..255 (normalisation belongs to the model, which gets `mean`/`std` from here) and int32 labels.

This is the only module of the project that imports TensorFlow: tf.data is the one input pipeline
that feeds Keras 3 on every backend, and tf.io/tf.image decode and resize images fast in C++.

Design, in short:
  * every source is first brought into memory as uint8 arrays (decoded once, cached on disk for
    folders), then split with sklearn by index; pipelines gather batches from those arrays;
  * the validation split is carved from the training images, stratified and seeded by
    `split_seed` alone, so every run of a study sees the same split whatever its training `seed`;
  * CIFAR-10 stays at its native 32 px in memory; other sizes are produced per batch in the pipeline
    (60,000 images at 227 px would need 9 GB).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from sklearn.model_selection import train_test_split

from alexnet_keras.config import DataConfig

DATA_DIR_ENV = "ALEXNET_KERAS_DATA_DIR"
CACHE_ENV = "ALEXNET_KERAS_CACHE"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck"]
CIFAR_SIZE = 32
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
CIFAR_PICKLE_DIR = "cifar-10-batches-py"
# Share of a folder without its own test/ that is held out as the test split.
FOLDER_TEST_FRACTION = 0.2
# Above this many files, decoding shows a progress bar (below it, it takes about a second).
PROGRESS_MIN_FILES = 2000

_AUTOTUNE = tf.data.AUTOTUNE


class DataError(ValueError):
    """The data cannot be read as asked. The message says what is wrong, where, and how to fix it."""


@dataclasses.dataclass
class Data:
    """Everything a training run needs to know about its data."""

    train: tf.data.Dataset    # (float32 (B,S,S,3) in 0..255, int32 (B,)); reshuffled each epoch;
                              # augmented if cfg.augment; the last partial batch is kept
    val: tf.data.Dataset      # batched in a fixed order, never augmented
    test: tf.data.Dataset     # batched in a fixed order, never augmented; for the final evaluation only
    test_labels: np.ndarray   # int32 labels of `test` in dataset order
    class_names: list[str]
    image_size: int
    batch_size: int
    counts: dict              # {"train", "val", "test", "skipped"}: images per split, unreadable files
    mean: list[float]         # per-channel mean of the train split's pixels, 0..255 units
    std: list[float]          # per-channel (population) std of the train split's pixels
    source: str               # where the images came from, for logs and MLflow
    digest: str               # 16 hex digits identifying the images, labels and split

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.counts["train"] / self.batch_size))


@dataclasses.dataclass
class _Raw:
    """A source's images in memory before splitting. `x_val` is set only when the source has its own."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]
    source: str
    identity: str             # hash of the source's content, the data half of `Data.digest`
    skipped: int = 0
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------

def load_data(cfg: DataConfig, image_size: int, batch_size: int, seed: int = 0, *,
              verbose: bool = True) -> Data:
    """Read the dataset `cfg` names and build its pipelines at `image_size` pixels.

    `seed` drives only the per-epoch shuffling and augmentation; the split depends on
    `cfg.split_seed` alone. `verbose=False` silences the decoding progress bar and timing line.
    """
    if not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"image_size must be a positive integer; got {image_size!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer; got {batch_size!r}.")

    if cfg.dataset == "synthetic":
        raw = _synthetic(cfg, image_size)
    elif cfg.dataset == "cifar10":
        raw = _cifar10(cfg, verbose)
    else:
        root = resolve_data_dir(cfg.data_dir)
        if root is None:
            raise DataError("dataset 'folder' needs a folder: pass --data-dir PATH (class sub-folders, "
                            "or train/ and test/ each with class sub-folders) or set "
                            f"${DATA_DIR_ENV}.")
        raw = _from_dir(root, image_size, verbose, cfg.split_seed, cifar=False)

    train_idx, val_idx, x_val, y_val = _split(raw, cfg)
    x_train, y_train = raw.x_train[train_idx], raw.y_train[train_idx]
    if x_val is None:
        x_val, y_val = raw.x_train[val_idx], raw.y_train[val_idx]
    mean, std = _channel_stats(x_train)

    digest = _hash_json({
        "data": raw.identity, "image_size": image_size, "val_fraction": cfg.val_fraction,
        "split_seed": cfg.split_seed, "train_limit": cfg.train_limit,
    })
    return Data(
        train=_pipeline(x_train, y_train, image_size, batch_size, train=True, augment=cfg.augment,
                        seed=seed),
        val=_pipeline(x_val, y_val, image_size, batch_size),
        test=_pipeline(raw.x_test, raw.y_test, image_size, batch_size),
        test_labels=raw.y_test.astype(np.int32),
        class_names=list(raw.class_names),
        image_size=image_size,
        batch_size=batch_size,
        counts={"train": len(y_train), "val": len(y_val), "test": len(raw.y_test),
                "skipped": raw.skipped},
        mean=mean,
        std=std,
        source=raw.source,
        digest=digest,
    )


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The folder to read: `data_dir`, else $ALEXNET_KERAS_DATA_DIR, else None (use the download).

    An archive (.tar.gz, .tgz, .tar, .zip) is extracted once into the cache and the folder inside it
    that holds the data is returned.
    """
    origin = ""
    if not data_dir:
        data_dir = os.environ.get(DATA_DIR_ENV) or None
        origin = f" (from ${DATA_DIR_ENV})"
    if not data_dir:
        return None
    path = Path(data_dir).expanduser().absolute()
    if not path.exists():
        raise DataError(f"data dir {str(path)!r}{origin} does not exist. Pass --data-dir PATH with an "
                        "existing folder (train/<class>/*, <class>/* or cifar-10-batches-py/) or an "
                        "archive (.tar.gz, .zip) of one.")
    if path.is_file():
        if not path.name.lower().endswith(ARCHIVE_SUFFIXES):
            raise DataError(f"data dir {str(path)!r}{origin} is a file, not a folder or an archive "
                            f"({', '.join(ARCHIVE_SUFFIXES)}). Pass the folder that holds the images.")
        return _layout_root(_extract(path))
    return path


def cache_root() -> Path:
    """Where extracted archives and decoded arrays live: $ALEXNET_KERAS_CACHE or ~/.cache/alexnet-keras."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/alexnet-keras").expanduser()


def random_crop_flip(images: tf.Tensor, seed: tf.Tensor, pad: int | None = None) -> tf.Tensor:
    """Random translation by up to `pad` pixels each way (as a random crop of the image padded by
    reflection) and random horizontal flip, drawn independently for every image of `images`
    (B,H,W,C, any dtype; H, W static).

    Stateless: the same `seed` (two integers) gives the same result, eagerly or inside
    `tf.data.Dataset.map`. `pad` defaults to H // 8: 4 px for CIFAR's 32.
    """
    images = tf.convert_to_tensor(images)
    seed = tf.cast(seed, tf.int64)
    batch = tf.shape(images)[0]
    height, width, channels = images.shape[1], images.shape[2], images.shape[3]
    if pad is None:
        pad = height // 8
    pad = min(pad, height - 1, width - 1)   # reflection cannot reach further than the image
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    offsets = tf.random.stateless_uniform([batch, 2], crop_seed, minval=-pad, maxval=pad + 1,
                                          dtype=tf.int32)
    flip = tf.random.stateless_uniform([batch], flip_seed) < 0.5

    def reflect(i, n):   # tf.pad's REFLECT: -1 -> 1, n -> n - 2
        i = tf.abs(i)
        return tf.where(i >= n, 2 * (n - 1) - i, i)

    # The source pixel of every output pixel, then one gather for the whole batch: 4-5x faster than
    # tf.pad + per-image crops + tf.reverse, which made augmentation the bottleneck of the pipeline.
    cols = tf.range(width)[None, :]
    cols = reflect(tf.where(flip[:, None], width - 1 - cols, cols) + offsets[:, 1:], width)
    rows = reflect(tf.range(height)[None, :] + offsets[:, :1], height)
    flat = tf.range(batch)[:, None, None] * (height * width) + rows[:, :, None] * width + cols[:, None, :]
    return tf.gather(tf.reshape(images, [-1, channels]), flat)


# ---------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------

def _pipeline(x: np.ndarray, y: np.ndarray, image_size: int, batch_size: int, *, train: bool = False,
              augment: bool = False, seed: int = 0) -> tf.data.Dataset:
    # The pipeline shuffles and batches indices, then gathers each batch from the in-memory arrays:
    # as fast as from_tensor_slices -> cache -> shuffle -> batch on CIFAR, but the shuffle buffer
    # holds integers, not images, so filling it costs nothing even for large images. The arrays sit
    # in CPU variables, which the map function captures by handle; a captured constant would be
    # copied into the function's graph, which takes seconds and doubles memory for large arrays.
    with tf.device("/CPU:0"):
        images = tf.Variable(x, trainable=False)
        labels = tf.Variable(y.astype(np.int32), trainable=False)
    stored = x.shape[1]
    n = len(y)

    ds = tf.data.Dataset.range(n)
    if train:
        ds = ds.shuffle(max(n, 1), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=False)

    def gather(idx):
        return tf.gather(images, idx), tf.gather(labels, idx)

    def finish(batch_images):
        batch_images = tf.cast(batch_images, tf.float32)
        if stored != image_size:
            # Antialiasing only matters when shrinking, and its kernel is several times slower.
            batch_images = tf.image.resize(batch_images, [image_size, image_size],
                                           antialias=image_size < stored)
        return batch_images

    if train and augment:
        # Stateless ops with a seed per batch from a seeded stream: epochs differ from one another,
        # yet a run with the same `seed` sees the same augmented batches.
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds))

        def load(idx, batch_seed):
            batch_images, batch_labels = gather(idx)
            # Augment at stored resolution (4 px of a 32-px CIFAR image), before any upscaling.
            return finish(random_crop_flip(batch_images, batch_seed)), batch_labels
    else:
        def load(idx):
            batch_images, batch_labels = gather(idx)
            return finish(batch_images), batch_labels

    ds = ds.map(load, num_parallel_calls=_AUTOTUNE, deterministic=True)
    return ds.prefetch(_AUTOTUNE)


def _channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    # A histogram of the 256 values per channel gives exact moments in a fraction of the time (and
    # memory) of float64 arithmetic over 46 million pixels.
    counts = np.zeros((3, 256), dtype=np.int64)
    for start in range(0, len(x), 4096):
        chunk = x[start:start + 4096]
        for c in range(3):
            counts[c] += np.bincount(chunk[..., c].ravel(), minlength=256)
    total = counts.sum(axis=1)
    if not total.all():
        return [0.0] * 3, [1.0] * 3
    values = np.arange(256, dtype=np.float64)
    mean = counts @ values / total
    var = counts @ np.square(values) / total - np.square(mean)
    return [float(m) for m in mean], [float(s) for s in np.sqrt(np.maximum(var, 0.0))]


# ---------------------------------------------------------------------------------------------
# Splitting
# ---------------------------------------------------------------------------------------------

def _split(raw: _Raw, cfg: DataConfig):
    """Train and val indices into `raw.x_train`, or val arrays of the source's own."""
    indices = np.arange(len(raw.y_train))
    if raw.x_val is not None:
        train_idx, val_idx, x_val, y_val = indices, None, raw.x_val, raw.y_val
    else:
        n_val = _held_out_size(raw.y_train, cfg.val_fraction)
        train_idx, val_idx = _stratified(indices, raw.y_train, n_val, cfg.split_seed, "validation")
        x_val = y_val = None
    if cfg.train_limit is not None and cfg.train_limit < len(train_idx):
        train_idx, _ = _stratified(train_idx, raw.y_train[train_idx], len(train_idx) - cfg.train_limit,
                                   cfg.split_seed, "train_limit")
    return np.sort(train_idx), None if val_idx is None else np.sort(val_idx), x_val, y_val


def _held_out_size(labels: np.ndarray, fraction: float) -> int:
    # At least one image of every class, where the other side can spare it: a tiny dataset's
    # validation split would otherwise miss classes (and sklearn refuses to stratify it).
    n, n_classes = len(labels), len(np.unique(labels))
    return max(math.ceil(fraction * n), min(n_classes, n - n_classes))


def _stratified(indices: np.ndarray, labels: np.ndarray, n_out: int, seed: int, what: str):
    """(kept, held out), `n_out` held out, stratified by label where the class counts allow it."""
    if n_out < 1 or n_out >= len(indices):
        raise DataError(f"too few images ({len(indices)}) to hold out a {what} split of {n_out}: "
                        "add images, or change val_fraction / train_limit.")
    n_classes = len(np.unique(labels))
    stratify = labels
    if np.unique(labels, return_counts=True)[1].min() < 2 or min(n_out, len(indices) - n_out) < n_classes:
        warnings.warn(f"the {what} split is not stratified: a class has fewer than 2 images, or a "
                      f"side of the split ({n_out} of {len(indices)}) has fewer images than the "
                      f"{n_classes} classes.", stacklevel=3)
        stratify = None
    kept, out = train_test_split(indices, test_size=n_out, stratify=stratify, random_state=seed)
    return kept, out


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------

def _synthetic(cfg: DataConfig, image_size: int) -> _Raw:
    # Each class: its own mean colour and stripe pattern (orientation, frequency), plus per-pixel
    # noise. Easy enough that a small CNN separates the classes within a couple of epochs, while the
    # noise keeps every image distinct.
    rng = np.random.default_rng(cfg.split_seed)
    k, s = cfg.synthetic_classes, image_size
    n_train, n_test = cfg.synthetic_samples, max(cfg.synthetic_samples // 4, k)
    colours = rng.uniform(50, 205, size=(k, 1, 1, 3)).astype(np.float32)
    angle = rng.uniform(0, np.pi, size=(k, 1, 1))
    freq = rng.uniform(1.0, 4.0, size=(k, 1, 1)) * 2 * np.pi / s
    phase = rng.uniform(0, 2 * np.pi, size=(k, 1, 1))
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    stripes = np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
    templates = colours + 40.0 * stripes[..., None].astype(np.float32)

    def make(n):
        labels = rng.permutation(np.arange(n) % k).astype(np.int32)
        images = templates[labels] + rng.normal(0, 20, size=(n, s, s, 3)).astype(np.float32)
        return np.clip(np.rint(images), 0, 255).astype(np.uint8), labels

    x_train, y_train = make(n_train)
    x_test, y_test = make(n_test)
    return _Raw(x_train, y_train, x_test, y_test, [f"class_{i}" for i in range(k)], "synthetic",
                _array_identity("synthetic", x_train, y_train, x_test, y_test))


def _cifar10(cfg: DataConfig, verbose: bool) -> _Raw:
    root = resolve_data_dir(cfg.data_dir)
    if root is not None:
        return _from_dir(root, CIFAR_SIZE, verbose, cfg.split_seed, cifar=True)
    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    except Exception as err:  # noqa: BLE001 - any failure here means "no download"
        raise DataError(
            f"CIFAR-10 could not be downloaded ({type(err).__name__}: {err}). Point at a local copy "
            "with --data-dir PATH (a folder with train/<class>/* and test/<class>/*, "
            f"a {CIFAR_PICKLE_DIR}/ folder, or a .tar.gz of either) or set ${DATA_DIR_ENV}."
        ) from err
    y_train, y_test = y_train.reshape(-1).astype(np.int32), y_test.reshape(-1).astype(np.int32)
    return _Raw(x_train, y_train, x_test, y_test, list(CIFAR10_CLASSES), "keras.datasets.cifar10",
                _array_identity("cifar10", x_train, y_train, x_test, y_test))


def _from_dir(root: Path, image_size: int, verbose: bool, split_seed: int, *, cifar: bool) -> _Raw:
    pickles = _find_cifar_pickles(root)
    if pickles is not None:
        return _cifar_pickles(pickles)
    return _folder(root, image_size, verbose, _layout_hint(cifar), split_seed)


def _layout_hint(cifar: bool) -> str:
    hint = ("Expected train/<class>/* (optionally with test/<class>/*) or <class>/* directly, "
            "one sub-folder per class")
    if cifar:
        hint += f", or CIFAR-10's {CIFAR_PICKLE_DIR}/ (data_batch_1..5, test_batch, batches.meta)"
    return hint + "."


def _find_cifar_pickles(root: Path) -> Path | None:
    for candidate in (root, root / CIFAR_PICKLE_DIR):
        if (candidate / "data_batch_1").is_file() and (candidate / "test_batch").is_file():
            return candidate
    return None


def _cifar_pickles(folder: Path) -> _Raw:
    def read(name: str) -> dict:
        path = folder / name
        try:
            with open(path, "rb") as f:
                return pickle.load(f, encoding="bytes")
        except FileNotFoundError:
            raise DataError(f"{str(path)!r} is missing: {CIFAR_PICKLE_DIR}/ needs data_batch_1..5 "
                            "and test_batch. Re-extract the archive.") from None
        except Exception as err:  # noqa: BLE001 - unpickling fails in many ways on a broken file
            raise DataError(f"{str(path)!r} is not a readable CIFAR-10 batch ({err}). "
                            "Re-extract the archive.") from err

    def arrays(batch: dict, name: str) -> tuple[np.ndarray, np.ndarray]:
        try:
            x = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, CIFAR_SIZE, CIFAR_SIZE)
            y = np.asarray(batch[b"labels"], dtype=np.int32)
        except (KeyError, ValueError) as err:
            raise DataError(f"{str(folder / name)!r} does not hold CIFAR-10 data/labels ({err}).") from err
        return x.transpose(0, 2, 3, 1), y

    names = sorted((p.name for p in folder.glob("data_batch_*")), key=lambda n: int(n.rsplit("_", 1)[1])
                   if n.rsplit("_", 1)[1].isdigit() else 0)
    parts = [arrays(read(name), name) for name in names]
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    x_test, y_test = arrays(read("test_batch"), "test_batch")
    class_names = list(CIFAR10_CLASSES)
    if (folder / "batches.meta").is_file():
        meta = read("batches.meta")
        if b"label_names" in meta:
            class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[b"label_names"]]
    return _Raw(x_train, y_train, x_test, y_test, class_names, str(folder),
                _array_identity("cifar10-pickles", x_train, y_train, x_test, y_test))


# ---------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------

def _visible(path: Path) -> bool:
    return not path.name.startswith(".") and path.name != "__MACOSX"


def _class_dirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and _visible(p)), key=lambda p: p.name)


def _files_under(root: Path, folder: Path) -> list[str]:
    """Paths relative to `root` of the visible files under `folder`, sorted. Plain strings, because
    pathlib costs seconds on CIFAR's 60,000 files."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
        rel = os.path.relpath(dirpath, root)
        out.extend(os.path.join(rel, f) for f in sorted(filenames) if not f.startswith("."))
    return out


def _folder(root: Path, image_size: int, verbose: bool, fix_hint: str, split_seed: int) -> _Raw:
    if not root.is_dir():
        raise DataError(f"data dir {str(root)!r} is not a folder. {fix_hint}")
    split_dirs = {name: root / name for name in ("train", "val", "test") if (root / name).is_dir()}
    if "train" in split_dirs:
        # train/ + test/ (+ val/): test/ is the held-out test set; val/ is the validation set when
        # test/ exists too, and otherwise the test set (ImageNet's layout, where val/ is what is
        # reported).
        layout = {"train": split_dirs["train"]}
        if "test" in split_dirs:
            layout["test"] = split_dirs["test"]
            if "val" in split_dirs:
                layout["val"] = split_dirs["val"]
        elif "val" in split_dirs:
            layout["test"] = split_dirs["val"]
    elif split_dirs:
        raise DataError(f"data dir {str(root)!r} has {'/ and '.join(sorted(split_dirs))}/ but no train/. "
                        f"{fix_hint}")
    else:
        layout = {"train": root}

    class_dirs = _class_dirs(layout["train"])
    class_names = [p.name for p in class_dirs]
    if not class_names:
        raise DataError(f"no class folders in {str(layout['train'])!r}. {fix_hint}")
    if len(class_names) < 2:
        raise DataError(f"only one class folder ({class_names[0]!r}) in {str(layout['train'])!r}; "
                        f"classification needs at least 2. {fix_hint}")
    for split, folder in layout.items():
        if split == "train":
            continue
        names = [p.name for p in _class_dirs(folder)]
        if names != class_names:
            missing = sorted(set(class_names) - set(names))
            extra = sorted(set(names) - set(class_names))
            raise DataError(f"the class folders of {str(folder)!r} do not match those of "
                            f"{str(layout['train'])!r} (missing: {missing or 'none'}; not in train: "
                            f"{extra or 'none'}). Give {split}/ the same class sub-folders as train/.")

    files: list[str] = []
    labels: list[int] = []
    splits: list[str] = []
    for split, folder in layout.items():
        for label, name in enumerate(class_names):
            found = _files_under(root, folder / name)
            files.extend(found)
            labels.extend([label] * len(found))
            splits.extend([split] * len(found))
    if not files:
        raise DataError(f"no files under the class folders of {str(root)!r}. {fix_hint}")

    images, good, sizes = _decode_cached(root, files, image_size, verbose)
    bad = np.ones(len(files), dtype=bool)
    bad[good] = False
    skipped = [files[i] for i in np.flatnonzero(bad)]
    if not len(good):
        raise DataError(f"no readable images in {str(root)!r}: all {len(files)} files failed to decode "
                        f"as JPEG, PNG, GIF or BMP (e.g. {files[0]!r}). {fix_hint}")
    if skipped:
        names = ", ".join(skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        warnings.warn(f"skipped {len(skipped)} file(s) under {str(root)!r} that are not readable "
                      f"images: {names}{more}.", stacklevel=2)

    labels_arr = np.asarray(labels, dtype=np.int32)[good]
    splits_arr = np.asarray(splits)[good]
    by_split = {s: (images[splits_arr == s], labels_arr[splits_arr == s]) for s in layout}
    if len(np.unique(by_split["train"][1])) < 2:
        raise DataError(f"only one class of {str(layout['train'])!r} has readable images; "
                        f"classification needs at least 2. {fix_hint}")

    x_train, y_train = by_split["train"]
    if "test" in by_split:
        x_test, y_test = by_split["test"]
        if not len(y_test):
            raise DataError(f"no readable images in {str(layout['test'])!r}. Add images to it or "
                            "remove it to carve a test split from train/.")
    else:
        keep, out = _stratified(np.arange(len(y_train)), y_train,
                                _held_out_size(y_train, FOLDER_TEST_FRACTION), split_seed, "test")
        keep, out = np.sort(keep), np.sort(out)
        x_test, y_test = x_train[out], y_train[out]
        x_train, y_train = x_train[keep], y_train[keep]
    x_val = y_val = None
    if "val" in by_split:
        x_val, y_val = by_split["val"]
        if not len(y_val):
            raise DataError(f"no readable images in {str(layout['val'])!r}. Add images to it or "
                            "remove it to carve the validation split from train/.")

    identity = _hash_json({"kind": "folder", "files": [files[i] for i in good],
                           "sizes": [sizes[i] for i in good],
                           "labels": labels_arr.tolist(), "stored": image_size,
                           "carved_test": "test" not in by_split})
    return _Raw(x_train, y_train, x_test, y_test, class_names, str(root), identity, len(skipped),
                x_val, y_val)


def _decode_cached(root: Path, files: list[str], size: int, verbose: bool):
    """(uint8 images (n_good, size, size, 3), indices into `files` (relative to `root`) of those
    that decoded, file sizes), from the disk cache when the same files were decoded at this size."""
    paths = [os.path.join(root, f) for f in files]
    stats = [os.stat(p) for p in paths]
    sizes = [s.st_size for s in stats]
    key = _hash_json({"files": files,
                      "sizes": sizes,
                      "mtimes": [s.st_mtime_ns for s in stats], "size": size})
    cache_file = cache_root() / "decoded" / f"{key}.npz"
    if cache_file.is_file():
        try:
            with np.load(cache_file) as cached:
                images, good = cached["images"], cached["good"]
            if images.shape[1:] == (size, size, 3) and len(images) == len(good):
                return images, good, sizes
        except Exception:  # noqa: BLE001 - a damaged cache is only a reason to decode again
            pass
    images, good = _decode_files(paths, size, verbose)
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        # Temp file, then rename: a run killed mid-write leaves no truncated cache behind.
        fd, tmp = tempfile.mkstemp(prefix=f".{key}-", suffix=".npz", dir=cache_file.parent)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, images=images, good=good)
        os.replace(tmp, cache_file)
    except OSError as err:
        warnings.warn(f"could not cache decoded images in {str(cache_file.parent)!r} ({err}); the next "
                      f"run will decode them again. Set ${CACHE_ENV} to a writable folder.", stacklevel=2)
    return images, good, sizes


def _decode_files(files: list[str], size: int, verbose: bool):
    """Decode and resize every file with tf.data; files that fail to decode are left out."""
    start = time.perf_counter()
    n = len(files)

    def decode(index, path):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        image.set_shape([None, None, 3])
        shape = tf.shape(image)

        def resize():
            resized = tf.image.resize(image, [size, size], antialias=True)
            return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)

        same = tf.logical_and(tf.equal(shape[0], size), tf.equal(shape[1], size))
        return index, tf.cond(same, lambda: tf.ensure_shape(image, [size, size, 3]), resize)

    # An error inside `decode` drops that element (ignore_errors), so the indices that come out are
    # exactly the readable files; order is free, which lets the parallel map run unordered.
    ds = (tf.data.Dataset.from_tensor_slices((np.arange(n, dtype=np.int64), files))
          .map(decode, num_parallel_calls=_AUTOTUNE, deterministic=False)
          .ignore_errors()
          .batch(1024)
          .prefetch(2))
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    ok = np.zeros(n, dtype=bool)
    bar = None
    if verbose and n >= PROGRESS_MIN_FILES:
        print(f"Decoding {n} files at {size}x{size} (cached afterwards)...", flush=True)
        bar = keras.utils.Progbar(n, unit_name="file", verbose=1 if sys.stdout.isatty() else 2)
    done = 0
    for index, batch in ds.as_numpy_iterator():
        images[index] = batch
        ok[index] = True
        done += len(index)
        if bar is not None:
            bar.update(done)
    if bar is not None and done < n:
        bar.update(n, finalize=True)   # skipped files never arrive; close the bar anyway
    good = np.flatnonzero(ok)
    if verbose and n >= PROGRESS_MIN_FILES:
        elapsed = time.perf_counter() - start
        print(f"Decoded {len(good)} of {n} files in {elapsed:.1f} s ({len(good) / elapsed:.0f} images/s).",
              flush=True)
    return images[good], good


# ---------------------------------------------------------------------------------------------
# Archives
# ---------------------------------------------------------------------------------------------

def _archive_stem(path: Path) -> str:
    name = path.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _extract(archive: Path) -> Path:
    """The folder `archive` is extracted to, extracting it only if no earlier run did."""
    stat = archive.stat()
    tag = hashlib.sha256(f"{archive.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    parent = cache_root() / "datasets"
    target = parent / f"{_archive_stem(archive)}-{tag}"
    if target.is_dir():
        return target
    parent.mkdir(parents=True, exist_ok=True)
    # Extract beside the target, then rename: a killed extraction leaves only a hidden temp folder,
    # never a half-filled target that a later run would trust.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=parent))
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(tmp)    # zipfile drops absolute paths and "..", so it stays inside tmp
        else:
            with tarfile.open(archive) as tf_archive:
                tf_archive.extractall(tmp, filter="data")   # no paths outside tmp, no device files
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"could not extract {str(archive)!r} ({err}). Check that the archive is "
                        "complete, or extract it yourself and pass the folder with --data-dir.") from err
    try:
        os.rename(tmp, target)
    except OSError:
        # Another process finished the same extraction first; its copy is as good as ours.
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.is_dir():
            raise
    return target


def _layout_root(folder: Path) -> Path:
    """Descend through lone wrapper folders (data.tar.gz -> data/) to the one holding the layout."""
    while True:
        entries = [p for p in folder.iterdir() if _visible(p)]
        if len(entries) != 1 or not entries[0].is_dir() or entries[0].name in ("train", CIFAR_PICKLE_DIR):
            return folder
        folder = entries[0]


# ---------------------------------------------------------------------------------------------
# Hashing
# ---------------------------------------------------------------------------------------------

def _hash_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _array_identity(kind: str, *arrays: np.ndarray) -> str:
    h = hashlib.sha256(kind.encode())
    for array in arrays:
        h.update(str(array.shape).encode())
        h.update(np.ascontiguousarray(array).data)
    return h.hexdigest()[:16]
