"""Image files to pixels: `decode_image` (training, `prepare`, `predict`) and whole folders, cached as arrays."""

import os
import sys
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from .cache import cache_root, hash_json, load_npz, save_npz

RESIZE_POLICIES = ("squash", "shorter_side_crop")
PROGRESS_MIN_FILES = 2000   # fewer files decode in about a second: no progress bar


def progress_bar(n: int, what: str, verbose: bool):
    """A keras Progbar over `n` files (None when quiet or quick), after a line saying `what` runs."""
    if not verbose or n < PROGRESS_MIN_FILES:
        return None
    print(f"{what} {n} files...", flush=True)
    return keras.utils.Progbar(n, unit_name="file", verbose=1 if sys.stdout.isatty() else 2)


def decode_image(contents: tf.Tensor, size: int, policy: str = "squash") -> tf.Tensor:
    """JPEG/PNG/GIF/BMP bytes -> uint8 RGB (size, size, 3), antialiased; "squash" whatever the aspect ratio, or
    "shorter_side_crop": the paper's shorter side rescaled to `size`, central square kept. Non-images raise."""
    return resize_image(tf.io.decode_image(contents, channels=3, expand_animations=False), size, policy)


def resize_image(image: tf.Tensor, size: int, policy: str = "squash") -> tf.Tensor:
    """uint8 RGB of any size -> (size, size, 3) by `policy`, as `decode_image` does after decoding."""
    image.set_shape([None, None, 3])
    height, width = tf.shape(image)[0], tf.shape(image)[1]

    def rounded(resized):
        return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)

    if policy == "squash":
        same = tf.logical_and(tf.equal(height, size), tf.equal(width, size))
        return tf.cond(same, lambda: tf.ensure_shape(image, [size, size, 3]),
                       lambda: rounded(tf.image.resize(image, [size, size], antialias=True)))

    shorter = tf.minimum(height, width)

    def rescale():
        scale = tf.cast(size, tf.float64) / tf.cast(shorter, tf.float64)
        new = tf.cast(tf.round(tf.cast(tf.stack([height, width]), tf.float64) * scale), tf.int32)
        return rounded(tf.image.resize(image, tf.maximum(new, size), antialias=True))

    resized = tf.cond(tf.equal(shorter, size), lambda: image, rescale)
    top = (tf.shape(resized)[0] - size) // 2
    left = (tf.shape(resized)[1] - size) // 2
    return tf.ensure_shape(resized[top:top + size, left:left + size], [size, size, 3])


def decode_cached(root: Path, files: list[str], size: int, verbose: bool, *, policy: str = "squash",
                  keep: bool = True, content_id: str | None = None):
    """(uint8 images (n, size, size, 3), indices of the `files` that decode, file sizes), cached under their
    names, sizes, mtimes and `content_id` (the archive's sha256); `keep=False`: images None, cached for any size."""
    paths = [os.path.join(root, f) for f in files]
    # The two fields only: a stat_result per file takes ~0.7 KB (0.9 GB for ImageNet's 1.28 million files).
    sizes, mtimes = map(list, zip(*[(s.st_size, s.st_mtime_ns) for s in map(os.stat, paths)]))
    key = hash_json({"files": files, "sizes": sizes, "mtimes": mtimes,
                     "decoded": [size, policy] if keep else None, "archive_sha256": content_id})
    cache_file = cache_root() / "decoded" / f"{key}.npz"
    cached = load_npz(cache_file) or {}
    if "good" in cached and (not keep or "images" in cached):
        return cached.get("images"), cached["good"], sizes
    images, good = decode_files(paths, size, verbose, policy=policy, keep=keep)
    save_npz(cache_file, {"images": images, "good": good} if keep else {"good": good})
    return images, good, sizes


def decode_files(files: list[str], size: int, verbose: bool, *, policy: str = "squash", keep: bool = True):
    """(images: a row per file, zero where unreadable, or None without `keep`; indices of the files that decode)."""
    start, n = time.perf_counter(), len(files)

    def decode(index, path):   # without `keep`, not resized; a statistic keeps the decoding from being pruned
        if keep:
            return index, decode_image(tf.io.read_file(path), size, policy)
        return index, tf.reduce_max(tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False))

    # An error inside `decode` drops that element (ignore_errors), so the indices that come out are
    # exactly the readable files; order is free, which lets the parallel map run unordered.
    ds = (tf.data.Dataset.from_tensor_slices((np.arange(n, dtype=np.int64), np.asarray(files, object)))
          .map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
          .ignore_errors().batch(1024).prefetch(2))
    images = np.zeros((n, size, size, 3), dtype=np.uint8) if keep else None
    ok = np.zeros(n, dtype=bool)
    bar = progress_bar(n, f"Decoding at {size}x{size} (cached afterwards):", verbose)
    for index, batch in ds.as_numpy_iterator():
        if keep:
            images[index] = batch
        ok[index] = True
        if bar is not None:
            bar.add(len(index))
    good = np.flatnonzero(ok)
    if bar is not None:   # skipped files never arrive: close the bar anyway
        bar.update(n, finalize=True)
        print(f"Decoded {len(good)} of {n} files in {time.perf_counter() - start:.1f} s.", flush=True)
    return images, good
