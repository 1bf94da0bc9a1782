"""Several trainings writing to one SQLite store at the same moment (`ablate --parallel`, tuner workers):
no metric lost or doubled, every run FINISHED, the database intact.

Real OS processes, each through the project's own tracking functions: a short Keras `fit` with the
per-epoch callback plus a synchronous metric on every batch, then a burst of stepped metrics, params,
tags and an artifact. They are released together (a file that appears), so their writes overlap. The
store and its experiment are created first, as `ablate` does (new stores race on the schema, mlflow#4123).
"""

import contextlib
import importlib.util
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import TINY, all_runs, cli_flags, subprocess_env
from mlflow.tracking import MlflowClient
from mlflow.utils.file_utils import local_file_uri_to_path

from alexnet_keras import cli, tracking
from alexnet_keras.config import load_config

WORKERS = 4
EPOCHS = 5
BATCHES = 8          # 64 samples, batch 8
BURST = 60           # stepped metrics logged after the fit
EPOCH_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")
BURST_KEYS = ("burst_a", "burst_b")
EXPERIMENT = "concurrency"
ROOT = Path(__file__).resolve().parent.parent

WORKER = r"""
import os, sys, time
from pathlib import Path

folder, uri, index = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
epochs, batches, burst = (int(v) for v in sys.argv[4:7])
import keras
import numpy as np
from alexnet_keras import tracking

tracking.configure(uri)
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
rng = np.random.default_rng(index)
x, y = rng.normal(size=(8 * batches, 4)), rng.integers(0, 3, 8 * batches)


class PerBatch(keras.callbacks.Callback):   # a synchronous write on every batch: steps 0, 1, ...
    step = 0

    def on_train_batch_end(self, batch, logs=None):
        tracking.log_metrics({"batch_loss": logs["loss"]}, step=self.step)
        self.step += 1


(folder / f"ready-{index}").touch()
while not (folder / "go").exists():       # every worker starts writing at the same moment
    time.sleep(0.005)
with tracking.run("EXPERIMENT", run_name=f"worker-{index}", params={"worker": index, "epochs": epochs},
                  tags={"worker": str(index)}):
    model.fit(x, y, batch_size=8, epochs=epochs, verbose=0, validation_data=(x[:16], y[:16]),
              callbacks=[tracking.epoch_metrics_callback(), PerBatch()])
    for step in range(burst):
        tracking.log_metrics({"burst_a": 1000 * index + step, "burst_b": -step}, step=step)
    tracking.log_text(f"worker {index}", "worker.txt")
    tracking.flush()
print("pid", os.getpid())
""".replace("EXPERIMENT", EXPERIMENT)


def _expected_steps() -> set[tuple[str, int]]:
    return ({(k, e) for k in EPOCH_KEYS for e in range(EPOCHS)}
            | {("batch_loss", s) for s in range(EPOCHS * BATCHES)}
            | {(k, s) for k in BURST_KEYS for s in range(BURST)})


def _problems(db_path: Path, run_ids) -> list[str]:
    """Everything wrong with the metrics of `run_ids` in the SQLite file: missing, doubled or unexpected
    (key, step) pairs, burst values of another worker, and a failed integrity check."""
    db = sqlite3.connect(db_path)
    try:
        problems = []
        check = db.execute("PRAGMA integrity_check").fetchall()
        if check != [("ok",)]:
            problems.append(f"integrity_check: {check}")
        expected = _expected_steps()
        for run_id, index in run_ids.items():
            rows = db.execute("SELECT key, step, value FROM metrics WHERE run_uuid = ?", (run_id,)).fetchall()
            counts = Counter((key, step) for key, step, _ in rows)
            missing = sorted(expected - set(counts))
            doubled = sorted(k for k, n in counts.items() if n > 1)
            extra = sorted(set(counts) - expected)
            wrong = sorted((k, s) for k, s, v in rows if k == "burst_a" and v != 1000 * index + s)
            for name, found in (("missing", missing), ("doubled", doubled), ("unexpected", extra),
                                ("another worker's value", wrong)):
                if found:
                    problems.append(f"run {index}: {len(found)} {name} (key, step): {found[:5]}")
        return problems
    finally:
        db.close()


@pytest.fixture
def store(store_uri, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)   # the experiment's artifact folder is ./mlruns, resolved here
    MlflowClient(store_uri).create_experiment(EXPERIMENT)   # the store and experiment exist before the fan-out
    return tmp_path, store_uri


