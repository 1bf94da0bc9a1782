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
    (60,000 images at 227 px would need 9 GB);
  * image folders whose decoded images would need more than `max_memory_mb` (and TFRecord shards
    written by `alexnet-keras prepare`, see prepare.py) are not held in memory: their files are
    decoded on the fly, in parallel, every epoch ("streaming"), after one pass that finds the
    unreadable files (cached).

Recipes (`DataConfig.recipe`):
  * "simple" (default): every image is squashed to the model's input size; training augmentation is
    a random shift by up to 1/8 of the side (reflect padding, `random_crop`) and a horizontal flip
    (`random_flip`). The per-channel mean/std of the training pixels go into the model's first layer.
  * "paper" (Krizhevsky et al. 2012, section 2 and 4.1): the shorter side is rescaled to
    `stored_size` (256) and the central square kept; training takes a random crop of the input size
    (227, or 224 with --image-size 224) from it (`random_crop`; off = centre crop), reflects it
    horizontally with probability 1/2 (`random_flip`) and shifts its colour along the principal
    components of the training set's RGB pixels ("fancy PCA", `pca_color`, alpha ~ N(0, `pca_std`)).
    Mean subtraction: the per-channel mean (and std) inside the model, or, with `pixel_mean`, the
    per-pixel mean image (stored_size x stored_size) subtracted in the pipeline before cropping.
    Validation and test use the centre crop; `ten_crop` adds the paper's 10-crop test (4 corners +
    centre and their reflections, softmax averaged). Statistics are computed once on the training
    split, cached, and returned in `Data.recipe_stats` (train.py logs them).
  `augment=false` turns every training augmentation off in both recipes; `pca_color` has no effect in
  the simple recipe (so runs of the simple recipe are unchanged by its default).
"""

from __future__ import annotations

import abc
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
    # What a prediction must do to a file to give the model what it was trained on (`_preprocessing`);
    # logged in data.json and with the model, read back by predict.py.
    preprocessing: dict = dataclasses.field(default_factory=dict)
    recipe_stats: dict | None = None      # paper recipe: RGB mean/std/covariance, PCA, for logging
    mean_image: np.ndarray | None = None  # paper recipe with pixel_mean: (stored, stored, 3) float32
    test_ten_crop: tf.data.Dataset | None = None  # paper recipe with ten_crop: images only, 10 views
                                          # per test image (batches of 10*B), in `test_labels` order

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

def enable_op_determinism() -> None:
    """TensorFlow's deterministic mode (`--deterministic`): tf.data and TF ops give the same results
    from the same seeds (TF ops without a deterministic kernel raise instead of running)."""
    tf.config.experimental.enable_op_determinism()


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

    paper = cfg.recipe == "paper"
    if paper and cfg.stored_size < image_size:
        raise DataError(f"the paper recipe crops {image_size}x{image_size} inputs from images stored at "
                        f"{cfg.stored_size}x{cfg.stored_size}: pass --stored-size {max(256, image_size)} "
                        f"(or at least {image_size}), or a smaller --image-size.")
    # Files are decoded to squares of `side` px: the stored size of the paper recipe, else the input size.
    side = cfg.stored_size if paper else image_size
    policy = "shorter_side_crop" if paper else "squash"
    sources = dict(policy=policy, max_bytes=cfg.max_memory_mb * 2 ** 20)
    if cfg.dataset == "synthetic":
        raw = _synthetic(cfg, side)
    elif cfg.dataset == "cifar10":
        raw = _cifar10(cfg, verbose, side=side, **sources)
    else:
        root = resolve_data_dir(cfg.data_dir)
        if root is None:
            raise DataError("dataset 'folder' needs a folder: pass --data-dir PATH (class sub-folders, "
                            "or train/ and test/ each with class sub-folders) or set "
                            f"${DATA_DIR_ENV}.")
        raw = _from_dir(root, side, verbose, cfg.split_seed, cifar=False, **sources)

    train_idx, val_idx, x_val, y_val = _split(raw, cfg)
    if cfg.test_limit is not None and cfg.test_limit < len(raw.y_test):
        # A stratified subset of the test set, for runs where scoring all of it costs too much (the
        # 10-crop test of the paper recipe runs the network 10 times per image).
        keep, _ = _stratified(np.arange(len(raw.y_test)), raw.y_test, len(raw.y_test) - cfg.test_limit,
                              cfg.split_seed, "test_limit")
        keep = np.sort(keep)
        raw = dataclasses.replace(raw, x_test=raw.x_test[keep], y_test=raw.y_test[keep])
    if paper or isinstance(raw.x_train, _Images):
        # The paper recipe, and streamed sources of either recipe (see "Recipes" below).
        return _recipe_data(raw, train_idx, val_idx, x_val, y_val, cfg, image_size, batch_size, seed,
                            verbose)
    x_train, y_train = raw.x_train[train_idx], raw.y_train[train_idx]
    if x_val is None:
        x_val, y_val = raw.x_train[val_idx], raw.y_train[val_idx]
    mean, std = _channel_stats(x_train)

    digest = _hash_json({
        "data": raw.identity, "image_size": image_size, "val_fraction": cfg.val_fraction,
        "split_seed": cfg.split_seed, "train_limit": cfg.train_limit,
        **({"test_limit": cfg.test_limit} if cfg.test_limit is not None else {}),
    })
    return Data(
        train=_pipeline(x_train, y_train, image_size, batch_size, train=True, augment=cfg.augment,
                        seed=seed, crop=cfg.random_crop, flip=cfg.random_flip),
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
        preprocessing=_preprocessing("simple", image_size, image_size, False, native_size=x_train.shape[1]),
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


def random_crop_flip(images: tf.Tensor, seed: tf.Tensor, pad: int | None = None, *, crop: bool = True,
                     flip: bool = True) -> tf.Tensor:
    """Random translation by up to `pad` pixels each way (as a random crop of the image padded by
    reflection) and random horizontal flip, drawn independently for every image of `images`
    (B,H,W,C, any dtype; H, W static). `crop=False` / `flip=False` leave that part out.

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
    if not crop:
        offsets = tf.zeros_like(offsets)
    flip = tf.logical_and(tf.random.stateless_uniform([batch], flip_seed) < 0.5, flip)

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
              augment: bool = False, seed: int = 0, crop: bool = True, flip: bool = True) -> tf.data.Dataset:
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

    if train and augment and (crop or flip):
        # Stateless ops with a seed per batch from a seeded stream: epochs differ from one another,
        # yet a run with the same `seed` sees the same augmented batches.
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds))

        def load(idx, batch_seed):
            batch_images, batch_labels = gather(idx)
            # Augment at stored resolution (4 px of a 32-px CIFAR image), before any upscaling.
            return finish(random_crop_flip(batch_images, batch_seed, crop=crop, flip=flip)), batch_labels
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
# Recipes: decoding policies, crops, fancy PCA, statistics, streamed sources
# ---------------------------------------------------------------------------------------------

