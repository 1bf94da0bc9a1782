"""Interrupted training continues where it stopped, in the same MLflow run; `--deterministic` reruns match.

The store exists before any training process starts (a copy of the session's migrated template): two
processes creating a new SQLite store at once race on its schema (mlflow#4123).
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import TINY, all_runs, cli_flags, copy_store, run_script, subprocess_env, wait_for_checkpoint
from mlflow.tracking import MlflowClient

from alexnet_keras import cli, tracking
from alexnet_keras.training import checkpoints, train
from alexnet_keras.config import load_config

TAG = tracking.TAG_PREFIX


def _steps(uri, run_id, key):
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_sigkill_mid_epoch_then_the_same_command_continues_the_same_run(mlflow_store, tmp_path, capsys):
    uri = mlflow_store   # the store exists before the training process starts
    flags = ["train", *cli_flags({**TINY, "epochs": 3})]
    # Killed as soon as epoch 1's checkpoint is on disk: epochs 2 and 3, the evaluation and the model's logging
    # are still ahead (seconds), so the kill lands in epoch 2 (or 3).
    proc = subprocess.Popen([sys.executable, "-m", "alexnet_keras", *flags], cwd=tmp_path, env=subprocess_env(uri),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_checkpoint(proc, tmp_path)   # an epoch is done
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    (metadata,) = tmp_path.glob("checkpoints/*/training_metadata.json")
    checkpoint_epoch = json.loads(metadata.read_text())["epoch"]
    assert 1 <= checkpoint_epoch < 3
    (dead,) = all_runs(uri)
    assert dead.info.status == "RUNNING"   # nobody was left to end it

    # The same command, here: only the killed process had to be one of its own.
    assert cli.main(flags) == 0
    out = capsys.readouterr().out
    run_id = dead.info.run_id
    assert f"marked run {run_id} KILLED" in out
    assert f"continuing run {run_id}" in out
    (run,) = all_runs(uri)   # no second run
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert run.data.tags[TAG + "resumed_from_epoch"] == str(checkpoint_epoch)
    assert TAG + "end_reason" not in run.data.tags   # it ended FINISHED this time
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert _steps(uri, run_id, key) == [0, 1, 2], key   # every epoch once: none lost, none twice
    assert _steps(uri, run_id, "num_params") == [0]   # run-level metrics are not logged again either
    assert "test_accuracy" in run.data.metrics
    assert not metadata.parent.exists()   # the checkpoint goes when the run is FINISHED


@pytest.fixture
def interrupt_after_first_epoch(monkeypatch):
    """Ctrl-C as the second epoch begins (once), through the real callbacks of train.fit."""
    import keras

    class CtrlC(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt

    real = train.build_callbacks
    calls = []

    def build_callbacks(config, backup_dir=None, **kwargs):
        calls.append(config)
        return real(config, backup_dir, **kwargs) + ([CtrlC()] if len(calls) == 1 else [])

    monkeypatch.setattr(train, "build_callbacks", build_callbacks)


def test_ctrl_c_keeps_the_checkpoint_and_only_the_same_command_continues_it(mlflow_store, monkeypatch,
                                                                             interrupt_after_first_epoch):
    flags = cli_flags(TINY)
    assert cli.main(["train", *flags]) == 130
    (killed,) = all_runs(mlflow_store)
    assert killed.info.status == "KILLED"
    backup = Path(killed.data.tags[TAG + "checkpoint_dir"])
    assert json.loads((backup / "training_metadata.json").read_text())["epoch"] == 1   # kept

    with monkeypatch.context() as patch:   # which run each command opens is the point: no training, no evaluation
        patch.setattr(train, "fit", lambda *args, **kwargs: ({"loss": [1.0], "accuracy": [0.5]}, 0.1, 0))
        patch.setattr(train, "log_trained_model", lambda *args, **kwargs: {})
        assert cli.main(["train", *flags, "--resume", "false"]) == 0        # asked for a new run
        assert cli.main(["train", *flags, "--learning-rate", "0.05"]) == 0  # another config: a new run
        assert cli.main(["train", *flags, "--run-name", "Bob's run"]) == 0  # another name: a new run
    runs = {r.info.run_id: r for r in all_runs(mlflow_store)}
    assert len(runs) == 4 and runs[killed.info.run_id].info.status == "KILLED"

    # The same command continues the KILLED run (its evaluation and model are the SIGKILL test's).
    monkeypatch.setattr(train, "log_trained_model", lambda *args, **kwargs: {})
    assert cli.main(["train", *flags]) == 0
    runs = {r.info.run_id: r for r in all_runs(mlflow_store)}
    assert len(runs) == 4
    resumed = runs[killed.info.run_id]
    assert resumed.info.status == "FINISHED" and resumed.data.tags[TAG + "resumed_from_epoch"] == "1"
    assert _steps(mlflow_store, killed.info.run_id, "loss") == [0, 1]
    assert not backup.exists()


def test_a_resumed_fit_restores_weights_optimizer_state_and_epoch(mlflow_store, tmp_path):
    config = load_config(overrides={**TINY, "epochs": 1})
    backup = tmp_path / "backup"
    data, model = train.prepare(config)
    with mlflow.start_run(experiment_id=mlflow.set_experiment("resume").experiment_id) as run:
        train.fit(model, data, config, backup)
    assert checkpoints.saved_epoch(backup) == 1
    weights = [np.array(v) for v in model.weights]
    # Keyed by the path below the optimizer's own name (sgd, then sgd_1 in this one process).
    optimizer_state = {v.path.split("/", 1)[-1]: np.array(v) for v in model.optimizer.variables}
    assert int(optimizer_state["iteration"]) == data.steps_per_epoch

    data, fresh = train.prepare(config)   # a new process would build the model from scratch
    assert not all(np.array_equal(a, np.array(b)) for a, b in zip(weights, fresh.weights))
    with mlflow.start_run(run_id=run.info.run_id):
        history, _, initial_epoch = train.fit(fresh, data, config, backup)
    assert initial_epoch == 1 and history == {}   # nothing left to train
    for a, b in zip(weights, fresh.weights):
        np.testing.assert_array_equal(a, np.array(b))
    restored = {v.path.split("/", 1)[-1]: np.array(v) for v in fresh.optimizer.variables}
    assert restored.keys() == optimizer_state.keys()
    for path, value in optimizer_state.items():   # momentum buffers and the step count
        np.testing.assert_array_equal(value, restored[path], err_msg=path)


def test_runs_left_running_by_dead_processes_are_marked_killed(mlflow_store):
    import socket

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    experiment_id = mlflow.set_experiment("owners").experiment_id
    client = MlflowClient()
    here, me = socket.gethostname(), os.getpid()
    owners = {
        "dead": (here, gone.pid, ""),
        "alive": (here, me, tracking.process_start(me)),
        "pid_reused": (here, me, "1"),            # this pid now belongs to another process
        "other_host": ("elsewhere", gone.pid, ""),   # cannot be checked from here: left alone
    }
    ids = {}
    for name, (host, pid, start) in owners.items():
        run = client.create_run(experiment_id, run_name=name,
                                tags={TAG + "host": host, TAG + "pid": str(pid), TAG + "pid_start": start})
        ids[name] = run.info.run_id
    marked = tracking.mark_dead_runs("owners")
    assert sorted(marked) == sorted([ids["dead"], ids["pid_reused"]])
    status = {name: client.get_run(run_id).info.status for name, run_id in ids.items()}
    assert status == {"dead": "KILLED", "alive": "RUNNING", "pid_reused": "KILLED", "other_host": "RUNNING"}
    assert "died" in client.get_run(ids["dead"]).data.tags[TAG + "end_reason"]


def test_parents_and_children_are_found_by_tags_and_adopted_by_a_new_parent(mlflow_store):
    """The one protocol of studies and sweeps (tracking.py): find by tags (values with quotes too), the
    newest child per key, stale children ended, an earlier parent's finished children adopted."""
    client = MlflowClient()
    experiment_id = mlflow.set_experiment("parents").experiment_id
    study = {TAG + "study": "Bob's study", TAG + "study_role": "parent"}   # a quote: compared in Python
    old = client.create_run(experiment_id, tags=study).info.run_id
    time.sleep(0.01)
    new = client.create_run(experiment_id, tags=study).info.run_id
    client.create_run(experiment_id, tags={**study, TAG + "study": "Bob's other study"})

    def child(parent, key, status):
        run_id = client.create_run(experiment_id, tags={tracking.PARENT_TAG: parent, tracking.CONFIG_DIGEST_TAG: key}
                                   ).info.run_id
        if status != "RUNNING":
            client.set_terminated(run_id, status)
        return run_id

    done_a = child(old, "a", "FINISHED")
    failed_b = child(old, "b", "FAILED")
    done_b = child(old, "b", "FINISHED")
    other_c = child(old, "c", "FINISHED")            # not wanted any more: stays with the old parent
    mine_a = child(new, "a", "FINISHED")             # the new parent has "a" already
    stale = child(new, "d", "RUNNING")
    assert [r.info.run_id for r in tracking.find_runs(study, experiment_ids=[experiment_id])] == [new, old]
    assert tracking.find_runs(study)[0].info.run_id == new

    assert tracking.end_stale_children(new, "stale: restarted") == [stale]
    moved = tracking.adopt_children(new, tracking.find_runs(study), key_tag=tracking.CONFIG_DIGEST_TAG,
                                    wanted={"a", "b", "d"}, retire={TAG + "study_role": "superseded"})
    assert moved == 1
    finished = tracking.children_by(new, tracking.CONFIG_DIGEST_TAG, status="FINISHED")
    assert {k: r.info.run_id for k, r in finished.items()} == {"a": mine_a, "b": done_b}
    assert {r.info.run_id for r in tracking.child_runs(old)} == {done_a, failed_b, other_c}
    assert client.get_run(done_b).data.tags[tracking.ADOPTED_FROM_TAG] == old
    old_tags = client.get_run(old).data.tags
    assert old_tags[tracking.SUPERSEDED_BY_TAG] == new and old_tags[TAG + "study_role"] == "superseded"
    assert client.get_run(stale).info.status == "KILLED"
    assert client.get_run(stale).data.tags[TAG + "end_reason"] == "stale: restarted"
    # Without a key every child moves (a sweep's trials, finished or not, go where the sweep goes on).
    assert tracking.adopt_children(old, [client.get_run(new)]) == 3
    assert {r.info.run_id for r in tracking.child_runs(new)} == set()


