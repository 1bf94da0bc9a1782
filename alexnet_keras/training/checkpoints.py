"""Training checkpoints, written so that no failure leaves a damaged one, and the trained weights kept.

Layout (that of Keras' BackupAndRestore, so checkpoints it wrote still restore): CHECKPOINT_DIR/<run id>/
holds `latest.weights.h5` (weights and optimizer state after the last completed epoch) with
`training_metadata.json` (`{"epoch": N, ...}`), and the epoch before as `*.bkp`.

Writing (`EpochCheckpoint`, after every epoch; `save`): the weights go to a temporary file beside the
checkpoint, the metadata records that file's sha256, and only then are the files renamed into place.
Renames need no space and cannot be torn, so a kill or a full disk at any moment leaves the previous
checkpoint whole. A write that fails closes the HDF5 file h5py leaves open after a failed write (left
open, h5py printed errors while the interpreter exited, and the interpreter died with a segfault: the
disk-full case of issue 14) and raises CheckpointError, one line saying where and what to do.

Reading (`restore`): the newest checkpoint whose weights match their metadata and load, else the one
before it; files there of which none loads are a CheckpointError that says to pass `--resume false`.

`probe` checks a checkpoint folder can be written before a run opens; `keep_model` saves a trained
model somewhere that works when its logging failed (train.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import keras

WEIGHTS = "latest.weights.h5"
METADATA = "training_metadata.json"
BACKUP = ".bkp"          # the previous epoch's copy: WEIGHTS + BACKUP, METADATA + BACKUP
PARTIAL = ".partial-"    # prefix of a checkpoint being written (removed by the next restore if left)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read back; the message says where and how to go on."""


def one_line(err: BaseException) -> str:
    """`err`'s message on one line (h5py's span several), at most 400 characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def probe(folder: Path) -> None:
    """Fail now, before a run opens, if checkpoints cannot be written in `folder` (created if needed)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=PARTIAL + "probe-"):
            pass
    except OSError as err:
        raise CheckpointError(f"the checkpoint folder {str(folder)!r} cannot be written ({err.strerror or err}). "
                              f"Pass --checkpoint-dir with a writable folder, or free space or fix permissions "
                              f"there.") from None


def saved_epoch(folder: Path | None) -> int:
    """Epochs completed according to the newest checkpoint in `folder` (0 when there is none)."""
    if folder is None:
        return 0
    found = [m["epoch"] for name in (METADATA, METADATA + BACKUP) if (m := _read_metadata(folder / name))]
    return max(found, default=0)


def _read_metadata(path: Path) -> dict | None:
    try:
        metadata = json.loads(path.read_text())
        return metadata if isinstance(metadata, dict) and isinstance(metadata.get("epoch"), int) else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save(model: keras.Model, folder: Path, epoch: int) -> None:
    """Write `model`'s weights and optimizer state as the checkpoint of `epoch` completed epochs."""
    weights, metadata = folder / WEIGHTS, folder / METADATA
    partial = folder / f"{PARTIAL}{os.getpid()}.weights.h5"
    partial_metadata = folder / f"{PARTIAL}{os.getpid()}.json"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # The checkpoint before last goes first: the disk holds at most two, the last one and the new one.
        for old in (folder / (WEIGHTS + BACKUP), folder / (METADATA + BACKUP)):
            old.unlink(missing_ok=True)
        model.save_weights(str(partial))
        partial_metadata.write_text(json.dumps({"epoch": epoch, "batch": 0, "weights_sha256": _sha256(partial)}))
        for current in (weights, metadata):
            if current.exists():
                os.replace(current, current.with_name(current.name + BACKUP))
        os.replace(partial, weights)
        os.replace(partial_metadata, metadata)
    except BaseException as err:
        _release_hdf5(partial)
        for path in (partial, partial_metadata):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        if not isinstance(err, OSError):
            raise
        kept = saved_epoch(folder)
        then = (f"The checkpoint of epoch {kept} is kept there: free space there (or add --checkpoint-dir "
                f"ELSEWHERE, where it moves) and run the same command again to continue from it." if kept else
                "Free space there (or pass another --checkpoint-dir) and run the command again.")
        raise CheckpointError(f"could not write the checkpoint of epoch {epoch} to {str(folder)!r} "
                              f"({one_line(err)}). {then}") from err


