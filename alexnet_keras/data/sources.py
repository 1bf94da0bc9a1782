"""Where images come from: `read_source` turns a `DataConfig` into `SourceImages` (docs/data.md)."""

import codecs
import hashlib
import os
import pickle
import warnings
from pathlib import Path

import keras
import numpy as np

from . import tfrecord
from .archives import DATA_DIR_ENV, locate_data_dir
from .cache import hash_json
from .decode import decode_cached
from .files import CIFAR_PICKLE_DIR, LAYOUT_HINT, DataError, Walk, folder_layout, listed
from .images import ArrayImages, FileImages, SourceImages, check_labels
from .split import carve_test

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_SIZE = 32


def read_source(cfg, side: int, policy: str, verbose: bool) -> SourceImages:
    """The images `cfg` (a DataConfig) names, files decoded to squares of `side` px (CIFAR-10 kept at 32 px)."""
    if cfg.dataset == "synthetic":
        return synthetic(cfg.synthetic_samples, cfg.synthetic_classes, side, cfg.split_seed)
    located = locate_data_dir(cfg.data_dir)
    cifar = cfg.dataset == "cifar10"
    if located is None and cifar:
        return cifar10_download()
    if located is None:
        raise DataError("dataset 'folder' needs a folder: pass --data-dir PATH (class sub-folders, "
                        f"or train/ and test/ each with class sub-folders) or set ${DATA_DIR_ENV}.")
    root, content_id = located.path, located.archive_sha256
    if tfrecord.is_prepared(root):
        source = tfrecord.load_prepared(root, side, policy, cfg.split_seed)
    elif pickles := next((folder for folder in (root, root / CIFAR_PICKLE_DIR)
                          if (folder / "data_batch_1").is_file() and (folder / "test_batch").is_file()), None):
        return cifar_pickles(pickles)     # identified by content already
    else:
        hint = LAYOUT_HINT + (f", or CIFAR-10's {CIFAR_PICKLE_DIR}/ (data_batch_1..5, test_batch, batches.meta)."
                              if cifar else ".")
        source = image_folder(root, CIFAR_SIZE if cifar else side, verbose, hint, cfg.split_seed,
                              policy="squash" if cifar else policy, max_bytes=cfg.max_memory_mb * 2 ** 20,
                              content_id=content_id)
    if content_id:   # an archive's members may keep their names, sizes and mtimes across its versions
        source.identity = hash_json({"identity": source.identity, "archive_sha256": content_id})
    return source


def in_memory(x_train, y_train, x_test, y_test, class_names, source: str, kind: str) -> SourceImages:
    """Splits held as arrays, identified by their content."""
    h = hashlib.sha256(kind.encode())
    for array in (x_train, y_train, x_test, y_test):
        h.update(str(array.shape).encode())
        h.update(np.ascontiguousarray(array).data)
    return SourceImages(ArrayImages(x_train, y_train), ArrayImages(x_test, y_test), list(class_names), source,
                        h.hexdigest()[:16])


def synthetic(samples: int, classes: int, image_size: int, seed: int) -> SourceImages:
    # A colour and a stripe pattern per class plus per-pixel noise: a small CNN separates the classes
    # within a couple of epochs, and the noise keeps every image distinct.
    rng = np.random.default_rng(seed)
    k, s = classes, image_size
    n_train, n_test = samples, max(samples // 4, k)
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

    return in_memory(*make(n_train), *make(n_test), [f"class_{i}" for i in range(k)], "synthetic", "synthetic")


def cifar10_download() -> SourceImages:
    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    except Exception as err:  # noqa: BLE001 - any failure here means "no download"
        raise DataError(
            f"CIFAR-10 could not be downloaded ({type(err).__name__}: {err}). Point at a local copy "
            "with --data-dir PATH (a folder with train/<class>/* and test/<class>/*, "
            f"a {CIFAR_PICKLE_DIR}/ folder, or a .tar.gz of either) or set ${DATA_DIR_ENV}."
        ) from err
    y_train, y_test = y_train.reshape(-1).astype(np.int32), y_test.reshape(-1).astype(np.int32)
    return in_memory(x_train, y_train, x_test, y_test, CIFAR10_CLASSES, "keras.datasets.cifar10", "cifar10")


# What NumPy's pickles of arrays (protocols 2-5) and scalars call, under NumPy 1's and 2's module names.
NUMPY_REDUCERS = [np.zeros(1).__reduce__()[0], np.zeros(1).__reduce_ex__(5)[0], np.float64(0).__reduce__()[0]]
# What a CIFAR-10 pickle may name.
PICKLE_GLOBALS = {
    **{(module, obj.__name__): obj for module in ("numpy.core.multiarray", "numpy._core.multiarray",
                                                  "numpy.core.numeric", "numpy._core.numeric")
       for obj in NUMPY_REDUCERS},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,   # bytes, as Python 3 pickles them at protocol 2
    ("builtins", "bytearray"): bytearray,
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR-10's batches hold: any other global (os.system, eval...) raises, never runs."""

    def find_class(self, module: str, name: str):
        try:
            return PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR-10 batch holds only "
                                         "dicts, lists, bytes, numbers and NumPy arrays") from None


def cifar_pickles(folder: Path) -> SourceImages:
    def read(name: str) -> dict:
        path = folder / name
        if not path.is_file():
            raise DataError(f"{str(path)!r} is missing or not a regular file: {CIFAR_PICKLE_DIR}/ needs "
                            "data_batch_1..5 and test_batch. Re-extract the archive.")
        try:
            with open(path, "rb") as f:
                batch = SafeUnpickler(f, encoding="bytes").load()   # Python 2 strings as bytes
            if not isinstance(batch, dict):
                raise pickle.UnpicklingError(f"it holds a {type(batch).__name__}, not a dict")
        except Exception as err:  # noqa: BLE001 - unpickling fails in many ways on a broken file
            raise DataError(f"{str(path)!r} is not a readable CIFAR-10 batch and was not loaded ({err}). Use "
                            "the official cifar-10-python release (re-extract it), or an image folder.") from err
        return batch

    def arrays(batch: dict, name: str) -> tuple[np.ndarray, np.ndarray]:
        try:
            x = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, CIFAR_SIZE, CIFAR_SIZE)
            y = np.asarray(batch[b"labels"], dtype=np.int64)
        except (KeyError, ValueError, TypeError) as err:
            raise DataError(f"{str(folder / name)!r} does not hold CIFAR-10 data/labels ({err}).") from err
        if y.shape != (len(x),):
            raise DataError(f"{str(folder / name)!r} has {len(x)} images but {y.size} labels.")
        return x.transpose(0, 2, 3, 1), y

    names = sorted(p.name for p in folder.glob("data_batch_*"))   # 1..5
    meta = read("batches.meta") if (folder / "batches.meta").is_file() else {}
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(b"label_names", CIFAR10_CLASSES)]
    parts = {name: arrays(read(name), name) for name in [*names, "test_batch"]}
    for name, (_, y) in parts.items():
        check_labels(y, len(class_names), repr(str(folder / name)))
    x_test, y_test = parts.pop("test_batch")
    x_train = np.concatenate([x for x, _ in parts.values()])
    y_train = np.concatenate([y for _, y in parts.values()]).astype(np.int32)
    return in_memory(x_train, y_train, x_test, y_test.astype(np.int32), class_names, str(folder),
                     "cifar10-pickles")


