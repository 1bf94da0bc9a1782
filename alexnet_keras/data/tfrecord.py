"""TFRecord shards: `prepare` writes an image folder as shards with a manifest, decoded and rescaled once;
`load_prepared` and `RecordImages` read them back (docs/data.md)."""

import datetime
import functools
import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import tensorflow as tf
from pydantic import Field

from ..config import MAX_SIDE, Options, validated
from .archives import locate_data_dir
from .cache import build_folder_once, cache_root, hash_json
from .decode import decode_image, progress_bar, resize_image
from .files import LAYOUT_HINT, DataError, folder_layout, listed
from .images import Images, SourceImages
from .split import carve_test

MANIFEST = "manifest.json"
LABELS = "labels.npz"
FORMAT = "alexnet-keras-tfrecord"
VERSION = 1
ENCODINGS = ("jpeg", "png", "raw", "original")   # raw: uint8 pixels, no decoding
# Encoded records held for shuffling, on top of shuffling the shards (~25 KB each at 256 px: ~100 MB).
SHUFFLE_BUFFER = 4096
SUBSET_SHARD_SIZE = 1024
_INDEX = {"index": tf.io.FixedLenFeature([], tf.int64)}
_FEATURES = {"image": tf.io.FixedLenFeature([], tf.string), "label": tf.io.FixedLenFeature([], tf.int64), **_INDEX}


class PrepareOptions(Options):
    stored_size: int = Field(256, ge=8, le=MAX_SIDE)    # the paper's 256; as bounded as training's
    encoding: Literal[ENCODINGS] = "jpeg"
    quality: int = Field(95, ge=1, le=100)
    shard_size: int = Field(1024, ge=1)


def prepare(source: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False, verbose: bool = True,
            **options) -> dict:
    """Convert the image folder (or archive) `source` into TFRecord shards in `out` (`options`: those of
    PrepareOptions); return the manifest."""
    opts = validated(PrepareOptions, options, "prepare")
    stored_size, encoding, quality, shard_size = opts.stored_size, opts.encoding, opts.quality, opts.shard_size
    located = locate_data_dir(source)
    if located is None:
        raise DataError("prepare needs the image folder to convert.")
    root = located.path
    if is_prepared(root):
        raise DataError(f"{str(root)!r} already holds TFRecord shards ({MANIFEST}); pass it to --data-dir.")
    out = Path(out).expanduser().absolute()
    taken = next((path for path in (out, *out.parents) if path.exists() and not path.is_dir()), None)
    if taken is not None:
        raise DataError(f"the output folder {str(out)!r} cannot be made: {str(taken)!r} is a file; choose a folder.")
    if out.resolve() == root.resolve() or root.resolve() in out.resolve().parents:
        raise DataError(f"the output folder {str(out)!r} must not be inside the image folder {str(root)!r}.")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise DataError(f"output folder {str(out)!r} is not empty; pass --overwrite to replace its "
                            "shards, or choose another folder.")
        if not is_prepared(out):
            raise DataError(f"output folder {str(out)!r} is not empty and holds no {MANIFEST}; refusing "
                            "to overwrite a folder this command did not write.")
        for path in [*out.glob("*-[0-9][0-9][0-9][0-9][0-9].tfrecord"), out / LABELS, out / MANIFEST]:
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)

    listing = folder_layout(root, LAYOUT_HINT + ".")
    layout, class_names, files = listing.layout, listing.class_names, listing.files
    labels_arr, splits_arr = np.asarray(listing.labels, np.int64), np.asarray(listing.splits)
    policy = ({"resize": "none", "encoding": "original"} if encoding == "original" else
              {"resize": "shorter_side_crop", "stored_size": stored_size, "encoding": encoding,
               **({"quality": quality} if encoding == "jpeg" else {})})

    start = time.perf_counter()
    manifest_splits, all_labels, skipped, sizes = {}, {}, list(listing.skipped), {}
    for split in layout:
        chosen = np.flatnonzero(splits_arr == split)
        shards, kept, bad = _write_split(split, root, [files[i] for i in chosen], labels_arr[chosen], out,
                                         stored_size, encoding, quality, shard_size, verbose)
        skipped += bad
        all_labels[split] = labels_arr[chosen][kept]
        manifest_splits[split] = {"folder": os.path.relpath(layout[split], root), "count": int(len(kept)),
                                  "shards": shards}
        sizes[split] = [os.path.getsize(os.path.join(root, files[chosen[k]])) for k in kept]
    seconds = time.perf_counter() - start
    np.savez(out / LABELS, **all_labels)
    manifest = {"format": FORMAT, "version": VERSION, "source": str(root), "classes": list(class_names),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "counts": {**{s: v["count"] for s, v in manifest_splits.items()}, "skipped": len(skipped)},
                "size_policy": policy, "splits": manifest_splits, "labels_file": LABELS, "skipped": skipped,
                "identity": hash_json({"classes": class_names, "policy": policy, "sizes": sizes,
                                       "labels": {s: v.tolist() for s, v in all_labels.items()}}),
                "seconds": round(seconds, 1)}
    # Written last: a folder with a manifest is a finished conversion.
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / MANIFEST)
    if verbose:
        print(f"Wrote {manifest['counts']} images in {sum(len(v['shards']) for v in manifest_splits.values())} "
              f"shards to {out} in {seconds:.1f} s.", flush=True)
    return manifest


