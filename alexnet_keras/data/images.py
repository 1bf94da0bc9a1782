"""A split's images (`Images`) in memory or in files (shards: tfrecord.py); `SourceImages`: a source's splits."""

import copy
import dataclasses

import numpy as np
import tensorflow as tf

from .decode import decode_image
from .files import DataError


class Images:
    """A split's images; `images[index]` (indices or a mask) is a subset in that order. `batch_keys`: batches of
    keys (indices in memory, images decoded from files or shards), reshuffled each epoch if `shuffle`; `fetch(keys)`
    turns one into (uint8 (B, side, side, 3), int32 (B,)) inside the tf.data map that transforms them."""

    labels: np.ndarray
    side: int
    streamed = True   # decoded from disk every time they are read

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index) -> "Images":
        return self.subset(np.arange(len(self))[index])

    def fetch(self, keys):
        return keys["x"], keys["y"]


class ArrayImages(Images):
    """Rows of one uint8 array (N, side, side, 3) held in memory, shared by every subset (which holds row
    numbers, not a copy) and handed to TensorFlow at the first `fetch`: a variable captured by handle (a
    captured constant would be copied into each graph) that replaces the array, so it is held once."""

    streamed = False

    def __init__(self, x: np.ndarray, labels: np.ndarray):
        self.labels, self.side, self.rows = np.asarray(labels, np.int32), x.shape[1], np.arange(len(x))
        self.store = {"x": x}

    def subset(self, index):
        subset = copy.copy(self)   # the same store
        subset.labels, subset.rows = self.labels[index], self.rows[index]
        return subset

    def batch_keys(self, batch_size, *, shuffle=False, seed=0, deterministic=True):
        # Batches of (row, label): the shuffle buffer holds integers, not images.
        ds = tf.data.Dataset.from_tensor_slices({"x": self.rows, "y": self.labels})
        if shuffle:
            ds = ds.shuffle(max(len(self), 1), seed=seed, reshuffle_each_iteration=True)
        return ds.batch(batch_size)

    def fetch(self, keys):
        if "variable" not in self.store:   # eagerly: made inside the map's trace, the array would be a graph constant
            with tf.init_scope(), tf.device("/CPU:0"):
                self.store["variable"] = tf.Variable(self.store.pop("x"), trainable=False)
        return tf.gather(self.store["variable"], keys["x"]), keys["y"]


class FileImages(Images):
    """Image files decoded in parallel every time they are read (files known to decode: sources.py)."""

    def __init__(self, paths, labels, side: int, policy: str):
        self.paths = np.asarray(paths, dtype=object)   # str: 4 bytes per character of the longest, per subset
        self.labels, self.side, self.policy = np.asarray(labels, np.int32), side, policy

    def subset(self, index):
        return FileImages(self.paths[index], self.labels[index], self.side, self.policy)

    def batch_keys(self, batch_size, *, shuffle=False, seed=0, deterministic=True):
        side, policy = self.side, self.policy
        ds = tf.data.Dataset.from_tensor_slices((self.paths, self.labels))
        if shuffle:   # a buffer of file names, not images: cheap even for ImageNet's 1.28 million
            ds = ds.shuffle(max(len(self), 1), seed=seed, reshuffle_each_iteration=True)
        ds = ds.map(lambda path, label: {"x": decode_image(tf.io.read_file(path), side, policy), "y": label},
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
        return ds.batch(batch_size)


@dataclasses.dataclass
class SourceImages:
    """A source's splits; `val` only when it has its own (a folder's val/ beside train/ and test/)."""

    train: Images
    test: Images
    class_names: list[str]
    source: str               # where the images came from, for logs and MLflow
    identity: str             # hash of the source's content: the data half of `Data.digest`
    skipped: int = 0          # files under the source that were not used (unreadable, links, FIFOs)
    val: Images | None = None

    def __post_init__(self):
        for split, images in (("train", self.train), ("test", self.test), ("val", self.val)):
            if images is not None:
                check_labels(images.labels, len(self.class_names), f"the {split} split of {self.source!r}")


def check_labels(labels, num_classes: int, where: str) -> None:
    """Labels must be class indices 0..num_classes-1; a DataError saying which are not, and where."""
    labels = np.asarray(labels)
    if (bad := labels[(labels < 0) | (labels >= num_classes)]).size:
        raise DataError(f"{where} has labels outside 0..{num_classes - 1} ({num_classes} classes), e.g. "
                        f"{sorted(set(bad.tolist()))[:5]}. Check the label files (or the class list) of "
                        "the dataset.")