def image_folder(root: Path, image_size: int, verbose: bool, fix_hint: str, split_seed: int, *,
                 policy: str = "squash", max_bytes: int | None = None,
                 content_id: str | None = None) -> SourceImages:
    listing = folder_layout(root, fix_hint)
    files, layout, class_names = listing.files, listing.layout, listing.class_names
    if listing.skipped:
        warnings.warn(Walk([], listing.skipped).note(root), stacklevel=3)
    # Decoded into memory (and cached as .npz) unless that would take more than `max_bytes`: then the
    # files are streamed, decoded every epoch, after a cached pass that finds the unreadable ones.
    stream = max_bytes is not None and len(files) * image_size * image_size * 3 > max_bytes
    labels = np.asarray(listing.labels, dtype=np.int32)
    decoded, good, sizes = decode_cached(root, files, image_size, verbose, policy=policy, keep=not stream,
                                         content_id=content_id)
    images = (FileImages([os.path.join(root, f) for f in files], labels, image_size, policy) if stream
              else ArrayImages(decoded, labels))[good]
    unreadable = [files[i] for i in np.setdiff1d(np.arange(len(files)), good)]
    if not len(good):
        raise DataError(f"no readable images in {str(root)!r}: all {len(files)} files failed to decode "
                        f"as JPEG, PNG, GIF or BMP (e.g. {files[0]!r}). {fix_hint}")
    if unreadable:
        warnings.warn(f"skipped {len(unreadable)} file(s) under {str(root)!r} that are not readable "
                      f"images: {listed(unreadable)}.", stacklevel=3)

    splits = np.asarray(listing.splits)[good]
    by_split = {s: images[splits == s] for s in layout}
    train = by_split["train"]
    missing = [class_names[c] for c in np.setdiff1d(np.arange(len(class_names)), train.labels)]
    if len(class_names) - len(missing) < 2:
        raise DataError(f"only one class of {str(layout['train'])!r} has readable images; "
                        f"classification needs at least 2. {fix_hint}")
    if missing:
        raise DataError(f"class folder(s) {', '.join(repr(n) for n in missing)} of {str(layout['train'])!r} "
                        "hold no readable image, so the model would get output classes it never sees an "
                        "image of. Add images to them or remove them.")

    for split, what in (("test", "a test"), ("val", "the validation")):
        if split in by_split and not len(by_split[split]):
            raise DataError(f"no readable images in {str(layout[split])!r}. Add images to it or remove it to "
                            f"carve {what} split from train/.")
    if "test" in by_split:
        test = by_split["test"]
    else:
        keep, out = carve_test(train.labels, split_seed)
        train, test = train[keep], train[out]

    identity = hash_json({"kind": "folder", "files": [files[i] for i in good], "sizes": [sizes[i] for i in good],
                          "labels": labels[good].tolist(), "stored": image_size, "policy": policy,
                          "carved_test": "test" not in by_split})
    return SourceImages(train, test, class_names, str(root), identity, len(unreadable) + len(listing.skipped),
                        by_split.get("val"))
