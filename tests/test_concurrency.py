"""Several trainings writing to one SQLite store at the same moment (`ablate --parallel`, tuner workers):
no metric lost or doubled, every run FINISHED, the database intact.

Real OS processes, each through the project's own tracking functions: a short Keras `fit` with the
per-epoch callback plus a synchronous metric on every batch, then a burst of stepped metrics, params,
tags and an artifact. They are released together (a file that appears), so their writes overlap. The
store and its experiment are created first, as `ablate` does (new stores race on the schema, mlflow#4123).
"""

import contextlib
import importlib.util
import json
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
from conftest import TINY, all_runs, cli_flags
from mlflow.tracking import MlflowClient
from mlflow.utils.file_utils import local_file_uri_to_path

from alexnet_keras import tracking
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
import contextlib, io, json, os, sys, time, traceback
from pathlib import Path

gate = Path(sys.argv[1])
import keras
from alexnet_keras import cli
from alexnet_keras.training import train
import alexnet_keras.experiments.tune   # the slow imports, once


class CtrlC(keras.callbacks.Callback):   # Ctrl-C as the second epoch begins
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            raise KeyboardInterrupt


real, real_log, me, n = train.build_callbacks, train.log_trained_model, os.getpid(), 0
print(me, flush=True)
while True:
    while not (gate / f"go-{n}").exists():   # every racer starts job n at the same moment
        time.sleep(0.005)
    job = json.loads((gate / f"go-{n}").read_text())
    if me in job["who"]:
        os.chdir(job["cwd"])
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)   # nothing of the previous job leaks in
        os.environ.update(job["env"])
        train.build_callbacks = (lambda *a, **k: real(*a, **k) + [CtrlC()]) if job["interrupt"] else real
        train.log_trained_model = (lambda *a, **k: {}) if job["no_eval"] else real_log
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(job["argv"])
            except BaseException:
                code = -1
                traceback.print_exc()
        for key in job["env"]:
            os.environ.pop(key, None)
        (gate / "done.tmp").write_text(json.dumps([code, me, out.getvalue(), err.getvalue()]))
        (gate / "done.tmp").rename(gate / f"done-{n}-{me}")
    n += 1