def _write_split(split: str, root: Path, files: list[str], labels: np.ndarray, out: Path, stored_size: int,
                 encoding: str, quality: int, shard_size: int, verbose: bool):
    """Write one split's shards; return (shard entries, kept positions into `files`, skipped files)."""
    def load(position, path):
        contents = tf.io.read_file(path)
        if encoding == "original":
            image = tf.io.decode_image(contents, channels=3, expand_animations=False)
            return position, contents, tf.shape(image)[0]   # using the shape makes the decode run
        image = decode_image(contents, stored_size, "shorter_side_crop")
        encoded = (tf.io.encode_png(image) if encoding == "png" else tf.io.serialize_tensor(image) if encoding == "raw"
                   else tf.io.encode_jpeg(image, quality=quality))
        return position, encoded, tf.shape(image)[0]

    # In parallel, in file order; a file that fails to decode is dropped and missing from the positions.
    ds = (tf.data.Dataset.from_tensor_slices((np.arange(len(files), dtype=np.int64),
                                              np.asarray([os.path.join(root, f) for f in files], str)))
          .map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors().prefetch(64))
    bar = progress_bar(len(files), f"Converting {split}:", verbose)
    kept: list[int] = []

    def examples():
        for position, encoded, _ in ds.as_numpy_iterator():
            feature = {"image": _bytes(encoded), "label": _int(labels[position]), "index": _int(len(kept)),
                       "file": _bytes(files[position].encode())}
            kept.append(int(position))
            if bar is not None and len(kept) % 256 == 0:
                bar.update(len(kept))
            yield tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()

    shards = write_shards(examples(), out, split, shard_size)
    if bar is not None and len(kept) < len(files):
        bar.update(len(files), finalize=True)   # skipped files never arrive; close the bar anyway
    kept_set = set(kept)
    return shards, np.asarray(kept, np.int64), [f for i, f in enumerate(files) if i not in kept_set]


def _bytes(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int(value) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))


def write_shards(records, out: Path, prefix: str, shard_size: int) -> list[dict]:
    """The serialized `records` in `out`/<prefix>-00000.tfrecord, ... of `shard_size` each; their entries."""
    shards: list[dict] = []
    writer = None
    try:
        for record in records:
            if writer is None or shards[-1]["count"] == shard_size:
                if writer is not None:
                    writer.close()
                shards.append({"file": f"{prefix}-{len(shards):05d}.tfrecord", "count": 0})
                writer = tf.io.TFRecordWriter(str(out / shards[-1]["file"]))
            writer.write(record)
            shards[-1]["count"] += 1
    finally:
        if writer is not None:
            writer.close()
    return shards


def is_prepared(root: str | os.PathLike) -> bool:
    """Whether `root` holds shards written by `prepare` (its manifest)."""
    return (Path(root) / MANIFEST).is_file()


def read_manifest(root: str | os.PathLike) -> dict:
    path = Path(root) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{str(path)!r} is not a readable manifest ({err}). Run `alexnet-keras prepare` "
                        "again.") from err
    ours = isinstance(manifest, dict) and (manifest.get("format"), manifest.get("version")) == (FORMAT, VERSION)
    if not ours or "train" not in manifest.get("splits", {}):
        raise DataError(f"{str(path)!r} is not a version {VERSION} {FORMAT!r} manifest with a train split. Run "
                        "`alexnet-keras prepare` again.")
    missing = [s["file"] for split in manifest["splits"].values() for s in split["shards"]
               if not (Path(root) / s["file"]).is_file()]
    if missing:
        raise DataError(f"shards listed in {str(path)!r} are missing: {listed(missing)}. Copy the whole folder, "
                        "or prepare it again.")
    return manifest


