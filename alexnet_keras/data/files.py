"""What a data folder holds, read safely: `walk_files` (regular files only: no link followed, no FIFO opened,
which would block forever) and the folder layouts. No TensorFlow."""

import dataclasses
import os
from pathlib import Path

SPLITS = ("train", "val", "test")
# The folder of CIFAR-10's official python release (data_batch_1..5, test_batch, batches.meta).
CIFAR_PICKLE_DIR = "cifar-10-batches-py"
LAYOUT_HINT = ("Expected train/<class>/* (optionally with test/<class>/* and val/<class>/*) or <class>/* "
               "directly, one sub-folder per class")


class DataError(ValueError):
    """The data cannot be read as asked. The message says what is wrong, where, and how to fix it."""


def listed(names: list[str]) -> str:
    """The first five of `names` and how many more, for a message."""
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def visible(name: str) -> bool:
    """Whether an entry named `name` can hold data: not hidden, not a macOS archive's __MACOSX."""
    return not name.startswith(".") and name != "__MACOSX"


@dataclasses.dataclass
class Walk:
    """What `walk_files` found, relative to the walked folder: regular files, and the links, FIFOs,
    sockets and devices skipped."""

    files: list[str]
    skipped: list[str]

    def note(self, where: str | os.PathLike) -> str:
        """One line saying what was skipped under `where` and why ("" when nothing was)."""
        if not self.skipped:
            return ""
        return (f"skipped {len(self.skipped)} entr{'y' if len(self.skipped) == 1 else 'ies'} under "
                f"{str(where)!r} that {'is' if len(self.skipped) == 1 else 'are'} not regular files with UTF-8 "
                f"names (symbolic links are not followed; FIFOs, sockets and devices are not opened): "
                f"{listed(self.skipped)}.")


def walk_files(folder: str | os.PathLike) -> Walk:
    """Every visible regular file under `folder`, depth first, a folder's files in name order before its
    sub-folders', classified by `lstat` (nothing opened). Plain strings: pathlib costs seconds on CIFAR."""
    files: list[str] = []
    skipped: list[str] = []
    pending = [""]
    while pending:
        relative = pending.pop()
        path = os.path.join(folder, relative) if relative else os.fspath(folder)
        try:
            with os.scandir(path) as scan:
                entries = sorted((e for e in scan if visible(e.name)), key=lambda e: e.name)
        except OSError as err:
            raise DataError(f"cannot list the folder {path!r} ({err.strerror or err}). Check its "
                            "permissions, or leave it out of the data folder.") from err
        subfolders = []
        for entry in entries:
            name = os.path.join(relative, entry.name) if relative else entry.name
            shown = name.encode(errors="surrogateescape").decode(errors="backslashreplace")   # not UTF-8: \xff
            if entry.is_dir(follow_symlinks=False):
                subfolders.append(name)
            elif entry.is_file(follow_symlinks=False) and shown == name:   # TensorFlow opens UTF-8 paths only
                files.append(name)
            else:   # is_file is False for a link, whatever it points to
                skipped.append(shown)
        pending.extend(reversed(subfolders))
    return Walk(files, skipped)


def subfolders(folder: Path) -> list[Path]:
    """The visible sub-folders of `folder`, sorted by name; a link among them is refused."""
    with os.scandir(folder) as scan:
        entries = sorted((e for e in scan if visible(e.name)), key=lambda e: e.name)
    for entry in entries:
        if entry.is_symlink() and os.path.isdir(entry.path):
            raise linked_folder(entry.path)
    return [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]


def linked_folder(path) -> DataError:
    return DataError(f"{str(path)!r} is a symbolic link to a folder; links inside the data folder are not "
                     "followed (they could lead out of it or back into it). Replace the link with the "
                     "folder itself.")


@dataclasses.dataclass
class FolderListing:
    """Every file of a folder dataset (relative to it, by split, class, then walk order), with its label
    and split, before decoding; `layout`: {split: folder}, "train" always."""

    layout: dict[str, Path]
    class_names: list[str]
    files: list[str]
    labels: list[int]
    splits: list[str]
    skipped: list[str]        # links and special files not taken


def folder_layout(root: Path, fix_hint: str) -> FolderListing:
    """The split folders, class names and files of the image folder `root`, or a DataError saying what
    of its layout cannot be trained on."""
    if not root.is_dir():
        raise DataError(f"data dir {str(root)!r} is not a folder. {fix_hint}")
    split_dirs = {}
    for name in SPLITS:
        folder = root / name
        if folder.is_symlink() and folder.is_dir():
            raise linked_folder(folder)
        if folder.is_dir():
            split_dirs[name] = folder
    if split_dirs and "train" not in split_dirs:
        raise DataError(f"data dir {str(root)!r} has {'/ and '.join(sorted(split_dirs))}/ but no train/. "
                        f"{fix_hint}")
    # val/ is the validation set beside test/, else the test set (ImageNet's layout).
    roles = ({"train": "train", "test": "test", "val": "val"} if "test" in split_dirs
             else {"train": "train", "test": "val"})
    layout = {role: split_dirs[name] for role, name in roles.items() if name in split_dirs} or {"train": root}

    class_names = [p.name for p in subfolders(layout["train"])]
    if not class_names:
        raise DataError(f"no class folders in {str(layout['train'])!r}. {fix_hint}")
    if len(class_names) < 2:
        raise DataError(f"only one class folder ({class_names[0]!r}) in {str(layout['train'])!r}; "
                        f"classification needs at least 2. {fix_hint}")
    for split, folder in list(layout.items())[1:]:   # after train
        names = [p.name for p in subfolders(folder)]
        if names != class_names:
            missing = sorted(set(class_names) - set(names))
            extra = sorted(set(names) - set(class_names))
            raise DataError(f"the class folders of {str(folder)!r} do not match those of "
                            f"{str(layout['train'])!r} (missing: {missing or 'none'}; not in train: "
                            f"{extra or 'none'}). Give {split}/ the same class sub-folders as train/.")

    listing = FolderListing(layout, class_names, [], [], [], [])
    empty = []
    for split, folder in layout.items():
        for label, name in enumerate(class_names):
            walk = walk_files(folder / name)
            prefix = os.path.relpath(folder / name, root)
            listing.files.extend(os.path.join(prefix, f) for f in walk.files)
            listing.labels.extend([label] * len(walk.files))
            listing.splits.extend([split] * len(walk.files))
            listing.skipped.extend(os.path.join(prefix, f) for f in walk.skipped)
            if split == "train" and not walk.files:
                empty.append(name)
    if not listing.files:
        raise DataError(f"no files under the class folders of {str(root)!r}. {fix_hint}")
    if empty:
        raise DataError(f"class folder(s) {', '.join(repr(n) for n in empty)} of {str(layout['train'])!r} "
                        "hold no files, so the model would get output classes it never sees an image of. "
                        "Add images to them or remove them.")
    return listing
