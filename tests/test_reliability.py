"""Nothing trained is lost and nothing hangs: failures after training, while checkpointing and while
reaching the store (issue 14). docs/reliability.md lists every case with its outcome.

Full and read-only disks are real: a small tmpfs mounted for the test (we are root on the development
machines); where mounting is not permitted the test is skipped, or, for a read-only folder as a user
other than root, the folder's write permission is taken away instead.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import TINY, all_runs, cli_flags, subprocess_env
from mlflow.tracking import MlflowClient

from alexnet_keras.training import checkpoints, train
from alexnet_keras import cli, tracking
from alexnet_keras.config import load_config

TAG = tracking.TAG_PREFIX


# --- disks that fill up or turn read-only ---------------------------------------------------------

@pytest.fixture
def tmpfs():
    """mount(folder, size): a tmpfs of `size` ("2m") mounted on `folder`, unmounted after the test;
    skips the test where this process may not mount one."""
    mounted = []

    def mount(folder, size):
        folder.mkdir(parents=True, exist_ok=True)
        if shutil.which("mount") is None:
            pytest.skip("no mount command")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def remount(folder, options):
    subprocess.run(["mount", "-o", f"remount,{options}", str(folder)], check=True, capture_output=True)


@pytest.fixture
def freezable(tmp_path):
    """(folder, freeze, thaw): a folder that freeze() makes read-only and thaw() writable again: a
    tmpfs remounted ro (root), else its write permission taken away (other users), else a skip."""
    folder = tmp_path / "mlruns"
    folder.mkdir()
    mounted = shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)], capture_output=True).returncode == 0
    if not mounted and os.geteuid() == 0:
        pytest.skip("cannot mount a tmpfs, and root writes to any folder")

    def chmod_all(mode):
        for path in [folder, *folder.rglob("*")]:
            if path.is_dir():
                path.chmod(mode)

    def freeze():
        remount(folder, "ro") if mounted else chmod_all(0o555)

    def thaw():
        remount(folder, "rw") if mounted else chmod_all(0o755)

    yield folder, freeze, thaw
    if mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)
    else:
        chmod_all(0o755)


def _error_line(err):
    """The CLI's one-line error, checked to be there, alone and without a traceback."""
    lines = [line for line in err.splitlines() if line.startswith("alexnet-keras train: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def _history(uri, run_id, key):
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


# --- 1. a failure after training keeps the trained weights --------------------------------------------

def test_results_that_cannot_be_logged_keep_the_weights_and_the_same_command_logs_them(
        mlflow_store, freezable, monkeypatch, capsys):
    """The artifact folder turns read-only while the model trains: every epoch trains, then writing the
    reports fails. The run ends FAILED saying where the weights are and what to run; the same command,
    once the folder is writable again, trains nothing and evaluates and logs the same run."""
    artifacts, freeze, thaw = freezable   # ./mlruns: the experiment's artifact folder
    real_fit = train.fit

    def fit_then_the_disk_turns_read_only(*args, **kwargs):
        result = real_fit(*args, **kwargs)
        freeze()
        return result

    monkeypatch.setattr(train, "fit", fit_then_the_disk_turns_read_only)
    flags = ["train", *cli_flags(TINY)]
    started = time.monotonic()
    assert cli.main(flags) == 1
    line = _error_line(capsys.readouterr().err)
    (run,) = all_runs(mlflow_store)
    backup = Path(run.data.tags[TAG + "checkpoint_dir"])
    assert run.info.status == "FAILED"
    for text in (line, run.data.tags["error"]):
        assert "logging its results failed" in text and "Read-only file system" in text, text
        assert f"kept in {backup}" in text and "run the same command again" in text, text
    assert "The command: alexnet-keras train --variant cifar" in line
    assert checkpoints.saved_epoch(backup) == TINY["epochs"]   # every epoch, kept
    assert [s for s, _ in _history(mlflow_store, run.info.run_id, "train_time_s")] == [0]

    thaw()
    monkeypatch.setattr(train, "fit", real_fit)
    assert cli.main(flags) == 0
    assert "nothing left to train" in capsys.readouterr().out
    (run,) = all_runs(mlflow_store)   # the same run, now complete
    assert run.info.status == "FINISHED" and "error" not in run.data.tags
    assert run.data.tags[TAG + "resumed_from_epoch"] == str(TINY["epochs"])
    for key in ("train_time_s", "epoch_time_s", "test_accuracy", "final_train_accuracy"):
        assert len(_history(mlflow_store, run.info.run_id, key)) == 1, key   # once: not from the re-run
    assert [s for s, _ in _history(mlflow_store, run.info.run_id, "loss")] == [0, 1]
    listing = {f.path for f in MlflowClient().list_artifacts(run.info.run_id)}
    assert {"reports", "figures", "summary"} <= listing and "model" not in listing
    assert not backup.exists()   # FINISHED: the checkpoint goes
    assert time.monotonic() - started < 600


def test_a_child_run_without_checkpoint_keeps_its_model_as_a_keras_file(mlflow_store, monkeypatch):
    """A study's child (no checkpoint) whose model cannot be logged: the trained model is saved where
    it can be, with the preprocessing `predict` needs, and the error says where."""
    from alexnet_keras.model.inference import load_keras_predictor

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tracking, "log_keras_model", disk_full)
    parent = MlflowClient().create_run(mlflow.set_experiment("study").experiment_id).info.run_id
    config = load_config(overrides={**TINY, "experiment": "study"})
    with pytest.raises(train.ResultsNotLogged) as failure:
        train.train_and_evaluate(config, parent_run_id=parent)
    child = next(r for r in all_runs(mlflow_store) if r.info.run_id != parent)
    kept = Path("checkpoints", child.info.run_id, "model.keras").resolve()
    assert f"kept as {kept}" in str(failure.value) and "No space left on device" in str(failure.value)
    assert child.info.status == "FAILED" and f"kept as {kept}" in child.data.tags["error"]
    predictor = load_keras_predictor(kept)
    assert list(predictor.class_names) == ["class_0", "class_1", "class_2", "class_3"]


def test_a_model_is_kept_in_a_temporary_folder_when_the_checkpoint_folder_fails(tiny_model):
    model, data = tiny_model
    path = train.keep_model(model, data, Path("/dev/null/checkpoints"))
    try:
        assert path is not None and path.is_file() and path.name == "model.keras"
        assert path.with_name("model.preprocessing.json").is_file()
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)


