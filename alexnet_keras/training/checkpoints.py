"""Per-epoch checkpoints: Keras' BackupAndRestore with writes that no kill or full disk can tear and a restore
that checks what it loads (docs/reliability.md, section 9)."""

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

import keras

WEIGHTS, METADATA, BACKUP = "latest.weights.h5", "training_metadata.json", ".bkp"   # BackupAndRestore's names
PARTIAL = ".partial-"    # a file being written; a restore removes those a kill left


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read back; the message says where and how to go on."""


def one_line(err: BaseException) -> str:
    """`err`'s message on one line (h5py's span several), at most 400 characters."""
    return (" ".join(str(err).split()) or type(err).__name__)[:400]


def probe(folder: Path) -> None:
    """Fail now, before a run opens, if checkpoints cannot be written in `folder` (left as it was)."""
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        raise CheckpointError(f"the checkpoint folder {str(folder)!r} cannot be written ({err.strerror or err}). "
                              f"Pass --checkpoint-dir with a writable folder, or free space or fix permissions "
                              f"there.") from None
    if created:
        folder.rmdir()


def _metadata(path: Path) -> dict | None:
    with contextlib.suppress(OSError, ValueError):
        metadata = json.loads(path.read_text())
        return metadata if isinstance(metadata, dict) and isinstance(metadata.get("epoch"), int) else None


def saved_epoch(folder: Path | None) -> int:
    """Epochs completed according to the newest checkpoint in `folder` (0 when there is none)."""
    return max((m["epoch"] for name in (METADATA, METADATA + BACKUP) if folder and (m := _metadata(folder / name))),
               default=0)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save(model: keras.Model, folder: Path, epoch: int, unlogged: list | tuple = ()) -> None:
    """The checkpoint of `epoch`, written to temporary files renamed into place (renames cannot be torn); its
    metadata names the weights by sha256 (a kill between renames leaves them in either slot) and keeps the
    `unlogged` metrics (the store was out). The disk holds at most two: the one before last goes first."""
    partial, partial_metadata = (folder / f"{PARTIAL}{os.getpid()}{end}" for end in (".weights.h5", ".json"))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name in (WEIGHTS, METADATA):
            (folder / (name + BACKUP)).unlink(missing_ok=True)
        model.save_weights(str(partial))
        partial_metadata.write_text(json.dumps({"epoch": epoch, "batch": 0, "weights_sha256": _sha256(partial),
                                                "unlogged_metrics": list(unlogged)}))
        for name in (WEIGHTS, METADATA):
            if (folder / name).exists():
                os.replace(folder / name, folder / (name + BACKUP))
        os.replace(partial, folder / WEIGHTS)
        os.replace(partial_metadata, folder / METADATA)
    except BaseException as err:
        import h5py   # keeps the file of a failed write open; left so, the interpreter segfaults as it exits

        for file_id in h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE):
            if os.path.abspath(os.fsdecode(file_id.name)) == os.path.abspath(partial):
                with contextlib.suppress(OSError):
                    os.truncate(partial, 0)   # its space back first: closing flushes, on a full disk too
                with contextlib.suppress(Exception):
                    h5py.File(file_id).close()
        for path in (partial, partial_metadata):
            path.unlink(missing_ok=True)
        if not isinstance(err, OSError):
            raise
        kept = f"The checkpoint of epoch {k} is kept there. " if (k := saved_epoch(folder)) else ""
        raise CheckpointError(f"could not write the checkpoint of epoch {epoch} to {str(folder)!r} ({one_line(err)}). "
                              f"{kept}Free space there (or pass another --checkpoint-dir, where a kept checkpoint "
                              f"moves) and run the same command again.") from err


def restore(model: keras.Model, folder: Path | None, unlogged: list | None = None) -> int:
    """Load the newest checkpoint in `folder` that loads into `model` (weights and optimizer state), add its
    unlogged metrics to `unlogged` and return its epoch; 0, leaving `model` as it is, when there is none.
    Metadata without a sha256 (Keras' own BackupAndRestore wrote it) goes with the weights beside it."""
    if folder is None or not folder.is_dir():
        return 0
    for leftover in folder.glob(PARTIAL + "*"):
        leftover.unlink()
    slots = [(folder / (WEIGHTS + end), folder / (METADATA + end)) for end in ("", BACKUP)]
    digests = {weights: _sha256(weights) for weights, _ in slots if weights.is_file()}
    found = sorted(((m, weights) for weights, path in slots if (m := _metadata(path))), key=lambda f: -f[0]["epoch"])
    if not digests and not found:
        return 0
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)   # its state is in the file too
    problems = []
    for meta, beside in found:
        sha = meta.get("weights_sha256")
        for weights in [w for w, digest in digests.items() if (digest == sha if sha else w == beside)]:
            link = folder / f"{PARTIAL}{os.getpid()}.weights.h5"   # Keras loads only *.weights.h5, not .bkp
            try:
                os.link(weights, link)
                model.load_weights(str(link))
                (unlogged if unlogged is not None else []).extend(meta.get("unlogged_metrics", ()))
                return meta["epoch"]
            except Exception as err:  # noqa: BLE001 - a damaged file: try the other copy
                problems.append(f"{weights.name}: {one_line(err)}")
            finally:
                link.unlink(missing_ok=True)
    raise CheckpointError(f"the checkpoint in {str(folder)!r} cannot be restored, both copies are damaged "
                          f"({'; '.join(problems) or 'no intact weights'}). Pass --resume false to start a new "
                          f"run instead (and delete that folder to free its space).")


class Checkpoint(keras.callbacks.BackupAndRestore):
    """BackupAndRestore through `save` and `restore`, kept after training; `epoch`: the one it restored."""

    def __init__(self, folder: Path, unlogged: list):
        super().__init__(str(folder), double_checkpoint=True, delete_checkpoint=False)
        self.folder, self.epoch, self.unlogged = Path(folder), 0, unlogged

    def on_train_begin(self, logs=None):
        self.epoch = self.model._initial_epoch = restore(self.model, self.folder, self.unlogged)   # as Keras' does
        if self.epoch:
            print(f"resuming from the checkpoint of epoch {self.epoch} of {self.params['epochs']} in "
                  f"{self.folder}", flush=True)

    def _save_model(self):
        save(self.model, self.folder, self._current_epoch, self.unlogged)
