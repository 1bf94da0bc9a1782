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
