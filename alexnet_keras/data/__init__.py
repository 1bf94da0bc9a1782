"""Images in, `tf.data` pipelines out: CIFAR-10, a user's image folder, TFRecord shards, or a synthetic stand-in.

`load_data` turns a `DataConfig` into a `Data`: batched train/val/test pipelines of float32 images in
0..255 (normalisation belongs to the model, which gets `mean`/`std` from here) and int32 labels.
This package is the only part of the project that imports TensorFlow for its own sake: tf.data is the
one input pipeline that feeds Keras 3 on every backend, and tf.io/tf.image decode and resize images
fast in C++.

One job per module (each opens with what lives there):
  files.py        DataError; `walk_files`, the one safe walk of user folders (regular files only, no
                  links followed, special files never opened); the folder layouts (no TensorFlow)
  cache.py        the cache folder ($ALEXNET_KERAS_CACHE) and atomic, interrupt-safe writes into it
  archives.py     --data-dir / $ALEXNET_KERAS_DATA_DIR resolved; archives extracted once, keyed by sha256
  decode.py       `decode_image` (one file, shared with prepare and predict) and bulk decoding, cached
  images.py       `Images`: a split in memory or in files, with subsets and tf.data batches
  sources.py      synthetic, CIFAR-10 (download, or pickles through a restricted unpickler), folders
  tfrecord.py     `prepare` (alexnet-keras prepare) writes shards; `RecordImages` reads them
  split.py        stratified, seeded validation / test / limit splits by index
  pixel_stats.py  colour statistics (mean, std, covariance, PCA, mean image) in one pass, cached
  augment.py      TF image ops: crops, flips, the ten views, fancy PCA, `model_views`
  pipeline.py     `load_data` and `Data`: the one pipeline builder
Imports run one way: files <- cache <- archives; decode <- images <- sources/tfrecord <- pipeline.

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

Splits: the validation split is carved from the training images, stratified and seeded by
`split_seed` alone, so every run of a study sees the same split whatever its training `seed`.
CIFAR-10 stays at its native 32 px in memory; other sizes are produced per batch in the pipeline
(60,000 images at 227 px would need 9 GB). Image folders whose decoded images would need more than
`max_memory_mb`, and TFRecord shards, are streamed: decoded on the fly, in parallel, every epoch.
"""

import importlib

# Every name this package exports, and the module that defines it. They are imported on first use
# (PEP 562), so that `from .data import DataError` (the CLI's error handling, `report`, the served
# model) does not start TensorFlow: only augment, decode, images, sources, tfrecord and pipeline need it.
_EXPORTS = {
    "archives": ("ARCHIVE_SUFFIXES", "DATA_DIR_ENV", "DataDir", "locate_data_dir", "resolve_data_dir"),
    "augment": ("TEN_CROP_VIEWS", "center_crop", "model_views", "pca_color_shift", "random_crop_flip",
                "random_crops", "ten_crops", "to_stored"),
    "cache": ("CACHE_ENV", "cache_root"),
    "decode": ("RESIZE_POLICIES", "decode_image"),
    "files": ("DataError", "Walk", "walk_files"),
    "images": ("ArrayImages", "FileImages", "Images", "SourceImages"),
    "pipeline": ("Data", "enable_op_determinism", "load_data"),
    "pixel_stats": ("RGBStats", "rgb_statistics"),
    "sources": ("CIFAR10_CLASSES", "SafeUnpickler"),
    "tfrecord": ("RecordImages", "is_prepared", "prepare", "read_manifest"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value   # later look-ups (and monkeypatching) see a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULE_OF})


__all__ = [
    "ARCHIVE_SUFFIXES", "CACHE_ENV", "CIFAR10_CLASSES", "DATA_DIR_ENV", "RESIZE_POLICIES", "TEN_CROP_VIEWS",
    "ArrayImages", "Data", "DataDir", "DataError", "FileImages", "Images", "RGBStats", "RecordImages",
    "SafeUnpickler", "SourceImages", "Walk", "cache_root", "center_crop", "decode_image",
    "enable_op_determinism", "is_prepared", "load_data", "locate_data_dir", "model_views", "pca_color_shift",
    "prepare", "random_crop_flip", "random_crops", "read_manifest", "resolve_data_dir", "rgb_statistics",
    "ten_crops", "to_stored", "walk_files",
]
