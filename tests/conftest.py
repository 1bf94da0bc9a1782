"""Shared fixtures and helpers: MLflow stores in temporary folders, the tiny training config, subprocesses.

Stores: a new SQLite store costs seconds of MLflow schema migrations, a copy of a migrated one almost
nothing. So one empty, migrated store is made per session, the first time a test needs one
(`store_template`), and every test gets a copy in its own folder (`store_uri`, `mlflow_store`). A test
of an error that must come before the store is opened uses `untouched_store` and asserts that no
store file exists afterwards.
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Started in the background of a script or under nohup, this process ignores SIGINT, and so would every
# process it starts: the tests that interrupt a command with SIGINT would wait out their timeouts. The
# tests behave the same however pytest is started. (tests/ray_fixtures.py starts its Ray nodes with SIGINT
# ignored on purpose.)
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
# Decoded-image and archive caches go to a throwaway folder, not the user's ~/.cache.
os.environ["ALEXNET_KERAS_CACHE"] = tempfile.mkdtemp(prefix="alexnet-keras-test-cache-")

# A tiny, fast configuration: the 32-px network at 1/8 width on 128 synthetic images.
TINY = {
    "variant": "cifar", "width": 0.125, "dataset": "synthetic", "synthetic_samples": 128,
    "synthetic_classes": 4, "batch_size": 32, "epochs": 2, "init": "keras",
}


# --- MLflow stores --------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def store_template(tmp_path_factory):
    """An empty SQLite store with MLflow's schema, made once per session on first use."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("store-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()   # runs the migrations
    return path


def copy_store(template, folder):
    """A copy of `template` as `folder`/mlflow.db, as if created there: its Default experiment keeps
    artifacts in `folder`/mlruns/0. Returns the store's URI."""
    db = folder / "mlflow.db"
    shutil.copy(template, db)
    with contextlib.closing(sqlite3.connect(db)) as connection, connection:
        connection.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                           (str(folder.resolve() / "mlruns" / "0"),))
    return f"sqlite:///{db}"


@pytest.fixture
def store_uri(store_template, tmp_path):
    """A migrated store in tmp_path, for a test (or the processes it starts) to point at itself."""
    return copy_store(store_template, tmp_path)


def point_at(monkeypatch, folder, uri):
    """This process logs to `uri` with `folder` as the working folder (so artifacts land in folder/mlruns),
    and nothing of an earlier `mlflow run` or set_experiment() leaks in."""
    import mlflow

    monkeypatch.chdir(folder)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    # mlflow.set_experiment() exports MLFLOW_EXPERIMENT_ID; monkeypatch restores it afterwards.
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mlflow.set_tracking_uri(uri)


@pytest.fixture
def mlflow_store(store_uri, tmp_path, monkeypatch):
    """A migrated store in tmp_path that this process logs to; artifacts land in tmp_path/mlruns."""
    import mlflow

    point_at(monkeypatch, tmp_path, store_uri)
    yield store_uri
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture
def untouched_store(tmp_path, monkeypatch):
    """Like `mlflow_store`, but no store file exists yet: the test asserts that none was created.
    Yields the path the store would have."""
    import mlflow

    point_at(monkeypatch, tmp_path, f"sqlite:///{tmp_path}/mlflow.db")
    yield tmp_path / "mlflow.db"
    while mlflow.active_run():
        mlflow.end_run()


def all_runs(uri):
    """Every run in every experiment of the store at `uri` (an empty list if the store is empty)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, max_results=1000) if ids else []


# --- the command line and subprocesses -----------------------------------------------------------

# `mlflow server` and `mlflow ui` also start a job runner with four worker processes (MLflow's server-side
# jobs, which no test uses): 48 CPU-s in a server's first 30 s against 11 without, on the 2-core machine
# (benchmarks/results/mlflow-server-cpu.txt).
QUIET_SERVER = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server a test starts)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cli_flags(overrides):
    """{"batch_size": 32} -> ["--batch-size", "32"]: config options as `alexnet-keras train` flags."""
    out = []
    for key, value in overrides.items():
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out


def subprocess_env(uri):
    """The environment of a child process writing to the store at `uri`, as a user's shell would have it:
    no MLFLOW_* left from this process (mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=uri, TF_CPP_MIN_LOG_LEVEL="2")
    return env


