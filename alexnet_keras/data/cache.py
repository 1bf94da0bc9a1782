"""The data cache ($ALEXNET_KERAS_CACHE, else ~/.cache/alexnet-keras), entries whole or absent; no TensorFlow."""

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from .files import DataError

CACHE_ENV = "ALEXNET_KERAS_CACHE"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/alexnet-keras").expanduser()


def hash_json(value) -> str:
    """16 hex digits identifying a JSON-able value (dict keys in any order)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def unwritable(path: Path, err: OSError) -> DataError:
    return DataError(f"the data cache folder {str(path)!r} is not writable ({err.strerror or err}). "
                     f"Set {CACHE_ENV} to a writable folder (it holds extracted archives and decoded "
                     "images).")


def build_folder_once(target: Path, fill: Callable[[Path], None]) -> Path:
    """`target`, unless it exists filled by `fill(folder)` in a temporary folder beside it renamed when complete."""
    if target.is_dir():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    except OSError as err:
        raise unwritable(target.parent, err) from err
    try:
        fill(tmp)
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():   # else another process finished the same entry first: as good as ours
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)   # gone already when renamed
    return target


def save_atomically(path: Path, write: Callable, binary: bool = True) -> bool:
    """`write(file)` into a temporary file renamed to `path` when complete; False when the cache is unwritable."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
        os.replace(tmp, path)
        tmp = None
        return True
    except OSError as err:
        warnings.warn(f"could not write the cache file {str(path)!r} ({err.strerror or err}); it will be "
                      f"computed again next time. Set {CACHE_ENV} to a writable folder.", stacklevel=3)
        return False
    finally:
        if tmp is not None:   # failed or interrupted between creating and renaming it
            Path(tmp).unlink(missing_ok=True)


def save_npz(path: Path, arrays: dict) -> None:
    save_atomically(path, lambda f: np.savez(f, **arrays))


def load_npz(path: Path) -> dict | None:
    """The arrays of a cache file, or None when it is missing or damaged (then it is computed again)."""
    try:
        with np.load(path, allow_pickle=False) as cached:
            return {name: cached[name] for name in cached.files}
    except Exception:  # noqa: BLE001 - missing or damaged: only a reason to compute again
        return None