# How a file becomes a square of `side` pixels: "squash" resizes it ignoring the aspect ratio (the
# simple recipe); "shorter_side_crop" rescales its shorter side to `side` and keeps the central square.
RESIZE_POLICIES = ("squash", "shorter_side_crop")
# The order of the paper's ten test views in `ten_crops` (and in predict's output).
TEN_CROP_VIEWS = ("top_left", "top_right", "bottom_left", "bottom_right", "center",
                  "top_left_flipped", "top_right_flipped", "bottom_left_flipped", "bottom_right_flipped",
                  "center_flipped")
# Images per step of the statistics pass.
_STATS_BATCH = 256


def _preprocessing(recipe: str, stored_size: int, image_size: int, pixel_mean: bool,
                   native_size: int | None = None) -> dict:
    """`Data.preprocessing`: what predict.py applies to a file (logged in data.json and with the model).

    `native_size`: the images were held at this side (CIFAR's 32 px) and resized to stored_size per
    batch in float; predict then squashes a file to native_size first and resizes it the same way.
    """
    spec = {"recipe": recipe, "resize": "shorter_side_crop" if recipe == "paper" else "squash",
            "stored_size": int(stored_size), "image_size": int(image_size), "pixel_mean": bool(pixel_mean)}
    if native_size is not None and native_size != stored_size:
        spec["native_size"] = int(native_size)
    return spec