def _metric_histories(uri, run_id):
    client = MlflowClient(uri)
    return {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
            for key in ("loss", "accuracy", "val_loss", "val_accuracy")}


# Process A: a training without --deterministic leaves TensorFlow's op determinism off, then trains "first"
# with --deterministic (which switches it on); process B, at the same time, trains "second", then
# "other_seed". So "first" and "second" come from two processes, and "first" had other work before it.
DETERMINISTIC_SCRIPT = """
import json, sys
from tensorflow.python.framework import config as tf_config
from alexnet_keras import cli
from alexnet_keras.config import load_config
from alexnet_keras.training import train
from alexnet_keras.training.train import prepare

train.log_trained_model = lambda *args, **kwargs: {}   # the epochs' metrics are compared, not the evaluation
tiny, flags, names = json.loads(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
out = {}
if "first" in names:
    prepare(load_config(overrides=tiny))
    out["default"] = tf_config.is_op_determinism_enabled()
for name in names:
    extra = ["--seed", "1"] if name == "other_seed" else []
    assert cli.main(["train", *flags, "--deterministic", *extra, "--run-name", name]) == 0, name
    out.setdefault("deterministic", tf_config.is_op_determinism_enabled())
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def deterministic_runs(store_template, tmp_path_factory):
    """Three `--deterministic` trainings in two fresh processes at once (the switch is global and cannot be
    undone in the test process); returns the store's URI and what process A saw of the switch."""
    from concurrent.futures import ThreadPoolExecutor

    folder = tmp_path_factory.mktemp("deterministic")
    uri = copy_store(store_template, folder)
    # Created before the two processes start: two creating it at once race (mlflow#4123).
    MlflowClient(uri).create_experiment(load_config().experiment, artifact_location=str(folder / "mlruns"))
    env = subprocess_env(uri)
    # run_script lays env over this process's: drop the MLFLOW_* earlier tests may have left here.
    env.update({key: None for key in os.environ if key.startswith("MLFLOW_") and key not in env})
    flags = json.dumps(cli_flags({**TINY, "epochs": 2}))
    with ThreadPoolExecutor(2) as pool:
        results = pool.map(lambda names: run_script(DETERMINISTIC_SCRIPT, json.dumps(TINY), flags, json.dumps(names),
                                                    env=env, cwd=folder, timeout=600),
                           (["first"], ["second", "other_seed"]))
        seen = {key: value for result in results for key, value in result.items()}
    return uri, seen


