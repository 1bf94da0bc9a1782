"""Images in, `tf.data` pipelines out (docs/data.md). Imports run one way: files <- cache <- archives; decode <-
images <- sources/tfrecord <- pipeline."""

import importlib

# The names exported, imported on first use (PEP 562): `from .data import DataError` starts no TensorFlow.
_EXPORTS = {
    "archives": ("DATA_DIR_ENV", "locate_data_dir"),
    "augment": ("TEN_CROP_VIEWS", "center_crop", "model_views", "pca_color_shift", "random_crop_flip",
                "random_crops", "ten_crops"),
    "cache": ("CACHE_ENV",),
    "decode": ("RESIZE_POLICIES", "decode_image"),
    "files": ("DataError", "walk_files"),
    "pipeline": ("Data", "enable_op_determinism", "load_data"),
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


__all__ = sorted(_MODULE_OF)
