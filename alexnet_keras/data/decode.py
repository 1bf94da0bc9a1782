"""Image files to pixels: `decode_image` (one file, shared by training, `prepare` and `predict`) and the
bulk decoding of a folder's files, cached on disk as arrays.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from .cache import cache_root, hash_json, load_npz, save_npz

RESIZE_POLICIES = ("squash", "shorter_side_crop")
# Above this many files, decoding shows a progress bar (below it, it takes about a second).
PROGRESS_MIN_FILES = 2000


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


def decode_cached(root: Path, files: list[str], size: int, verbose: bool, *, policy: str = "squash",
                  keep: bool = True, content_id: str | None = None):
    """(uint8 images (n_good, size, size, 3), indices into `files` (relative to `root`) of those
    that decoded, file sizes), from the disk cache when the same files were decoded at this size.

    The cache key holds the files' names, sizes and mtimes, and `content_id` (the sha256 of the
    archive they were extracted from, whose members may keep their sizes and mtimes across versions).
    `keep=False` (streamed folders) only finds the readable files: images is None.
    """
    paths = [os.path.join(root, f) for f in files]
    stats = [os.stat(p) for p in paths]
    sizes = [s.st_size for s in stats]
    key = hash_json({"files": files,
                     "sizes": sizes,
                     "mtimes": [s.st_mtime_ns for s in stats], "size": size,
                     **({"policy": policy} if policy != "squash" else {}),
                     **({"scan": True} if not keep else {}),
                     **({"archive_sha256": content_id} if content_id else {})})
    cache_file = cache_root() / "decoded" / f"{key}.npz"
    cached = load_npz(cache_file)
    if cached is not None and "good" in cached:
        good = cached["good"]
        if not keep:
            return None, good, sizes
        images = cached.get("images")
        if images is not None and images.shape[1:] == (size, size, 3) and len(images) == len(good):
            return images, good, sizes
    images, good = decode_files(paths, size, verbose, policy=policy, keep=keep)
    save_npz(cache_file, {"images": images, "good": good} if keep else {"good": good})
    return images, good, sizes


def decode_files(files: list[str], size: int, verbose: bool, *, policy: str = "squash", keep: bool = True):
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
    ds = (tf.data.Dataset.from_tensor_slices((np.arange(n, dtype=np.int64), np.asarray(files, str)))
          .map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
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