def run_script(script, *args, env=None, cwd=None, timeout=300):
    """Run `script` in a fresh Python (backend, device count and determinism are fixed per process), in
    `cwd`, with this environment plus `env` (a None value removes a variable), and return the JSON of its
    last `RESULT {...}` line."""
    merged = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=cwd,
                          env={k: v for k, v in merged.items() if v is not None},
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def wait_for_checkpoint(proc, folder, timeout=300):
    """Wait until a training run under `folder` has finished an epoch (its checkpoint's metadata exists)
    while `proc` (the training process, or the launcher above it) keeps running."""
    deadline = time.monotonic() + timeout
    while not list(folder.glob("checkpoints/*/training_metadata.json")):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.1)


# --- data ----------------------------------------------------------------------------------------

@pytest.fixture
def isolated_data(tmp_path, monkeypatch):
    """Caches in this test's tmp_path, and no data folder from the shell (ALEXNET_KERAS_DATA_DIR)."""
    monkeypatch.setenv("ALEXNET_KERAS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ALEXNET_KERAS_DATA_DIR", raising=False)


# --- running in parallel: pytest-xdist, `-n auto --no-loadscope-reorder` in pyproject's addopts -----------
# (`pytest -n 0 ...` runs serially, e.g. under a debugger.)

# The two Ray modules share one worker, so two two-node clusters never compete for the same cores.
RAY_MODULES = {"test_cluster", "test_ray_study"}
# Modules start longest first, so the run does not end with one worker busy on a long module while the other
# waits (a worker takes the next module when it is free). Their summed test times on the 2-core machine,
# 2026-12-01, 2 workers: the Ray pair 363 s, resume 218, ablate 126, tune 121 ... (benchmarks/results/
# test-suite-modules.csv); the modules not named take a few seconds each.
LONGEST_FIRST = ["test_cluster", "test_ray_study", "test_resume", "test_ablate", "test_tune", "test_reliability",
                 "test_registry", "test_distribute", "test_train", "test_serving", "test_benchmark",
                 "test_predict", "test_backends", "test_ui", "test_cli_startup", "test_concurrency", "test_data",
                 "test_model"]


def pytest_collection_modifyitems(items):
    """Modules in LONGEST_FIRST order, then the rest as collected; each module's tests keep their order."""
    def rank(item):
        module = item.path.stem
        return LONGEST_FIRST.index(module) if module in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)


def pytest_xdist_make_scheduler(config, log):
    """Each test module runs whole on one worker, so its module-scoped fixtures (a study, a sweep, a Ray
    cluster, `mlflow ui`) are built once, and its tests keep their written order. (pytest-xdist's own
    `--dist loadgroup` marks do nothing with pytest 9: the group never reaches the test's id.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            module = nodeid.split("::", 1)[0]
            return "ray" if Path(module).stem in RAY_MODULES else module

    return ByModule(config, log)


# --- Ray (tests/ray_fixtures.py) ---------------------------------------------------------------------

@pytest.fixture(scope="session", autouse=True)
def ray_token():
    """Ray reads its token once per process: every cluster of the session (a local one of `ablate
    --parallel`, the two-node one) uses ray_fixtures.TOKEN."""
    from ray_fixtures import auth_env

    with pytest.MonkeyPatch.context() as patch:
        for key, value in auth_env().items():
            patch.setenv(key, value)
        yield


@pytest.fixture(scope="session")
def two_nodes():
    """Two Ray nodes (1 CPU each) and an MLflow server on 127.0.0.1, shared by the Ray test modules (one
    xdist worker runs them both); a test that kills a node starts another in its place."""
    from ray_fixtures import RAY_MISSING, two_node_lab

    if RAY_MISSING:
        pytest.skip("ray or psutil is not installed (pip install -e '.[ray]')")
    yield from two_node_lab()