def test_concurrent_trainings_lose_no_metric_and_corrupt_nothing(store):
    folder, uri = store
    backend = "jax" if importlib.util.find_spec("jax") else "tensorflow"   # jax starts faster
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "KERASTUNER_"))}
    env.update(MLFLOW_TRACKING_URI=uri, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2", OMP_NUM_THREADS="1",
               TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(folder), uri, str(i), str(EPOCHS), str(BATCHES),
                               str(BURST)], cwd=folder, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(WORKERS)]
    try:
        deadline = time.monotonic() + 180
        while len(list(folder.glob("ready-*"))) < WORKERS:
            crashed = [p for p in procs if p.poll() is not None]
            assert not crashed, f"a worker died before the start: {crashed[0].communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "workers not ready after 180 s"
            time.sleep(0.05)
        (folder / "go").touch()
        outputs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
        # A failed write is an exception (the per-epoch callback logs synchronously), never only a warning.
        assert "database is locked" not in err and "Failed to log run data" not in err, err[-3000:]

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    assert sorted(r.info.run_name for r in runs) == [f"worker-{i}" for i in range(WORKERS)]
    by_index = {int(r.data.tags["worker"]): r for r in runs}
    pids = {int(out.split()[-1]) for out, _ in outputs}
    for index, run in by_index.items():
        assert run.info.status == "FINISHED", (index, run.info.status, run.data.tags.get("error"))
        assert run.data.params["worker"] == str(index) and run.data.params["epochs"] == str(EPOCHS)
        assert float(run.data.params["optimizer_learning_rate"]) == pytest.approx(0.1)   # from the callback
        assert int(run.data.tags["alexnet_keras.pid"]) in pids                          # owner tags
        # The latest value of each metric is the last step's (latest_metrics kept consistent).
        assert run.data.metrics["burst_a"] == 1000 * index + BURST - 1 and run.data.metrics["burst_b"] == 1 - BURST
        artifact = Path(local_file_uri_to_path(run.info.artifact_uri)) / "worker.txt"
        assert artifact.read_text() == f"worker {index}" and artifact.resolve().is_relative_to(folder.resolve())
    run_ids = {r.info.run_id: i for i, r in by_index.items()}
    assert _problems(folder / "mlflow.db", run_ids) == []

    # The check above would catch a dropped or doubled metric: drop one row and double another in a copy.
    broken = folder / "broken.db"
    shutil.copy(folder / "mlflow.db", broken)
    victim = by_index[0].info.run_id
    with contextlib.closing(sqlite3.connect(broken)) as db, db:
        db.execute("DELETE FROM metrics WHERE run_uuid = ? AND key = 'batch_loss' AND step = 3", (victim,))
        db.execute("INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan) SELECT key, value, "
                   "timestamp + 1, run_uuid, step, is_nan FROM metrics WHERE run_uuid = ? AND key = 'burst_b' "
                   "AND step = 7", (victim,))
    assert _problems(broken, run_ids) == [
        "run 0: 1 missing (key, step): [('batch_loss', 3)]",
        "run 0: 1 doubled (key, step): [('burst_b', 7)]"]


# --- one live process owns a run, a study's parent, a sweep's parent (tracking.lease) ---------------------

RACER = r"""
import os, sys, time
from pathlib import Path

folder = Path(sys.argv[1])
from alexnet_keras import cli
import alexnet_keras.experiments.tune   # the slow imports, before the start

print("pid", os.getpid(), flush=True)
(folder / f"ready-{os.getpid()}").touch()
while not (folder / "go").exists():       # both start the command at the same moment
    time.sleep(0.005)
sys.exit(cli.main(sys.argv[2:]))
"""


def _race(folder, uri, *argv):
    """The same command in two processes released together: [(exit status, pid, stdout, stderr)] of each."""
    gate = folder / "gate"
    gate.mkdir()
    env = subprocess_env(uri)
    env.update(OMP_NUM_THREADS="1", TF_NUM_INTEROP_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(gate), *argv], cwd=folder, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        deadline = time.monotonic() + 120
        while len(list(gate.glob("ready-*"))) < 2:
            assert all(p.poll() is None for p in procs), [p.communicate()[1][-3000:] for p in procs]
            assert time.monotonic() < deadline, "not ready after 120 s"
            time.sleep(0.05)
        (gate / "go").touch()
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, int(out.split()[1]), out, err) for p, (out, err) in zip(procs, outputs)]