# --- 2. a full disk while writing a checkpoint ----------------------------------------------------

def test_full_disk_at_the_first_checkpoint_is_one_clear_error_not_a_crash(store_uri, tmp_path, tmpfs):
    """h5py's Errno 28 used to print three tracebacks, then the interpreter died with a segfault."""
    full = tmpfs(tmp_path / "small", "2m")   # less than one checkpoint (4.7 MB)
    done = subprocess.run([sys.executable, "-m", "alexnet_keras", "train", *cli_flags(TINY),
                           "--checkpoint-dir", str(full)], cwd=tmp_path, env=subprocess_env(store_uri),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])   # a segfault is -11
    line = _error_line(done.stderr)
    assert "could not write the checkpoint of epoch 1" in line and "No space left on device" in line
    assert "Can't decrement id ref count" not in done.stderr   # h5py's complaints at exit are gone too
    (run,) = all_runs(store_uri)
    assert run.info.status == "FAILED" and "No space left on device" in run.data.tags["error"]
    assert list(full.iterdir()) == []   # no half-written file, no empty run folder


def test_full_disk_at_a_later_checkpoint_keeps_the_previous_one_to_continue_from(mlflow_store, tmp_path, tmpfs,
                                                                               capsys, monkeypatch):
    folder = tmpfs(tmp_path / "small", "7m")   # one checkpoint fits, not a second one beside it
    flags = ["train", *cli_flags(TINY), "--checkpoint-dir", str(folder)]
    assert cli.main(flags) == 2
    line = _error_line(capsys.readouterr().err)
    assert "could not write the checkpoint of epoch 2" in line and "The checkpoint of epoch 1 is kept" in line
    (run,) = all_runs(mlflow_store)
    assert run.info.status == "FAILED"
    assert checkpoints.saved_epoch(Path(run.data.tags[TAG + "checkpoint_dir"])) == 1

    old = Path(run.data.tags[TAG + "checkpoint_dir"])

    # The same command with a checkpoint folder on another disk: the checkpoint moves there (where the run
    # continues from is the point: no evaluation).
    roomy = tmp_path / "roomy"
    monkeypatch.setattr(train, "log_trained_model", lambda *args, **kwargs: {})
    assert cli.main([*flags, "--checkpoint-dir", str(roomy)]) == 0
    assert "resuming from the checkpoint of epoch 1 of 2" in capsys.readouterr().out
    (run,) = all_runs(mlflow_store)   # the same run continued from epoch 1
    assert run.info.status == "FINISHED" and run.data.tags[TAG + "resumed_from_epoch"] == "1"
    assert [s for s, _ in _history(mlflow_store, run.info.run_id, "loss")] == [0, 1]
    assert TAG + "checkpoint_dir" not in run.data.tags   # the checkpoint went as the run FINISHED, its tag with it
    assert not old.exists() and not roomy.exists()   # moved, then deleted, and the emptied folder too