class RecordImages(Images):
    """One split of a prepared folder: records decoded to `side` px with `policy` as they are read.
    `index` (sorted positions into the split's records) makes a subset."""

    def __init__(self, shards: list[str], all_labels: np.ndarray, side: int, policy: str,
                 index: np.ndarray | None = None, raw: bool = False):
        self.shards = list(shards)
        self.all_labels = np.asarray(all_labels, np.int32)
        self.index = np.arange(len(self.all_labels)) if index is None else np.sort(np.asarray(index, np.int64))
        self.labels = self.all_labels[self.index]
        self.side, self.policy, self.raw = side, policy, raw

    def subset(self, index):
        return RecordImages(self.shards, self.all_labels, self.side, self.policy, self.index[index], self.raw)

    @functools.cached_property
    def read_plan(self) -> tuple[list[str], np.ndarray | None]:
        """(shards to read, mask of the records to keep or None): a subset of at most half the records is
        copied once into shards of its own rather than filtered out of every shard each epoch."""
        if len(self.index) == len(self.all_labels):
            return self.shards, None
        mask = np.zeros(len(self.all_labels), dtype=bool)
        mask[self.index] = True
        if 0 < len(self.index) <= len(self.all_labels) // 2:
            try:
                return subset_shards(self.shards, mask), None
            except DataError as err:   # a read-only cache: read through the filter instead
                warnings.warn(f"{err} Reading the subset through all {len(self.shards)} shards meanwhile.",
                              stacklevel=2)
        return self.shards, mask

    def batch_keys(self, batch_size, *, shuffle=False, seed=0, deterministic=True):
        side, policy = self.side, self.policy
        decode = (lambda raw: resize_image(tf.io.parse_tensor(raw, tf.uint8), side, policy)) if self.raw else (
            lambda encoded: decode_image(encoded, side, policy))
        shards, mask = self.read_plan
        if shuffle and len(shards) > 1:
            files = tf.data.Dataset.from_tensor_slices(shards).shuffle(
                len(shards), seed=seed, reshuffle_each_iteration=True)
            ds = files.interleave(tf.data.TFRecordDataset, cycle_length=min(len(shards), 16),
                                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
        else:
            ds = tf.data.TFRecordDataset(shards)
        ds = ds.map(lambda record: tf.io.parse_single_example(record, _FEATURES),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
        if mask is not None:
            keep = tf.constant(mask)
            ds = ds.filter(lambda record: tf.gather(keep, record["index"]))
        if shuffle:
            ds = ds.shuffle(max(1, min(len(self), SHUFFLE_BUFFER)), seed=seed, reshuffle_each_iteration=True)
        ds = ds.map(lambda record: {"x": decode(record["image"]),
                                    "y": tf.cast(record["label"], tf.int32)},
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
        return ds.batch(batch_size)


def subset_shards(shards: list[str], mask: np.ndarray) -> list[str]:
    """Shards in the cache holding, in order, the records of `shards` whose index `mask` keeps; written
    once (one sequential pass over `shards`, records copied as they are, not decoded)."""
    stats = [os.stat(s) for s in shards]
    key = hash_json({"shards": [os.path.basename(s) for s in shards], "sizes": [s.st_size for s in stats],
                     "mtimes": [s.st_mtime_ns for s in stats], "folder": os.path.dirname(shards[0]),
                     "subset": hashlib.sha256(np.packbits(mask).tobytes()).hexdigest()})
    target = cache_root() / "records" / key

    def fill(folder: Path) -> None:
        keep = tf.constant(mask)
        ds = tf.data.TFRecordDataset(shards).filter(
            lambda record: tf.gather(keep, tf.io.parse_single_example(record, _INDEX)["index"])).batch(256)
        records = (record for batch in ds.as_numpy_iterator() for record in batch)
        written = sum(shard["count"] for shard in write_shards(records, folder, "part", SUBSET_SHARD_SIZE))
        if written != int(mask.sum()):
            raise DataError(f"the shards {shards[0]!r}... hold {written} of the {int(mask.sum())} records "
                            "expected. Prepare the folder again.")

    folder = build_folder_once(target, fill)
    return sorted(str(p) for p in folder.glob("part-*.tfrecord"))


def load_prepared(root: Path, side: int, policy: str, split_seed: int) -> SourceImages:
    """A prepared folder as SourceImages, its splits streamed as RecordImages."""
    manifest = read_manifest(root)
    with np.load(root / LABELS, allow_pickle=False) as stored:
        labels = {name: stored[name].astype(np.int32) for name in stored.files}
    splits = manifest["splits"]

    def images(split: str) -> RecordImages:
        entry = splits[split]
        if len(labels.get(split, ())) != entry["count"]:
            raise DataError(f"{str(root / LABELS)!r} does not match the manifest's {split} count. "
                            "Prepare the folder again.")
        if not entry["count"]:
            raise DataError(f"the {split} split of {str(root)!r} has no images. Prepare it again from a "
                            f"folder whose {split} split holds readable images.")
        return RecordImages([str(root / s["file"]) for s in entry["shards"]], labels[split], side, policy,
                            raw=manifest["size_policy"]["encoding"] == "raw")

    x_train = images("train")
    if len(np.unique(x_train.labels)) < 2:
        raise DataError(f"the train split of {str(root)!r} has images of only one class.")
    if "test" in splits:
        x_test = images("test")
    else:   # carved as image folders without test/ are: the same images in the same order
        keep, out = carve_test(x_train.labels, split_seed)
        x_test, x_train = x_train[out], x_train[keep]
    x_val = images("val") if "val" in splits else None
    identity = hash_json({"kind": "tfrecord", "identity": manifest["identity"], "side": side,
                          "policy": policy, "carved_test": "test" not in splits})
    return SourceImages(x_train, x_test, list(manifest["classes"]), str(root), identity,
                        int(manifest["counts"].get("skipped", 0)), x_val)
