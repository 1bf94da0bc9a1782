"""Shared fixtures: every test that touches MLflow gets its own store in a temporary folder."""

import os
import tempfile

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Decoded-image and archive caches go to a throwaway folder, not the user's ~/.cache.
os.environ["ALEXNET_KERAS_CACHE"] = tempfile.mkdtemp(prefix="alexnet-keras-test-cache-")

# A tiny, fast configuration: the 32-px network at 1/8 width on 128 synthetic images.
TINY = {
    "variant": "cifar", "width": 0.125, "dataset": "synthetic", "synthetic_samples": 128,
    "synthetic_classes": 4, "batch_size": 32, "epochs": 2, "init": "keras",
}


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A fresh SQLite store; artifacts land in tmp_path/mlruns because the cwd is tmp_path."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    # mlflow.set_experiment() exports MLFLOW_EXPERIMENT_ID; monkeypatch restores it afterwards.
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


def all_runs(uri):
    """Every run in every experiment of the store at `uri` (an empty list if the store is empty)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, max_results=1000) if ids else []


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


def wait_for_checkpoint(proc, folder, timeout=300):
    """Wait until a training run under `folder` has finished an epoch (its checkpoint's metadata exists)
    while `proc` (the training process, or the launcher above it) keeps running."""
    import time

    deadline = time.monotonic() + timeout
    while not list(folder.glob("checkpoints/*/training_metadata.json")):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.1)