def _release_hdf5(path: Path) -> None:
    """Close the HDF5 file h5py still holds open after a write to `path` failed. The file is emptied
    first, which gives its space back, so that closing it (which flushes) works on a full disk too."""
    import h5py

    target = os.path.abspath(path)
    for file_id in h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE):
        if os.path.abspath(os.fsdecode(file_id.name)) != target:
            continue
        with contextlib.suppress(OSError):
            os.truncate(target, 0)
        with contextlib.suppress(Exception):
            h5py.File(file_id).close()


def restore(model: keras.Model, folder: Path | None) -> int:
    """Load the newest intact checkpoint in `folder` into `model` (weights and optimizer state) and
    return the epochs it completed; 0, leaving `model` as it is, when there is no checkpoint."""
    if folder is None or not folder.is_dir():
        return 0
    for leftover in folder.glob(PARTIAL + "*"):   # a write that was killed
        with contextlib.suppress(OSError):
            leftover.unlink()
    slots = [(folder / WEIGHTS, folder / METADATA),
             (folder / (WEIGHTS + BACKUP), folder / (METADATA + BACKUP))]
    if not any(path.exists() for pair in slots for path in pair):
        return 0
    found = [(meta, path, weights) for weights, path in slots if (meta := _read_metadata(path)) is not None]
    found.sort(key=lambda item: -item[0]["epoch"])
    digests = {}
    problems = [f"{path.name} unreadable" for _, path in slots if path.exists() and _read_metadata(path) is None]
    for meta, path, own_weights in found:
        if meta.get("weights_sha256"):   # written by `save`: the weights file with that content, in either slot
            for weights, _ in slots:
                if weights.is_file() and weights not in digests:
                    digests[weights] = _sha256(weights)
            candidates = [w for w, _ in slots if digests.get(w) == meta["weights_sha256"]]
        else:                             # written by Keras' BackupAndRestore: the weights beside it
            candidates = [own_weights] if own_weights.is_file() else []
        if not candidates:
            problems.append(f"no intact weights for {path.name} (epoch {meta['epoch']})")
        for weights in candidates:
            try:
                _load(model, weights)
                return meta["epoch"]
            except Exception as err:  # noqa: BLE001 - a damaged file: try the other copy
                problems.append(f"{weights.name}: {one_line(err)}")
    raise CheckpointError(f"the checkpoint in {str(folder)!r} cannot be restored, both copies are damaged "
                          f"({'; '.join(problems) or 'no metadata'}). Pass --resume false to start a new run "
                          f"instead (and delete that folder to free its space).")


def _load(model: keras.Model, weights: Path) -> None:
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)   # its state is in the file too
    if weights.name.endswith(".weights.h5"):
        model.load_weights(str(weights))
        return
    # Keras loads only files named *.weights.h5: the .bkp copy is read through a link of that name.
    link = weights.with_name(f"{PARTIAL}{os.getpid()}-restore.weights.h5")
    try:
        link.unlink(missing_ok=True)
        try:
            os.link(weights, link)
        except OSError:
            shutil.copyfile(weights, link)
        model.load_weights(str(link))
    finally:
        link.unlink(missing_ok=True)


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves the checkpoint of each epoch as it ends (`save`)."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = Path(folder)

    def on_epoch_end(self, epoch, logs=None):
        save(self.model, self.folder, epoch + 1)


def keep_model(model: keras.Model, metadata, folders: Sequence[Path]) -> Path | None:
    """Save `model` as model.keras with the preprocessing `predict` needs (inference.save_model;
    `metadata`: inference.model_metadata) in the first of `folders` where that works, else in a new
    temporary folder. Its path, or None when nothing could be written anywhere."""
    from ..model.inference import save_model

    for folder in [*folders, None]:
        try:
            folder = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="alexnet-keras-kept-"))
            return save_model(model, folder / "model.keras", metadata.class_names, metadata.preprocessing,
                              metadata.mean_image)
        except Exception:  # noqa: BLE001 - that place does not work either: try the next
            continue
    return None
