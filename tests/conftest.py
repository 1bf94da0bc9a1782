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
# 2026-12-06, 2 workers: the Ray pair 400 s, resume 155, ablate 127, train 113, reliability 105 ...
# (benchmarks/results/test-suite-modules.csv); the modules not named take a few seconds each.
LONGEST_FIRST = ["test_cluster", "test_ray_study", "test_train", "test_resume", "test_ablate", "test_reliability",
                 "test_concurrency", "test_backends", "test_tune", "test_serving", "test_registry", "test_ui",
                 "test_many_classes", "test_adastop", "test_benchmark", "test_predict", "test_distribute", "test_model",
                 "test_cli_startup", "test_device_check", "test_data", "test_recipe", "test_bad_input"]


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
def two_nodes(store_template):
    """Two Ray nodes (1 CPU each) and an MLflow server on 127.0.0.1, shared by the Ray test modules (one
    xdist worker runs them both); a test that kills a node starts another in its place."""
    from ray_fixtures import RAY_MISSING, two_node_lab

    if RAY_MISSING:
        pytest.skip("ray or psutil is not installed (pip install -e '.[ray]')")
    yield from two_node_lab(store_template)

# --- image folders and a trained model shared by several modules ---------------------------------

CLASSES = ["bee", "cat", "dog"]
# Odd sizes (width, height), portrait and landscape, smaller and larger than the stored size.
SIZES = [(37, 23), (23, 41), (50, 19), (16, 16), (64, 48), (21, 30)]


def noisy(rng, size, colour, mode="RGB"):
    import numpy as np
    from PIL import Image

    w, h = size
    pixels = np.clip(rng.normal(colour, 40, size=(h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


def make_folder(root: Path, n_train: int = 6, n_test: int = 2, seed: int = 0) -> Path:
    """train/ + test/, 3 classes; JPEG, PNG, grayscale, CMYK JPEG, RGBA; one corrupt file."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            colour = [60, 60, 60]
            colour[c] = 200
            for i in range(n):
                size = SIZES[(i + c) % len(SIZES)]
                kind = i % 5
                if kind == 0:
                    noisy(rng, size, colour).save(folder / f"{i}.jpg", quality=95)
                elif kind == 1:
                    noisy(rng, size, colour).save(folder / f"{i}.png")
                elif kind == 2:
                    noisy(rng, size, colour, "L").save(folder / f"{i}.png")            # grayscale
                elif kind == 3:
                    noisy(rng, size, colour, "CMYK").save(folder / f"{i}.jpg", quality=95)  # CMYK JPEG
                else:
                    noisy(rng, size, colour, "RGBA").save(folder / f"{i}.png")
    (root / "train" / "cat" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated" + bytes(50))
    return root


COLOURS = {"blue": (40, 40, 210), "green": (40, 190, 40), "red": (210, 40, 40)}   # sorted: class order


def colour_image(rng, colour, size=None):
    import numpy as np

    w, h = size if size is not None else rng.integers(24, 48, size=2)
    return np.clip(rng.normal(colour, 35, size=(h, w, 3)), 0, 255).astype(np.uint8)


def colour_folder(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """train/ + test/ with three classes that differ by colour (noisy, odd sizes, JPEG and PNG)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(colour_image(rng, colour)).save(folder / f"{i}.{'jpg' if i % 2 else 'png'}")
    return root


def jpeg_bytes(pixels) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def serving_env(uri):
    """subprocess_env, with this virtual environment's bin first on PATH: `mlflow models serve` runs
    `uvicorn` from PATH, as in an activated virtual environment."""
    env = subprocess_env(uri)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


@pytest.fixture(scope="session")
def colour_model(tmp_path_factory):
    """`alexnet-keras train --register colours` of a paper-recipe model (per-pixel mean image) on a
    colour_folder, trained until it tells the colours apart, logged to a SQLite store of its own:
    (store URI, the run, its folder). --deterministic so that it learns the same every time (5 epochs on
    24 images), in a process of its own: determinism is process-wide in TensorFlow. Shared by
    test_serving and test_registry: one training serves both."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("colour-model")
    uri = f"sqlite:///{root}/mlflow.db"
    data = colour_folder(root / "data", n_train=8, n_test=4)
    trained = subprocess.run(
        [sys.executable, "-m", "alexnet_keras", "train", "--variant", "cifar", "--width", "0.125", "--init", "keras",
         "--dropout", "0", "--dataset", "folder", "--data-dir", str(data), "--recipe", "paper", "--stored-size",
         "36", "--pixel-mean", "true", "--epochs", "5", "--batch-size", "8", "--deterministic", "true",
         "--experiment", "serving-test", "--register", "colours"],
        cwd=root, env={**serving_env(uri), "ALEXNET_KERAS_CACHE": str(root / "cache")}, capture_output=True,
        text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "registered the model of run" in trained.stdout
    (run,) = all_runs(uri)
    assert run.info.status == "FINISHED" and run.data.metrics["test_accuracy"] == 1.0   # it has learned
    assert MlflowClient(uri).get_experiment(run.info.experiment_id).name == "serving-test"
    return uri, run, root


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nobody can write to: a read-only tmpfs where this process may mount one (root), else
    a folder without write permission (not root), else the test is skipped."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    if not mounted:
        if os.geteuid() == 0:
            pytest.skip("cannot mount a read-only tmpfs, and root writes to any folder")
        folder.chmod(0o555)
    yield folder
    if mounted:   # lazily: a test's working folder may still be inside until its monkeypatch is undone
        subprocess.run(["umount", "-l", str(folder)], check=True)
    else:
        folder.chmod(0o755)


# --- garbage collection over what the imports left ------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def frozen_gc():
    """A full collection at each module's start, then everything alive is left out of later ones (gc.freeze).
    keras.backend.clear_session() (each study child, each keras-tuner trial) runs gc.collect(), and Python's own
    full collections follow the heap's growth: each walked TensorFlow's, MLflow's and every earlier test's objects,
    0.25 s of CPU a time just after the imports (tests/test_ablate.py's 7 study tests: 55.5 -> 45.2 CPU-s)."""
    import gc

    gc.collect()
    gc.freeze()