def test_deterministic_runs_log_identical_metrics(deterministic_runs):
    uri, _ = deterministic_runs
    runs = {r.info.run_name: r for r in all_runs(uri)}
    assert runs["first"].data.params["deterministic"] == "true"
    first, second, other = (_metric_histories(uri, runs[n].info.run_id) for n in ("first", "second", "other_seed"))
    assert first == second   # bit-identical, every epoch, from two processes
    assert first != other    # the comparison does see a difference when there is one


def test_deterministic_switches_on_tensorflow_op_determinism(deterministic_runs):
    _, seen = deterministic_runs
    assert seen == {"default": False, "deterministic": True}


def test_deterministic_on_jax_asks_xla_for_deterministic_gpu_ops(monkeypatch):
    import keras

    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    monkeypatch.setattr(train, "enable_op_determinism", lambda: None)
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    train.enable_determinism()
    train.enable_determinism()   # twice: the flag is added once
    assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_gpu_deterministic_ops=true"


def _descendants(pid):
    """Every live process below `pid` (Linux /proc)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the training process through /proc")
def test_mlflow_run_killed_then_run_again_continues_in_one_run(mlflow_store, tmp_path, monkeypatch):
    """`mlflow run` makes a new run each time: the new one takes over the killed one's epochs. The killed launch
    is MLflow's launcher (`mlflow.projects.run`, which the `mlflow run` command calls) here, the training a
    process of its own; the second is `mlflow run . -P lrn=false ...` exactly as a user types it (with the local
    env manager)."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    from mlflow.exceptions import ExecutionException
    from mlflow.projects import run as mlflow_run

    root = Path(__file__).resolve().parent.parent
    project = tmp_path / "project"   # a copy, so the checkpoints/ the project writes stay in tmp_path
    shutil.copytree(root, project, ignore=shutil.ignore_patterns(
        ".venv", ".git", "mlruns", "mlflow.db", "checkpoints", "tuner", "test-artifacts", "*.egg-info",
        "__pycache__", ".pytest_cache"))
    uri = mlflow_store
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    # Killed once epoch 1's checkpoint is on disk: two epochs, the evaluation and the model's logging are ahead.
    params = {"lrn": "false", "dataset": "synthetic", "train_limit": 64, "width": 0.125, "batch_size": 32,
              "epochs": 3, "init": "keras"}

    def launch():   # `mlflow run PROJECT --env-manager local --experiment-name NAME -P key=value ...`
        return mlflow_run(str(project), parameters=params, env_manager="local",
                          experiment_name="resume-under-mlflow-run")

    def trainers():   # the training process, not this one
        return [pid for pid in _descendants(os.getpid()) if b"alexnet_keras" in _cmdline(pid)]

    with ThreadPoolExecutor(1) as pool:
        launcher = pool.submit(launch)
        try:
            deadline = time.monotonic() + 300
            while not list(project.glob("checkpoints/*/training_metadata.json")):
                assert not launcher.done(), launcher.exception()
                assert time.monotonic() < deadline, "no checkpoint was written"
                time.sleep(0.05)
        finally:
            for pid in trainers():
                with _ignore_gone():   # it may exit between the listing and the kill
                    os.kill(pid, signal.SIGKILL)
        with pytest.raises(ExecutionException):
            launcher.result(timeout=120)
    (killed,) = all_runs(uri)
    assert killed.info.status == "FAILED"   # what the launcher makes of a killed child

    env = subprocess_env(uri)
    # The MLproject command runs `python`: the one of this environment, as in an activated venv.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    command = [sys.executable, "-m", "mlflow", "run", str(project), "--env-manager", "local",
               "--experiment-name", "resume-under-mlflow-run"]
    for key, value in params.items():
        command += ["-P", f"{key}={value}"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = all_runs(uri)   # the killed run is deleted: one run shows the training
    assert run.info.run_id != killed.info.run_id and run.info.status == "FINISHED"
    assert run.data.params["lrn"] == "false" and run.data.params["variant"] == "cifar"
    assert "test_accuracy" in run.data.metrics
    mlflow.set_tracking_uri(uri)
    model = mlflow.keras.load_model(f"runs:/{run.info.run_id}/alexnet")
    assert not [layer for layer in model.layers if "lrn" in layer.name]
    assert [layer for layer in model.layers if layer.name == "conv5"]
    assert run.data.tags[TAG + "resumed_from_run"] == killed.info.run_id
    assert int(run.data.tags[TAG + "resumed_from_epoch"]) >= 1
    for key in ("loss", "val_accuracy", "num_params"):
        expected = [0, 1, 2] if key != "num_params" else [0]
        assert _steps(uri, run.info.run_id, key) == expected, key
    old = MlflowClient(uri).get_run(killed.info.run_id)
    assert old.info.lifecycle_stage == "deleted" and old.data.tags[TAG + "continued_in"] == run.info.run_id
    assert not list(project.glob("checkpoints/*"))


def _cmdline(pid):
    with _ignore_gone(), contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    return b""


def _ignore_gone():
    return contextlib.suppress(ProcessLookupError)
