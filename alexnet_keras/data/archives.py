"""Where the data is: `--data-dir` / $ALEXNET_KERAS_DATA_DIR, archives extracted once into the cache, keyed
by the sha256 of their bytes. No TensorFlow here."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import tarfile
import warnings
import zipfile
from pathlib import Path

from .cache import build_folder_once, cache_root, save_atomically, unwritable
from .files import CIFAR_PICKLE_DIR, DataError, visible

DATA_DIR_ENV = "ALEXNET_KERAS_DATA_DIR"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")


@dataclasses.dataclass(frozen=True)
class DataDir:
    path: Path
    archive_sha256: str | None = None   # of the archive it was extracted from


def locate_data_dir(data_dir: str | os.PathLike | None) -> DataDir | None:
    """The folder `data_dir` names (else $ALEXNET_KERAS_DATA_DIR, else None: download), an archive's once
    extracted into the cache."""
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
    if path.is_dir():
        return DataDir(path)
    if not path.is_file() or not path.name.lower().endswith(ARCHIVE_SUFFIXES):
        raise DataError(f"data dir {str(path)!r}{origin} is {'a file' if path.is_file() else 'not a regular file'}, "
                        f"not a folder or an archive ({', '.join(ARCHIVE_SUFFIXES)}). Pass the folder "
                        "that holds the images.")
    sha256 = archive_sha256(path)
    return DataDir(layout_root(extract(path, sha256)), sha256)


def archive_sha256(archive: Path) -> str:
    """The sha256 of `archive`'s bytes, read from the cache when the file has not changed since."""
    stat = archive.stat()
    key = hashlib.sha256(json.dumps([str(archive.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns,
                                     stat.st_ino, stat.st_dev]).encode()).hexdigest()[:32]
    remembered = cache_root() / "archive-sha256" / key
    try:
        known = remembered.read_text().strip()
        if len(known) == 64 and all(c in "0123456789abcdef" for c in known):
            return known
    except OSError:
        pass
    try:
        with open(archive, "rb") as f:
            digest = hashlib.file_digest(f, "sha256")
    except OSError as err:
        raise DataError(f"cannot read the archive {str(archive)!r} ({err.strerror or err}).") from err
    with warnings.catch_warnings(action="ignore"):   # a hash not remembered is only computed again
        save_atomically(remembered, lambda f: f.write(digest.hexdigest()), binary=False)
    return digest.hexdigest()


def extract(archive: Path, sha256: str) -> Path:
    """The cache folder holding `archive`'s content (whose hash is `sha256`), extracted if no run did."""
    stem = next(archive.name[:-len(s)] for s in ARCHIVE_SUFFIXES if archive.name.lower().endswith(s))
    target = cache_root() / "datasets" / f"{stem}-{sha256[:16]}"

    def fill(folder: Path) -> None:
        try:
            if archive.name.lower().endswith(".zip"):
                with zipfile.ZipFile(archive) as zf:
                    zf.extractall(folder)    # zipfile drops absolute paths and "..", so it stays inside
            else:
                with tarfile.open(archive) as tar:
                    tar.extractall(folder, filter="data")   # no paths outside, no device files
        # An encrypted zip member raises RuntimeError, an unsupported compression (Deflate64) NotImplementedError.
        except (OSError, tarfile.TarError, zipfile.BadZipFile, EOFError, ValueError, RuntimeError,
                NotImplementedError) as err:
            if getattr(err, "errno", None) in (errno.EACCES, errno.ENOSPC, errno.EROFS, errno.EDQUOT):
                raise unwritable(folder.parent, err) from err   # the cache, not the archive
            raise DataError(f"could not extract {str(archive)!r} ({err}). Check that the archive is "
                            "complete, or extract it yourself and pass the folder with --data-dir.") from err

    return build_folder_once(target, fill)


def layout_root(folder: Path) -> Path:
    """Descend through lone wrapper folders (data.tar.gz -> data/), not links, to the one holding the layout."""
    while True:
        with os.scandir(folder) as scan:
            entries = [e for e in scan if visible(e.name)]
        if (len(entries) != 1 or not entries[0].is_dir(follow_symlinks=False)
                or entries[0].name in ("train", CIFAR_PICKLE_DIR)):
            return folder
        folder = Path(entries[0].path)