def _one_refused(results):
    """One process did the work; the other was refused in one line naming the first (pid and host)."""
    done, refused = sorted(results)
    assert (done[0], refused[0]) == (0, 2), [r[3][-3000:] for r in results]
    line = refused[3].strip().splitlines()[-1]
    assert line.startswith("alexnet-keras ") and "Traceback" not in refused[3], refused[3][-3000:]
    assert f"is taken by process {done[1]} on host {socket.gethostname()} since " in line, line
    return done, refused


def _steps(uri, run_id, key):
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_two_identical_trains_after_a_kill_train_each_epoch_once(mlflow_store, tmp_path, monkeypatch):
    import keras

    from alexnet_keras.training import train

    class CtrlC(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt

    real = train.build_callbacks
    monkeypatch.setattr(train, "build_callbacks", lambda *args, **kwargs: real(*args, **kwargs) + [CtrlC()])
    flags = ["train", *cli_flags({**TINY, "epochs": 3})]
    assert cli.main(flags) == 130
    (killed,) = all_runs(mlflow_store)
    assert killed.info.status == "KILLED"

    done, refused = _one_refused(_race(tmp_path, mlflow_store, *flags))
    assert f"continuing run {killed.info.run_id}" in done[2]
    (run,) = all_runs(mlflow_store)   # no second run
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    for key in ("loss", "val_accuracy"):
        assert _steps(mlflow_store, run.info.run_id, key) == [0, 1, 2], key   # every epoch once
    assert not [k for k in run.data.tags if k.startswith(tracking.LEASE_TAG)]   # given back at the end


def test_resuming_a_run_under_another_config_is_refused_and_leaves_it_untouched(mlflow_store, monkeypatch, capsys):
    client = MlflowClient()
    experiment_id = client.create_experiment("elsewhere")
    killed = client.create_run(experiment_id, tags={tracking.CONFIG_DIGEST_TAG: "0123456789abcdef"}).info.run_id
    client.log_param(killed, "learning_rate", "0.05")
    client.set_terminated(killed, "KILLED")
    before = client.get_run(killed)
    monkeypatch.setenv("MLFLOW_RUN_ID", killed)   # as `mlflow run` passes it, or a user continuing that run
    assert cli.main(["train", *cli_flags(TINY)]) == 2
    err = capsys.readouterr().err
    assert "0123456789abcdef" in err and load_config(overrides=TINY).digest() in err and "Traceback" not in err
    after = client.get_run(killed)
    assert (after.info, after.data.tags, after.data.params, after.data.metrics) == (
        before.info, before.data.tags, before.data.params, before.data.metrics)
    assert [r.info.run_id for r in all_runs(mlflow_store)] == [killed]


def _study(folder):
    """experiments/smoke.yaml cut to two children (one seed, the dropout axis)."""
    study = yaml.safe_load((ROOT / "experiments" / "smoke.yaml").read_text())
    study.update(seeds=[0], axes={"dropout": [0.5, 0.0]})
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_two_identical_ablates_train_each_child_once(store_uri, tmp_path):
    MlflowClient(store_uri).create_experiment("alexnet-keras-smoke")   # as `ablate` does before a fan-out
    _one_refused(_race(tmp_path, store_uri, "ablate", str(_study(tmp_path))))
    runs = all_runs(store_uri)   # a parent the refused process made is deleted
    (parent,) = [r for r in runs if r.data.tags.get(tracking.ROLE_TAG) == "parent"]
    children = [r for r in runs if r.data.tags.get(tracking.ROLE_TAG) == "child"]
    assert parent.info.status == "FINISHED"
    assert sorted((r.data.tags[tracking.VARIANT_TAG], r.info.status) for r in children) == [
        ("baseline", "FINISHED"), ("dropout=0.0", "FINISHED")]
    assert all(r.data.tags[tracking.PARENT_TAG] == parent.info.run_id for r in children)


def test_two_identical_tunes_run_each_trial_once(store_uri, tmp_path):
    sweep = yaml.safe_load((ROOT / "experiments" / "sweep_smoke.yaml").read_text())
    sweep["final_model"] = "none"
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    MlflowClient(store_uri).create_experiment("alexnet-keras-smoke")
    _one_refused(_race(tmp_path, store_uri, "tune", str(path)))
    runs = all_runs(store_uri)
    (parent,) = [r for r in runs if r.data.tags.get(tracking.SWEEP_ROLE_TAG) == "parent"]
    trials = [r for r in runs if r.data.tags.get(tracking.SWEEP_ROLE_TAG) == "trial"]
    assert parent.info.status == "FINISHED"
    assert sorted((r.data.tags[tracking.TRIAL_TAG], r.info.status) for r in trials) == [
        ("0", "FINISHED"), ("1", "FINISHED")]