"""


@pytest.fixture(scope="module")
def racers(tmp_path_factory):
    """Two processes that run the command they are given at the same moment (a file appears), so that both
    race for the same run or study; started once (their imports are the slow part). `race(cwd, *argv)` returns
    [(exit status, pid, stdout, stderr)] of each; `no_eval`: a training logs no evaluation or model."""
    gate = tmp_path_factory.mktemp("gate")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", OMP_NUM_THREADS="1", TF_NUM_INTEROP_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(gate)], env=env, stdout=subprocess.PIPE,
                              stderr=(gate / f"stderr-{i}").open("w"), text=True) for i in range(2)]
    pids = [int(p.stdout.readline() or 0) for p in procs]   # each prints its pid once its imports are done
    jobs = iter(range(1000))

    def race(cwd, *argv, who=pids, env=None, interrupt=False, no_eval=False):
        n = next(jobs)
        (gate / "job.tmp").write_text(json.dumps({"cwd": str(cwd), "argv": argv, "who": who, "env": env or {},
                                                  "interrupt": interrupt, "no_eval": no_eval}))
        (gate / "job.tmp").rename(gate / f"go-{n}")
        deadline = time.monotonic() + 300
        while not all((gate / f"done-{n}-{pid}").exists() for pid in who):
            assert all(p.poll() is None for p in procs), (gate / "stderr-0").read_text()[-3000:]
            assert time.monotonic() < deadline, "no result after 300 s"
            time.sleep(0.05)
        return [json.loads((gate / f"done-{n}-{pid}").read_text()) for pid in who]

    race.pids = pids
    try:
        assert all(pids), [(gate / f"stderr-{i}").read_text()[-3000:] for i in range(2)]
        yield race
    finally:
        for p in procs:   # idle between jobs: nothing to finish
            p.kill()
            p.wait()


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


def test_two_identical_trains_after_a_kill_train_each_epoch_once(racers, store_uri, tmp_path):
    flags = ["train", *cli_flags({**TINY, "epochs": 3}), "--tracking-uri", store_uri]
    ((code, *_),) = racers(tmp_path, *flags, who=racers.pids[:1], interrupt=True)
    assert code == 130
    (killed,) = all_runs(store_uri)
    assert killed.info.status == "KILLED"

    done, refused = _one_refused(racers(tmp_path, *flags, no_eval=True))   # who trains which epoch is the point
    assert f"continuing run {killed.info.run_id}" in done[2]
    (run,) = all_runs(store_uri)   # no second run
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    for key in ("loss", "val_accuracy"):
        assert _steps(store_uri, run.info.run_id, key) == [0, 1, 2], key   # every epoch once
    assert not [k for k in run.data.tags if k.startswith(tracking.LEASE_TAG)]   # given back at the end


def test_resuming_a_run_under_another_config_is_refused_and_leaves_it_untouched(racers, store_uri, tmp_path):
    client = MlflowClient(store_uri)
    experiment_id = client.create_experiment("elsewhere", artifact_location=str(tmp_path / "mlruns"))
    killed = client.create_run(experiment_id, tags={tracking.CONFIG_DIGEST_TAG: "0123456789abcdef"}).info.run_id
    client.log_param(killed, "learning_rate", "0.05")
    client.set_terminated(killed, "KILLED")
    before = client.get_run(killed)
    # As `mlflow run` passes it, or a user continuing that run by hand, with other options.
    ((code, _, _, err),) = racers(tmp_path, "train", *cli_flags(TINY), "--tracking-uri", store_uri,
                                  who=racers.pids[:1], env={"MLFLOW_RUN_ID": killed})
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert "0123456789abcdef" in err and load_config(overrides=TINY).digest() in err
    after = client.get_run(killed)
    assert (after.info, after.data.tags, after.data.params, after.data.metrics) == (
        before.info, before.data.tags, before.data.params, before.data.metrics)
    assert [r.info.run_id for r in all_runs(store_uri)] == [killed]


def test_two_identical_ablates_train_each_child_once(racers, store_uri, tmp_path):
    study = yaml.safe_load((ROOT / "experiments" / "smoke.yaml").read_text())
    study.update(seeds=[0], axes={"dropout": [0.5, 0.0]})   # two children
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    # The store and experiment exist before the processes start, as `ablate` makes them before a fan-out.
    MlflowClient(store_uri).create_experiment(study["experiment"], artifact_location=str(tmp_path / "mlruns"))
    _one_refused(racers(tmp_path, "ablate", str(tmp_path / "study.yaml"), "--tracking-uri", store_uri))
    runs = all_runs(store_uri)   # a parent the refused process made is deleted
    (parent,) = [r for r in runs if r.data.tags.get(tracking.ROLE_TAG) == "parent"]
    children = [r for r in runs if r.data.tags.get(tracking.ROLE_TAG) == "child"]
    assert parent.info.status == "FINISHED"
    assert sorted((r.data.tags[tracking.VARIANT_TAG], r.info.status) for r in children) == [
        ("baseline", "FINISHED"), ("dropout=0.0", "FINISHED")]   # each once, none ended KILLED by the other
    assert all(r.data.tags[tracking.PARENT_TAG] == parent.info.run_id for r in children)


def test_two_identical_tunes_run_each_trial_once(racers, store_uri, tmp_path):
    sweep = yaml.safe_load((ROOT / "experiments" / "sweep_smoke.yaml").read_text())
    sweep["final_model"] = "none"
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    MlflowClient(store_uri).create_experiment(sweep["experiment"], artifact_location=str(tmp_path / "mlruns"))
    _one_refused(racers(tmp_path, "tune", str(tmp_path / "sweep.yaml"), "--tracking-uri", store_uri))
    runs = all_runs(store_uri)
    (parent,) = [r for r in runs if r.data.tags.get(tracking.SWEEP_ROLE_TAG) == "parent"]
    trials = [r for r in runs if r.data.tags.get(tracking.SWEEP_ROLE_TAG) == "trial"]
    assert parent.info.status == "FINISHED"
    assert sorted((r.data.tags[tracking.TRIAL_TAG], r.info.status) for r in trials) == [
        ("0", "FINISHED"), ("1", "FINISHED")]   # each once, in one tuner state


def test_a_live_owner_keeps_its_run_and_a_dead_owners_run_is_taken_over(mlflow_store, tmp_path):
    """What the races above rely on, by hand: a run found RUNNING is offered for resuming; a claim of a live
    process (here, this host; or any other host) refuses it in one line, a dead one's does not count."""
    client = MlflowClient()
    experiment_id = client.create_experiment("owners", artifact_location=str(tmp_path / "mlruns"))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        claim = f"{tracking.LEASE_TAG}{time.time_ns() - 10**10}-a"   # 10 s old: an owner, not a rival
        # The process that made the run died; the one that took it over lives.
        tags = {tracking.CONFIG_DIGEST_TAG: "d", tracking.CHECKPOINT_DIR_TAG: "c",
                tracking.HOST_TAG: socket.gethostname(), tracking.PID_TAG: str(gone.pid),
                claim: json.dumps([socket.gethostname(), owner.pid, tracking.process_start(owner.pid)])}
        run_id = client.create_run(experiment_id, tags=tags).info.run_id
        assert tracking.find_resumable_run("owners", {tracking.CONFIG_DIGEST_TAG: "d"}).info.run_id == run_id
        with pytest.raises(tracking.TrackingError, match=f"run {run_id} is taken by process {owner.pid} on host "):
            tracking.lease(run_id)
        assert client.get_run(run_id).data.tags.items() >= tags.items()
        assert tracking.live_claims([client.get_run(run_id)]) == [(claim, tags[claim], run_id)]   # its own withdrawn
        assert tracking.mark_dead_runs("owners") == []
    finally:
        owner.kill()
        owner.wait()
    mine = tracking.lease(run_id)   # the owner died: its claim no longer counts
    assert client.get_run(run_id).data.tags[mine] == tracking.owner()
    elsewhere = client.create_run(experiment_id, tags={claim: json.dumps(["elsewhere", owner.pid, ""])}).info.run_id
    with pytest.raises(tracking.TrackingError, match="on host elsewhere"):
        tracking.lease(elsewhere)
