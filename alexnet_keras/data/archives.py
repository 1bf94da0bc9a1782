"""Where the data is: `--data-dir` / $ALEXNET_KERAS_DATA_DIR, archives extracted once by sha256; no TensorFlow."""

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import shutil
import tarfile
import warnings
import zipfile
from pathlib import Path
from typing import Callable

from .cache import CACHE_ENV, build_folder_once, cache_root, save_atomically, unwritable
from .files import CIFAR_PICKLE_DIR, DataError, visible

DATA_DIR_ENV = "ALEXNET_KERAS_DATA_DIR"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
MAX_RATIO_ENV = "ALEXNET_KERAS_MAX_EXTRACT_RATIO"
MAX_RATIO = 100       # images hardly compress; 1 GiB of zeros packs into about 1 MiB
RATIO_FREE = 2 ** 26  # extracting up to 64 MiB is allowed whatever the ratio


@dataclasses.dataclass(frozen=True)
class DataDir:
    path: Path
    archive_sha256: str | None = None   # of the archive it was extracted from


def locate_data_dir(data_dir: str | os.PathLike | None) -> DataDir | None:
    """The folder `data_dir` (else $ALEXNET_KERAS_DATA_DIR, else None) names, an archive's extracted in the cache."""
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
    with contextlib.suppress(OSError):
        known = remembered.read_text().strip()
        if len(known) == 64 and all(c in "0123456789abcdef" for c in known):
            return known
    try:
        with open(archive, "rb") as f:
            digest = hashlib.file_digest(f, "sha256")
    except OSError as err:
        raise DataError(f"cannot read the archive {str(archive)!r} ({err.strerror or err}).") from err
    with warnings.catch_warnings(action="ignore"):   # a hash not remembered is only computed again
        save_atomically(remembered, lambda f: f.write(digest.hexdigest()), binary=False)
    return digest.hexdigest()


def extract(archive: Path, sha256: str) -> Path:
    """The cache folder holding `archive`'s content (whose hash is `sha256`), extracted if no run did; bounded
    by the members' headers before they are written, as zipfile and tarfile write no more than they declare."""
    stem = next(archive.name[:-len(s)] for s in ARCHIVE_SUFFIXES if archive.name.lower().endswith(s))
    target = cache_root() / "datasets" / f"{stem}-{sha256[:16]}"

    def fill(folder: Path) -> None:
        add = bound(archive, folder)
        try:
            if archive.name.lower().endswith(".zip"):
                with zipfile.ZipFile(archive) as zf:
                    add(sum(info.file_size for info in zf.infolist()))
                    zf.extractall(folder)    # zipfile drops absolute paths and "..", so it stays inside
            else:
                def checked(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
                    add(member.size)   # before it is written
                    return tarfile.data_filter(member, path)   # no paths outside, no device files

                with tarfile.open(archive) as tar:
                    tar.extractall(folder, filter=checked)
        except DataError:   # over the bound
            raise
        # An encrypted zip member raises RuntimeError, an unsupported compression (Deflate64) NotImplementedError.
        except (OSError, tarfile.TarError, zipfile.BadZipFile, EOFError, ValueError, RuntimeError,
                NotImplementedError) as err:
            if getattr(err, "errno", None) in (errno.EACCES, errno.ENOSPC, errno.EROFS, errno.EDQUOT):
                raise unwritable(folder.parent, err) from err   # the cache, not the archive
            raise DataError(f"could not extract {str(archive)!r} ({err}). Check that the archive is "
                            "complete, or extract it yourself and pass the folder with --data-dir.") from err

    return build_folder_once(target, fill)


def bound(archive: Path, folder: Path) -> Callable[[int], None]:
    """`add(n)` counts n more bytes of `archive` to extract into `folder`, refusing a total beyond the free
    space there, or beyond $MAX_RATIO_ENV (100) times the archive's size when over 64 MiB (a bomb)."""
    raw = os.environ.get(MAX_RATIO_ENV) or str(MAX_RATIO)
    ratio = float(raw) if raw.replace(".", "", 1).isdigit() else 0.0
    if not ratio:
        raise DataError(f"{MAX_RATIO_ENV}={raw!r} must be a positive number: the most times its size that "
                        f"an archive may extract to (default {MAX_RATIO}).")
    size, free, total = archive.stat().st_size, shutil.disk_usage(folder).free, 0

    def add(count: int) -> None:
        nonlocal total
        total += count
        what = f"{str(archive)!r} would extract to {total / 2 ** 20:,.1f} MiB or more"
        if total > free:
            raise DataError(f"{what}, more than the {free / 2 ** 20:,.1f} MiB free in the data cache "
                            f"{str(folder.parent)!r}. Free space there, or set {CACHE_ENV} to a folder with room.")
        if total > max(RATIO_FREE, ratio * size):
            raise DataError(f"{what}, over {ratio:g} times its {size / 2 ** 20:,.1f} MiB, far more than images "
                            f"expand: refused as a likely decompression bomb. If it is the data you meant, set "
                            f"{MAX_RATIO_ENV}={math.ceil(total / size) + 1} (or more), or extract it yourself "
                            f"and pass the folder with --data-dir.")
    return add


def layout_root(folder: Path) -> Path:
    """Descend through lone wrapper folders (data.tar.gz -> data/), not links, to the one holding the layout."""
    while True:
        with os.scandir(folder) as scan:
            entries = [e for e in scan if visible(e.name)]
        if (len(entries) != 1 or not entries[0].is_dir(follow_symlinks=False)
                or entries[0].name in ("train", CIFAR_PICKLE_DIR)):
            return folder
        folder = Path(entries[0].path)