def decode_image(contents: tf.Tensor, size: int, policy: str = "squash") -> tf.Tensor:
    """JPEG/PNG/GIF/BMP bytes -> uint8 RGB (size, size, 3). Grayscale, alpha and CMYK JPEGs come out RGB.

    `policy` (RESIZE_POLICIES): "squash" resizes to size x size whatever the aspect ratio;
    "shorter_side_crop" is the paper's "rescaled the image such that the shorter side was of length
    256, and then cropped out the central 256x256 patch". Bilinear, antialiased when shrinking,
    rounded to uint8. Bytes that are not an image raise (in tf.data: `ignore_errors` drops them).
    """
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"policy must be one of {RESIZE_POLICIES}; got {policy!r}")
    image = tf.io.decode_image(contents, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    shape = tf.shape(image)
    height, width = shape[0], shape[1]

    def rounded(resized):
        return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)

    if policy == "squash":
        def resize():
            return rounded(tf.image.resize(image, [size, size], antialias=True))

        same = tf.logical_and(tf.equal(height, size), tf.equal(width, size))
        return tf.cond(same, lambda: tf.ensure_shape(image, [size, size, 3]), resize)

    shorter = tf.minimum(height, width)

    def rescale():
        scale = tf.cast(size, tf.float64) / tf.cast(shorter, tf.float64)
        new = tf.cast(tf.round(tf.cast(tf.stack([height, width]), tf.float64) * scale), tf.int32)
        return rounded(tf.image.resize(image, tf.maximum(new, size), antialias=True))

    resized = tf.cond(tf.equal(shorter, size), lambda: image, rescale)
    top = (tf.shape(resized)[0] - size) // 2
    left = (tf.shape(resized)[1] - size) // 2
    return tf.ensure_shape(resized[top:top + size, left:left + size], [size, size, 3])


def center_crop(images: tf.Tensor, size: int) -> tf.Tensor:
    """The central size x size window of every image of a batch (B,H,W,C; H, W static)."""
    images = tf.convert_to_tensor(images)
    top, left = (images.shape[1] - size) // 2, (images.shape[2] - size) // 2
    return images[:, top:top + size, left:left + size]