def test_checkpoint_writes_leave_no_open_file_and_the_previous_checkpoint_whole(tiny_model, tmp_path, tmpfs):
    import h5py

    model, _ = tiny_model
    folder = tmpfs(tmp_path / "small", "7m") / "run"
    checkpoints.save(model, folder, 1)
    first = [np.array(w) for w in model.weights]
    model.set_weights([w + 1 for w in model.get_weights()])
    with pytest.raises(checkpoints.CheckpointError, match="No space left on device") as err:
        checkpoints.save(model, folder, 2)
    assert "\n" not in str(err.value)
    assert not [f for f in h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE) if str(folder) in os.fsdecode(f.name)]
    assert sorted(p.name for p in folder.iterdir()) == [checkpoints.WEIGHTS, checkpoints.METADATA]
    assert checkpoints.restore(model, folder) == 1
    for a, b in zip(first, model.weights):
        np.testing.assert_array_equal(a, np.array(b))


# --- 3. write paths probed before the run opens -----------------------------------------------------

def test_checkpoint_folder_that_cannot_be_created_fails_before_any_run(mlflow_store, capsys):
    assert cli.main(["train", *cli_flags(TINY), "--checkpoint-dir", "/dev/null/checkpoints"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "/dev/null/checkpoints" in line and "--checkpoint-dir" in line
    assert all_runs(mlflow_store) == []


# --- 4. the store is reached or refused within seconds ---------------------------------------------

@pytest.mark.parametrize("uri, reason", [
    ("http://127.0.0.1:9", "Connection refused"),     # nothing listens on the discard port
    ("http://", "Failed to resolve"),                 # no host at all
])
def test_unreachable_tracking_server_is_refused_within_seconds(monkeypatch, tmp_path, capsys, uri, reason):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    for key in tracking.QUICK_REQUESTS:
        monkeypatch.delenv(key, raising=False)
    started = time.monotonic()
    assert cli.main(["train", *cli_flags(TINY)]) == 2   # MLflow alone retries for about 250 s
    assert time.monotonic() - started < 15
    line = _error_line(capsys.readouterr().err)
    assert "cannot be reached" in line and reason in line and "--tracking-uri" in line
    assert not [key for key in tracking.QUICK_REQUESTS if key in os.environ]   # set for the preflight only


def test_quick_requests_keep_what_the_user_set(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    with tracking.quick_requests():
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "300"
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "300" and "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ


# --- 5. damaged checkpoints on resume ----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    """A compiled tiny AlexNet (optimizer state included, as after training; a checkpoint of 4.7 MB)
    and its data, never trained: checkpoints are about its variables."""
    data, model = train.prepare(load_config(overrides=TINY))
    model.optimizer.build(model.trainable_variables)
    return model, data


def _two_checkpoints(model, folder):
    """Checkpoints of epochs 1 and 2 (different weights); returns the weights of each."""
    saved = {}
    for epoch in (1, 2):
        model.set_weights([w + epoch for w in model.get_weights()])
        checkpoints.save(model, folder, epoch)
        saved[epoch] = [np.array(w) for w in model.weights]
    return saved


def _assert_weights(model, expected):
    for a, b in zip(expected, model.weights):
        np.testing.assert_array_equal(a, np.array(b))


def test_restore_takes_the_newest_intact_checkpoint(tiny_model, tmp_path):
    model, _ = tiny_model
    folder = tmp_path / "run"
    saved = _two_checkpoints(model, folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [checkpoints.WEIGHTS, checkpoints.METADATA, checkpoints.WEIGHTS + ".bkp", checkpoints.METADATA + ".bkp"])
    assert checkpoints.restore(model, folder) == 2
    _assert_weights(model, saved[2])

    (folder / checkpoints.WEIGHTS).write_bytes(b"\x89HDF\r\n\x1a\n torn")   # damaged: the copy before
    assert checkpoints.restore(model, folder) == 1
    _assert_weights(model, saved[1])
    assert checkpoints.restore(model, tmp_path / "nothing") == 0


def test_restore_after_a_kill_between_the_renames_pairs_weights_by_content(tiny_model, tmp_path):
    model, _ = tiny_model
    folder = tmp_path / "run"
    saved = _two_checkpoints(model, folder)
    # The state a kill leaves after epoch 3's weights were written and the current ones moved aside.
    (folder / (checkpoints.WEIGHTS + ".bkp")).unlink()
    os.replace(folder / checkpoints.WEIGHTS, folder / (checkpoints.WEIGHTS + ".bkp"))
    (folder / ".partial-123.weights.h5").write_bytes(b"half")
    assert checkpoints.restore(model, folder) == 2   # its metadata names the moved file by its sha256
    _assert_weights(model, saved[2])
    assert not list(folder.glob(".partial-*"))


def test_a_checkpoint_written_by_keras_backup_and_restore_still_restores(tiny_model, tmp_path):
    model, _ = tiny_model
    folder = tmp_path / "run"
    folder.mkdir()
    model.optimizer.build(model.trainable_variables)
    model.save_weights(str(folder / checkpoints.WEIGHTS))
    expected = [np.array(w) for w in model.weights]
    (folder / checkpoints.METADATA).write_text(json.dumps({"epoch": 3, "batch": 0}))
    model.set_weights([w * 0 for w in model.get_weights()])
    assert checkpoints.restore(model, folder) == 3
    _assert_weights(model, expected)


def test_both_copies_damaged_is_one_clear_message_naming_resume_false(tiny_model, tmp_path):
    model, _ = tiny_model
    folder = tmp_path / "run"
    _two_checkpoints(model, folder)
    for name in (checkpoints.WEIGHTS, checkpoints.WEIGHTS + ".bkp"):
        (folder / name).write_bytes(b"not HDF5 at all")
    with pytest.raises(checkpoints.CheckpointError) as err:
        checkpoints.restore(model, folder)
    assert "both copies are damaged" in str(err.value) and "--resume false" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.fixture
def interrupt_at_epoch(monkeypatch):
    """interrupt(epoch): Ctrl-C as that epoch begins, once, through the real callbacks of train.fit."""
    import keras

    def interrupt(at):
        class CtrlC(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                if epoch == at:
                    raise KeyboardInterrupt

        real, calls = train.build_callbacks, []

        def build_callbacks(config, backup_dir=None, **kwargs):
            calls.append(config)
            return real(config, backup_dir, **kwargs) + ([CtrlC()] if len(calls) == 1 else [])

        monkeypatch.setattr(train, "build_callbacks", build_callbacks)

    return interrupt


def test_resume_with_both_checkpoint_copies_damaged_says_resume_false(mlflow_store, interrupt_at_epoch, capsys,
                                                                     monkeypatch):
    interrupt_at_epoch(2)
    flags = ["train", *cli_flags({**TINY, "epochs": 3})]
    assert cli.main(flags) == 130
    (killed,) = all_runs(mlflow_store)
    backup = Path(killed.data.tags[TAG + "checkpoint_dir"])
    for name in (checkpoints.WEIGHTS, checkpoints.WEIGHTS + ".bkp"):
        (backup / name).write_bytes(b"\0" * 100)
    capsys.readouterr()
    assert cli.main(flags) == 2
    line = _error_line(capsys.readouterr().err)
    assert str(backup) in line and "--resume false" in line
    (run,) = all_runs(mlflow_store)
    assert run.info.status == "KILLED"   # left as it was: no run reopened, none created

    monkeypatch.setattr(train, "log_trained_model", lambda *args, **kwargs: {})   # a new run is the point
    assert cli.main([*flags, "--resume", "false"]) == 0   # the hint works
    assert sorted(r.info.status for r in all_runs(mlflow_store)) == ["FINISHED", "KILLED"]


# --- 6. stopped after training, then the same command ------------------------------------------------

@pytest.mark.parametrize("stop_in", ["evaluate", "log_keras_model"])
def test_stopped_after_training_the_same_command_logs_each_metric_once(mlflow_store, monkeypatch, capsys,
                                                                       stop_in):
    """SIGTERM during the evaluation, or Ctrl-C while the model is logged (after the test metrics):
    the run is KILLED with every epoch in its checkpoint; the same command trains nothing, logs no
    timing for it, and logs the test metrics once."""
    owner = train if stop_in == "evaluate" else tracking
    real = getattr(owner, stop_in)
    calls = []

    def stop_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            if stop_in == "evaluate":
                os.kill(os.getpid(), signal.SIGTERM)   # a scheduler stopping the job: taken as Ctrl-C
                time.sleep(5)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, stop_in, stop_once)
    flags = ["train", *cli_flags(TINY)]
    assert cli.main(flags) == 130
    (killed,) = all_runs(mlflow_store)
    assert killed.info.status == "KILLED"
    assert checkpoints.saved_epoch(Path(killed.data.tags[TAG + "checkpoint_dir"])) == TINY["epochs"]
    assert ("test_accuracy" in killed.data.metrics) == (stop_in == "log_keras_model")
    first_time = _history(mlflow_store, killed.info.run_id, "train_time_s")

    assert cli.main(flags) == 0
    (run,) = all_runs(mlflow_store)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert _history(mlflow_store, run.info.run_id, "train_time_s") == first_time   # no 0.09 s "training"
    assert first_time[0][1] > 0.5
    for key in ("epoch_time_s", "test_accuracy", "test_loss", "final_train_accuracy"):
        assert len(_history(mlflow_store, run.info.run_id, key)) == 1, key
    assert [s for s, _ in _history(mlflow_store, run.info.run_id, "loss")] == [0, 1]


# --- 7. more of the same spirit -----------------------------------------------------------------------

@pytest.mark.parametrize("uri", ["sqlite://", "sqlite:///:memory:"])
def test_in_memory_store_is_refused_as_it_would_lose_every_run(tmp_path, monkeypatch, capsys, uri):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", *cli_flags(TINY), "--tracking-uri", uri]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "in-memory" in line and "sqlite:///PATH/mlflow.db" in line


def test_store_uri_of_an_unknown_kind_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", *cli_flags(TINY), "--tracking-uri", "foo://bar"]) == 2
    assert "foo://bar" in _error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_deleted_experiment_is_one_line_and_no_run(mlflow_store, capsys):
    client = MlflowClient()
    client.delete_experiment(client.create_experiment("gone"))
    assert cli.main(["train", *cli_flags(TINY), "--experiment", "gone"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "'gone'" in line and "deleted" in line
    assert all_runs(mlflow_store) == []


def test_mlflow_run_id_that_does_not_exist_is_one_line(mlflow_store, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_RUN_ID", "0123456789abcdef0123456789abcdef")
    assert cli.main(["train", *cli_flags(TINY)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "0123456789abcdef0123456789abcdef" in line and "mlflow run" in line
    assert all_runs(mlflow_store) == []


# --- a store that stops answering while the model trains (issue 25) ------------------------------------

LOCKER = """
import sqlite3, sys
store = sqlite3.connect(sys.argv[1], isolation_level=None)
store.execute("BEGIN EXCLUSIVE")   # what a DB browser or a long transaction of another program does
print("locked", flush=True)
sys.stdin.readline()
store.execute("ROLLBACK")
"""


@pytest.fixture
def short_sqlite_wait():
    """MLflow waits 20 s for a locked SQLite store (`PRAGMA busy_timeout = 20000` in every session): 1 s
    here, so that a lock of a few seconds outlasts MLflow's own wait."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    def shorter(conn, cursor, statement, parameters, context, executemany):
        return statement.replace("busy_timeout = 20000", "busy_timeout = 1000"), parameters

    event.listen(Engine, "before_cursor_execute", shorter, retval=True)
    yield
    event.remove(Engine, "before_cursor_execute", shorter)


def test_a_store_locked_by_another_process_loses_no_epoch(mlflow_store, short_sqlite_wait, monkeypatch, capsys):
    """Another process holds the store's write lock (BEGIN EXCLUSIVE) from epoch 2 until epoch 3 begins, longer
    than MLflow waits: training goes on, the checkpoint keeps the metrics that wait, the end of epoch 3 writes
    those of epochs 2 and 3, each once; one warning as the store stops answering, one as it answers again."""
    import keras

    locker, folder = [], Path(mlflow_store.removeprefix("sqlite:///")).parent

    class Lock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                locker.append(subprocess.Popen([sys.executable, "-c", LOCKER, folder / "mlflow.db"],
                                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
                assert locker[0].stdout.readline() == "locked\n"
            elif epoch == 2:
                (metadata,) = folder.glob(f"checkpoints/*/{checkpoints.METADATA}")
                locker.append({m[3] for m in json.loads(metadata.read_text())["unlogged_metrics"]})
                locker[0].communicate("\n", timeout=30)

    real = train.build_callbacks
    monkeypatch.setattr(train, "build_callbacks", lambda *args, **kwargs: [*real(*args, **kwargs), Lock()])
    monkeypatch.setattr(train, "log_trained_model", lambda *args, **kwargs: {})   # the epochs' metrics are the point
    assert cli.main(["train", *cli_flags({**TINY, "epochs": 3})]) == 0
    err = capsys.readouterr().err
    assert err.count("does not take the metrics of epoch 2") == 1 and err.count("answers again") == 1, err
    assert "Traceback" not in err and "database error" not in err, err   # MLflow's log of each failed query
    assert locker[0].returncode == 0 and locker[1] == {1}   # the lock was held; the checkpoint kept the metrics
    (run,) = all_runs(mlflow_store)
    assert run.info.status == "FINISHED"
    for key in ("loss", "val_accuracy"):
        assert [s for s, _ in _history(mlflow_store, run.info.run_id, key)] == [0, 1, 2], key
    assert not (folder / "checkpoints").exists()   # FINISHED: the checkpoint goes


def test_a_store_gone_past_the_bound_ends_killed_and_the_same_command_writes_what_waited(
        mlflow_store, monkeypatch, capsys):
    """The store takes no metrics after epoch 1 for longer than $ALEXNET_KERAS_STORE_WAIT_S: training ends, the
    run ends KILLED with its checkpoint, which keeps the metrics that waited; the same command, once the store is
    back, trains nothing, writes them (every epoch once) and ends FINISHED."""
    from mlflow.exceptions import MlflowException

    real = MlflowClient.log_batch

    def gone_after_epoch_1(self, run_id, metrics=(), *args, **kwargs):
        if any(m.key == "loss" and m.step >= 1 for m in metrics):
            raise MlflowException("API request to http://127.0.0.1:5000 failed: [Errno 111] Connection refused")
        return real(self, run_id, metrics, *args, **kwargs)

    monkeypatch.setenv(tracking.STORE_WAIT_ENV, "1")
    flags = ["train", *cli_flags(TINY)]   # 2 epochs
    with monkeypatch.context() as patched:
        patched.setattr(MlflowClient, "log_batch", gone_after_epoch_1)
        assert cli.main(flags) == 2
    line = _error_line(capsys.readouterr().err)
    assert "has not answered for" in line and "Connection refused" in line and "ends KILLED" in line, line
    (run,) = all_runs(mlflow_store)
    backup = Path(run.data.tags[TAG + "checkpoint_dir"])
    assert run.info.status == "KILLED" and checkpoints.saved_epoch(backup) == 2
    assert [s for s, _ in _history(mlflow_store, run.info.run_id, "loss")] == [0]

    monkeypatch.setattr(train, "log_trained_model", lambda *args, **kwargs: {})   # the epochs' metrics are the point
    assert cli.main(flags) == 0
    assert "nothing left to train" in capsys.readouterr().out
    (resumed,) = all_runs(mlflow_store)
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    for key in ("loss", "val_accuracy"):
        assert [s for s, _ in _history(mlflow_store, run.info.run_id, key)] == [0, 1], key
    assert not backup.exists()


def test_an_experiment_kind_tagged_by_another_process_first_is_not_an_error(mlflow_store, monkeypatch):
    """Processes starting together on a new experiment race to tag it; SQLite refuses the loser's insert."""
    from mlflow.exceptions import MlflowException

    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment(client.create_experiment("raced"))   # read before the other tags it
    real = MlflowClient.set_experiment_tag

    def lost_the_race(self, *args):
        real(self, *args)   # the other process's insert
        raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: experiment_tags.key")

    monkeypatch.setattr(MlflowClient, "set_experiment_tag", lost_the_race)
    tracking.mark_model_training(experiment)
    tags = client.get_experiment(experiment.experiment_id).tags
    assert tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