def random_crops(images: tf.Tensor, size: int, seed: tf.Tensor, *, crop: bool = True,
                 flip: bool = True) -> tf.Tensor:
    """A size x size window of every image of a batch (B,H,W,C; H, W static), at a position drawn
    uniformly over all (H-size+1)*(W-size+1) positions (`crop=False`: the centre), reflected
    horizontally with probability 1/2 (`flip`), independently per image. Stateless in `seed`.

    The paper's training crops: "extracting random 224x224 patches (and their horizontal
    reflections) from the 256x256 images".
    """
    images = tf.convert_to_tensor(images)
    seed = tf.cast(seed, tf.int64)
    batch = tf.shape(images)[0]
    height, width, channels = images.shape[1], images.shape[2], images.shape[3]
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    if crop:
        u = tf.random.stateless_uniform([batch, 2], crop_seed)
        top = tf.minimum(tf.cast(u[:, 0] * (height - size + 1), tf.int32), height - size)
        left = tf.minimum(tf.cast(u[:, 1] * (width - size + 1), tf.int32), width - size)
    else:
        top = tf.fill([batch], (height - size) // 2)
        left = tf.fill([batch], (width - size) // 2)
    mirrored = tf.logical_and(tf.random.stateless_uniform([batch], flip_seed) < 0.5, flip)
    steps = tf.range(size)
    rows = top[:, None] + steps[None, :]
    cols = left[:, None] + tf.where(mirrored[:, None], size - 1 - steps[None, :], steps[None, :])
    # One gather for the whole batch, as in random_crop_flip.
    flat = tf.range(batch)[:, None, None] * (height * width) + rows[:, :, None] * width + cols[:, None, :]
    return tf.gather(tf.reshape(images, [-1, channels]), flat)


def ten_crops(images: tf.Tensor, size: int) -> tf.Tensor:
    """The paper's ten test views of every image of a batch: (B,H,W,C) -> (B,10,size,size,C).

    "the four corner patches and the center patch as well as their horizontal reflections", in the
    order of TEN_CROP_VIEWS: top-left, top-right, bottom-left, bottom-right, centre, then the same five
    mirrored (each patch reflected left-right).
    """
    images = tf.convert_to_tensor(images)
    height, width = images.shape[1], images.shape[2]
    corners = [(0, 0), (0, width - size), (height - size, 0), (height - size, width - size),
               ((height - size) // 2, (width - size) // 2)]
    views = [images[:, top:top + size, left:left + size] for top, left in corners]
    views += [tf.reverse(view, axis=[2]) for view in views]
    return tf.stack(views, axis=1)


def pca_color_shift(images: tf.Tensor, seed: tf.Tensor, eigenvalues, eigenvectors,
                    std: float = 0.1) -> tf.Tensor:
    """The paper's "fancy PCA" colour augmentation on a batch of float images in 0..255 units.

    Every pixel of image b gets the same offset 255 * sum_i alpha_bi * lambda_i * p_i, with
    alpha_bi ~ N(0, std) drawn once per image and (p_i, lambda_i) the eigenvectors (columns of
    `eigenvectors`) and eigenvalues of the 3x3 covariance of the training set's RGB values in [0, 1]
    units (RGBStats.eigenvalues). Stateless in `seed`.
    """
    images = tf.convert_to_tensor(images)
    alpha = tf.random.stateless_normal([tf.shape(images)[0], 3], tf.cast(seed, tf.int64), stddev=std)
    weights = alpha * tf.constant(np.asarray(eigenvalues, np.float32))[None, :]
    shift = 255.0 * tf.matmul(weights, tf.constant(np.asarray(eigenvectors, np.float32)), transpose_b=True)
    return images + tf.cast(shift, images.dtype)[:, None, None, :]


def model_views(images: tf.Tensor, *, image_size: int, stored_size: int, mean_image=None,
                crops: str = "center") -> tf.Tensor:
    """What the model sees at evaluation, from a batch of stored images (B,H,W,3), any dtype.

    The images are resized to stored_size if they have another size (CIFAR's 32 px), the mean image is
    subtracted (paper recipe with pixel_mean), then `crops` "center" gives (B,S,S,3) and "ten" gives
    (B*10,S,S,3): the ten views of image 0, then those of image 1, ... (S = image_size). float32.
    """
    x = _to_stored(images, stored_size, mean_image)
    if crops == "center":
        return center_crop(x, image_size)
    if crops != "ten":
        raise ValueError(f"crops must be 'center' or 'ten'; got {crops!r}")
    return tf.reshape(ten_crops(x, image_size), [-1, image_size, image_size, x.shape[-1]])


def _to_stored(images: tf.Tensor, stored_size: int, mean_image=None) -> tf.Tensor:
    x = tf.cast(images, tf.float32)
    side = x.shape[1]
    if side != stored_size:
        # Antialiasing only matters when shrinking (as in `_pipeline`).
        x = tf.image.resize(x, [stored_size, stored_size], antialias=stored_size < side)
    if mean_image is not None:
        x = x - tf.constant(np.asarray(mean_image, np.float32))
    return x


@dataclasses.dataclass
class RGBStats:
    """Statistics of the training pixels (0..255 units unless said otherwise)."""

    images: int
    pixels: int
    mean: np.ndarray            # (3,) per-channel mean
    std: np.ndarray             # (3,) per-channel population std
    covariance: np.ndarray      # (3, 3) population covariance of the RGB values
    eigenvalues: np.ndarray     # (3,) of covariance / 255**2 (RGB in [0, 1]), largest first
    eigenvectors: np.ndarray    # (3, 3) unit columns p_i matching `eigenvalues`, sign: sum(p_i) >= 0
    mean_image: np.ndarray | None = None    # (H, W, 3) per-pixel mean, when asked for
    residual_std: np.ndarray | None = None  # (3,) per-channel std after subtracting mean_image

    def to_json(self) -> dict:
        out = {"images": self.images, "pixels": self.pixels, "mean_rgb": self.mean.tolist(),
               "std_rgb": self.std.tolist(), "covariance_rgb": self.covariance.tolist(),
               "pca_eigenvalues": self.eigenvalues.tolist(),
               "pca_eigenvectors_columns": self.eigenvectors.tolist()}
        if self.residual_std is not None:
            out["std_rgb_after_mean_image"] = self.residual_std.tolist()
        return out


class _Moments:
    """Running float64 sums over batches of uint8 RGB images: one pass gives every statistic."""

    def __init__(self, pixel_mean: bool = False):
        self.images = 0
        self.pixels = 0
        self.total = np.zeros(3)
        self.products = np.zeros((3, 3))
        self.pixel_mean = pixel_mean
        self.pixel_total: np.ndarray | None = None

    def add(self, batch: np.ndarray) -> None:
        batch = np.asarray(batch)
        flat = batch.reshape(-1, 3)
        for start in range(0, len(flat), 1 << 20):   # 24 MB of float64 at a time
            chunk = flat[start:start + (1 << 20)].astype(np.float64)
            self.total += chunk.sum(axis=0)
            self.products += chunk.T @ chunk
        self.images += len(batch)
        self.pixels += len(flat)
        if self.pixel_mean:
            summed = batch.sum(axis=0, dtype=np.float64)
            self.pixel_total = summed if self.pixel_total is None else self.pixel_total + summed

    def arrays(self) -> dict:
        out = {"counts": np.array([self.images, self.pixels], np.int64), "total": self.total,
               "products": self.products}
        if self.pixel_total is not None:
            out["pixel_total"] = self.pixel_total
        return out

    @classmethod
    def from_arrays(cls, arrays) -> "_Moments":
        moments = cls("pixel_total" in arrays)
        moments.images, moments.pixels = (int(v) for v in arrays["counts"])
        moments.total, moments.products = arrays["total"], arrays["products"]
        moments.pixel_total = arrays["pixel_total"] if "pixel_total" in arrays else None
        return moments

    def stats(self) -> RGBStats:
        if not self.pixels:
            raise DataError("no training images to compute the colour statistics on.")
        mean = self.total / self.pixels
        covariance = self.products / self.pixels - np.outer(mean, mean)
        eigenvalues, eigenvectors = np.linalg.eigh(covariance / 255.0 ** 2)
        order = np.argsort(eigenvalues)[::-1]
        eigenvalues, eigenvectors = np.maximum(eigenvalues[order], 0.0), eigenvectors[:, order]
        eigenvectors = eigenvectors * np.where(eigenvectors.sum(axis=0) < 0, -1.0, 1.0)
        stats = RGBStats(self.images, self.pixels, mean, np.sqrt(np.maximum(np.diag(covariance), 0.0)),
                         covariance, eigenvalues, eigenvectors)
        if self.pixel_total is not None:
            stats.mean_image = self.pixel_total / self.images
            # sum over pixels of (x - mu_p)^2 = sum x^2 - images * sum_p mu_p^2, per channel
            second = np.diag(self.products) / self.pixels - np.mean(np.square(stats.mean_image), axis=(0, 1))
            stats.residual_std = np.sqrt(np.maximum(second, 0.0))
        return stats


def rgb_statistics(batches, *, pixel_mean: bool = False) -> RGBStats:
    """RGBStats of an iterable of uint8 (B,H,W,3) batches (float64 sums, one pass)."""
    moments = _Moments(pixel_mean)
    for batch in batches:
        moments.add(batch)
    return moments.stats()


class _Images(abc.ABC):
    """A split's images, decoded on demand: in memory (_ArrayImages), from files (_FileImages) or from
    TFRecord shards (prepare.RecordImages). `images[index]` (index array or boolean mask) is a subset,
    in the order given; `batches` yields (uint8 (B, side, side, 3), int32 (B,)) in that order, or
    reshuffled every epoch."""

    labels: np.ndarray
    side: int

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index) -> "_Images":
        return self._subset(np.arange(len(self))[index])

    @abc.abstractmethod
    def _subset(self, index: np.ndarray) -> "_Images":
        """The images at `index`, as the same kind of source."""

    @abc.abstractmethod
    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> tf.data.Dataset:
        """(uint8 images, int32 labels) batches in index order, or reshuffled every epoch."""

    def numpy_batches(self, batch_size: int = _STATS_BATCH):
        for images, _ in self.batches(batch_size).as_numpy_iterator():
            yield images


class _ArrayImages(_Images):
    def __init__(self, x: np.ndarray, labels: np.ndarray):
        self.x, self.labels, self.side = x, np.asarray(labels, np.int32), x.shape[1]
        self._variables = None

    def _subset(self, index):
        return _ArrayImages(self.x[index], self.labels[index])

    def batches(self, batch_size, *, shuffle=False, seed=0):
        # Index batches gathered from CPU variables, as in `_pipeline` (one copy shared by every
        # pipeline of this split, e.g. the centre-crop and the 10-crop test sets).
        if self._variables is None:
            with tf.device("/CPU:0"):
                self._variables = (tf.Variable(self.x, trainable=False),
                                   tf.Variable(self.labels, trainable=False))
        images, labels = self._variables
        ds = tf.data.Dataset.range(len(self))
        if shuffle:
            ds = ds.shuffle(max(len(self), 1), seed=seed, reshuffle_each_iteration=True)
        return ds.batch(batch_size).map(lambda idx: (tf.gather(images, idx), tf.gather(labels, idx)),
                                        num_parallel_calls=_AUTOTUNE, deterministic=True)

    def numpy_batches(self, batch_size=_STATS_BATCH):
        for start in range(0, len(self), batch_size):
            yield self.x[start:start + batch_size]


class _FileImages(_Images):
    """Image files decoded in parallel every time they are read (files known to decode: see _folder)."""

    def __init__(self, paths, labels, side: int, policy: str):
        self.paths = np.asarray(paths, dtype=str)
        self.labels, self.side, self.policy = np.asarray(labels, np.int32), side, policy

    def _subset(self, index):
        return _FileImages(self.paths[index], self.labels[index], self.side, self.policy)

    def batches(self, batch_size, *, shuffle=False, seed=0):
        side, policy = self.side, self.policy
        ds = tf.data.Dataset.from_tensor_slices((self.paths, self.labels))
        if shuffle:   # a buffer of file names, not images: cheap even for ImageNet's 1.28 million
            ds = ds.shuffle(max(len(self), 1), seed=seed, reshuffle_each_iteration=True)
        ds = ds.map(lambda path, label: (decode_image(tf.io.read_file(path), side, policy), label),
                    num_parallel_calls=_AUTOTUNE, deterministic=True)
        return ds.batch(batch_size)


def _as_images(x, labels) -> _Images:
    return x if isinstance(x, _Images) else _ArrayImages(x, labels)


def _statistics_cached(images: _Images, key: str, pixel_mean: bool, verbose: bool) -> RGBStats:
    """RGBStats of `images`, computed once and kept in the cache under `key`."""
    cache_file = cache_root() / "stats" / f"{key}.npz"
    if cache_file.is_file():
        try:
            with np.load(cache_file) as cached:
                return _Moments.from_arrays(dict(cached)).stats()
        except Exception:  # noqa: BLE001 - a damaged cache is only a reason to compute again
            pass
    start = time.perf_counter()
    moments = _Moments(pixel_mean)
    for batch in images.numpy_batches():
        moments.add(batch)
    if verbose and len(images) >= PROGRESS_MIN_FILES:
        print(f"Colour statistics of {len(images)} training images in {time.perf_counter() - start:.1f} s "
              "(cached afterwards).", flush=True)
    _save_npz(cache_file, moments.arrays())
    return moments.stats()


def _save_npz(path: Path, arrays: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Temp file, then rename: a run killed mid-write leaves no truncated cache behind.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".npz", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError as err:
        warnings.warn(f"could not write the cache file {str(path)!r} ({err}); it will be computed again "
                      f"next time. Set ${CACHE_ENV} to a writable folder.", stacklevel=3)


def _recipe_data(raw: _Raw, train_idx, val_idx, x_val, y_val, cfg: DataConfig, image_size: int,
                 batch_size: int, seed: int, verbose: bool) -> Data:
    """`Data` for the paper recipe, and for streamed sources of the simple recipe."""
    paper = cfg.recipe == "paper"
    pixel_mean = paper and cfg.pixel_mean
    stored = cfg.stored_size if paper else image_size
    source = _as_images(raw.x_train, raw.y_train)
    train = source[train_idx]
    val = source[val_idx] if x_val is None else _as_images(x_val, y_val)
    test = _as_images(raw.x_test, raw.y_test)

    stats = _statistics_cached(train, _hash_json({
        "data": raw.identity, "train": hashlib.sha256(np.asarray(train_idx, np.int64).tobytes()).hexdigest(),
        "side": train.side, "pixel_mean": pixel_mean}), pixel_mean, verbose)
    mean, std, mean_image = stats.mean, stats.std, None
    if pixel_mean:
        mean_image = stats.mean_image.astype(np.float32)
        if mean_image.shape[0] != stored:   # CIFAR: the mean of the resized images is the resized mean
            mean_image = _to_stored(mean_image[None], stored).numpy()[0]
        # The model's first layer then only scales: the mean is already gone.
        mean, std = np.zeros(3), stats.residual_std

    views = dict(image_size=image_size, stored_size=stored, mean_image=mean_image)

    def evaluation(images: _Images) -> tf.data.Dataset:
        return images.batches(batch_size).map(lambda x, y: (model_views(x, **views), y),
                                              num_parallel_calls=_AUTOTUNE).prefetch(_AUTOTUNE)

    augment = cfg.augment and (cfg.random_crop or cfg.random_flip or (paper and cfg.pca_color))
    train_ds = train.batches(batch_size, shuffle=True, seed=seed)
    if augment:
        # A seed per batch from a seeded stream, as in `_pipeline`.
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)

        def augmented(batch, batch_seed):
            x, y = batch
            crop_seed, color_seed = tf.unstack(tf.random.experimental.stateless_split(
                tf.cast(batch_seed, tf.int64), 2))
            if not paper:   # streamed simple recipe: the images are already at the input size
                return tf.cast(random_crop_flip(x, batch_seed, crop=cfg.random_crop, flip=cfg.random_flip),
                               tf.float32), y
            x = random_crops(_to_stored(x, stored, mean_image), image_size, crop_seed,
                             crop=cfg.random_crop, flip=cfg.random_flip)
            if cfg.pca_color:
                x = pca_color_shift(x, color_seed, stats.eigenvalues, stats.eigenvectors, cfg.pca_std)
            return x, y

        train_ds = tf.data.Dataset.zip((train_ds, seeds)).map(augmented, num_parallel_calls=_AUTOTUNE,
                                                              deterministic=True).prefetch(_AUTOTUNE)
    else:
        train_ds = train_ds.map(lambda x, y: (model_views(x, **views), y), num_parallel_calls=_AUTOTUNE,
                                deterministic=True).prefetch(_AUTOTUNE)

    test_ten_crop = None
    if paper and cfg.ten_crop:
        # ~batch_size crops per batch: 10 views of batch_size // 10 images.
        test_ten_crop = (test.batches(max(1, batch_size // 10))
                         .map(lambda x, y: model_views(x, crops="ten", **views), num_parallel_calls=_AUTOTUNE)
                         .prefetch(_AUTOTUNE))

    recipe_stats = None
    if paper:
        recipe_stats = {
            "recipe": "paper", "stored_size": stored, "image_size": image_size,
            "computed_at_side": train.side,   # < stored_size: on the native pixels (CIFAR's 32 px)
            "streamed": isinstance(raw.x_train, _Images),
            **stats.to_json(),
            "pixel_mean": pixel_mean,
            "augmentation": {"augment": cfg.augment, "random_crop": cfg.random_crop,
                             "random_flip": cfg.random_flip, "pca_color": cfg.pca_color,
                             "pca_std": cfg.pca_std},
            "pca_shift": "255 * sum_i alpha_i * pca_eigenvalues[i] * pca_eigenvectors_columns[:, i], "
                         "alpha_i ~ N(0, pca_std) per image; eigen-decomposition of covariance_rgb / 255^2",
            "ten_crop": cfg.ten_crop,
        }
    digest = _hash_json({
        "data": raw.identity, "image_size": image_size, "val_fraction": cfg.val_fraction,
        "split_seed": cfg.split_seed, "train_limit": cfg.train_limit,
        **({"test_limit": cfg.test_limit} if cfg.test_limit is not None else {}),
        **({"recipe": "paper", "stored_size": stored, "pixel_mean": pixel_mean} if paper else {}),
    })
    return Data(
        train=train_ds,
        val=evaluation(val),
        test=evaluation(test),
        test_labels=test.labels.astype(np.int32),
        class_names=list(raw.class_names),
        image_size=image_size,
        batch_size=batch_size,
        counts={"train": len(train), "val": len(val), "test": len(test), "skipped": raw.skipped},
        mean=[float(v) for v in mean],
        std=[float(v) if v > 0 else 1.0 for v in std],
        source=raw.source,
        digest=digest,
        preprocessing=_preprocessing(cfg.recipe, stored, image_size, pixel_mean, native_size=train.side),
        recipe_stats=recipe_stats,
        mean_image=mean_image,
        test_ten_crop=test_ten_crop,
    )


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


def _cifar10(cfg: DataConfig, verbose: bool, *, side: int | None = None, policy: str = "squash",
             max_bytes: int | None = None) -> _Raw:
    root = resolve_data_dir(cfg.data_dir)
    if root is not None:
        # Image folders stay at CIFAR's native 32 px in memory (resized per batch); TFRecord shards
        # are decoded straight to `side` with `policy`.
        return _from_dir(root, CIFAR_SIZE, verbose, cfg.split_seed, cifar=True, max_bytes=max_bytes,
                         record_side=side, record_policy=policy)
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


def _from_dir(root: Path, image_size: int, verbose: bool, split_seed: int, *, cifar: bool,
              policy: str = "squash", max_bytes: int | None = None, record_side: int | None = None,
              record_policy: str | None = None) -> _Raw:
    from . import prepare   # TFRecord shards written by `alexnet-keras prepare` (imports this module)

    if prepare.is_prepared(root):
        return prepare.load_prepared(root, record_side or image_size, record_policy or policy, split_seed)
    pickles = _find_cifar_pickles(root)
    if pickles is not None:
        return _cifar_pickles(pickles)
    return _folder(root, image_size, verbose, _layout_hint(cifar), split_seed, policy=policy,
                   max_bytes=max_bytes)


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


def _folder_listing(root: Path, fix_hint: str):
    """(layout {split: folder}, class names, files relative to `root`, their labels, their splits)."""
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
    return layout, class_names, files, labels, splits


def _folder(root: Path, image_size: int, verbose: bool, fix_hint: str, split_seed: int, *,
            policy: str = "squash", max_bytes: int | None = None) -> _Raw:
    layout, class_names, files, labels, splits = _folder_listing(root, fix_hint)
    # Decoded into memory (and cached as .npz) unless that would take more than `max_bytes`: then the
    # files are streamed, decoded every epoch, after a cached pass that finds the unreadable ones.
    stream = max_bytes is not None and len(files) * image_size * image_size * 3 > max_bytes
    if stream:
        _, good, sizes = _decode_cached(root, files, image_size, verbose, policy=policy, keep=False)
        images = _FileImages([os.path.join(root, files[i]) for i in good],
                             np.asarray(labels, dtype=np.int32)[good], image_size, policy)
    else:
        images, good, sizes = _decode_cached(root, files, image_size, verbose, policy=policy)
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
                           "carved_test": "test" not in by_split,
                           **({"policy": policy} if policy != "squash" else {})})
    return _Raw(x_train, y_train, x_test, y_test, class_names, str(root), identity, len(skipped),
                x_val, y_val)


def _decode_cached(root: Path, files: list[str], size: int, verbose: bool, *, policy: str = "squash",
                   keep: bool = True):
    """(uint8 images (n_good, size, size, 3), indices into `files` (relative to `root`) of those
    that decoded, file sizes), from the disk cache when the same files were decoded at this size.
    `keep=False` (streamed folders) only finds the readable files: images is None."""
    paths = [os.path.join(root, f) for f in files]
    stats = [os.stat(p) for p in paths]
    sizes = [s.st_size for s in stats]
    key = _hash_json({"files": files,
                      "sizes": sizes,
                      "mtimes": [s.st_mtime_ns for s in stats], "size": size,
                      **({"policy": policy} if policy != "squash" else {}),
                      **({"scan": True} if not keep else {})})
    cache_file = cache_root() / "decoded" / f"{key}.npz"
    if cache_file.is_file():
        try:
            with np.load(cache_file) as cached:
                good = cached["good"]
                if not keep:
                    return None, good, sizes
                images = cached["images"]
            if images.shape[1:] == (size, size, 3) and len(images) == len(good):
                return images, good, sizes
        except Exception:  # noqa: BLE001 - a damaged cache is only a reason to decode again
            pass
    images, good = _decode_files(paths, size, verbose, policy=policy, keep=keep)
    _save_npz(cache_file, {"images": images, "good": good} if keep else {"good": good})
    return images, good, sizes


def _decode_files(files: list[str], size: int, verbose: bool, *, policy: str = "squash", keep: bool = True):
    """Decode and resize every file with tf.data; files that fail to decode are left out.
    `keep=False`: only find which files decode (images is None)."""
    start = time.perf_counter()
    n = len(files)

    def decode(index, path):
        image = decode_image(tf.io.read_file(path), size, policy)
        if not keep:   # a statistic of the image keeps the decoding from being optimised away
            return index, tf.reduce_max(image)
        return index, image

    # An error inside `decode` drops that element (ignore_errors), so the indices that come out are
    # exactly the readable files; order is free, which lets the parallel map run unordered.
    ds = (tf.data.Dataset.from_tensor_slices((np.arange(n, dtype=np.int64), files))
          .map(decode, num_parallel_calls=_AUTOTUNE, deterministic=False)
          .ignore_errors()
          .batch(1024)
          .prefetch(2))
    images = np.empty((n, size, size, 3), dtype=np.uint8) if keep else None
    ok = np.zeros(n, dtype=bool)
    bar = None
    if verbose and n >= PROGRESS_MIN_FILES:
        print(f"Decoding {n} files at {size}x{size} (cached afterwards)...", flush=True)
        bar = keras.utils.Progbar(n, unit_name="file", verbose=1 if sys.stdout.isatty() else 2)
    done = 0
    for index, batch in ds.as_numpy_iterator():
        if keep:
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
    return (images[good] if keep else None), good


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
