"""`alexnet-keras --help`, `--version` and `report` start without TensorFlow or Keras (they take seconds to
import): each runs in a fresh Python that then lists the heavy modules it has loaded. The wall times are a
benchmark's (benchmarks/cli_startup.py, docs/results.md "CLI start-up"), not a test's."""

from __future__ import annotations

import json
import subprocess
import sys

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("tensorflow", "keras", "jax", "torch", "keras_tuner")
PROBE = r"""
import json, sys
from alexnet_keras import cli
try:
    status = cli.main(json.loads(sys.argv[1]))
except SystemExit as exit:
    status = exit.code
print("RESULT " + json.dumps({"status": status, "loaded": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def _run(argv: list[str], tmp_path) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):]), proc.stdout + proc.stderr


@pytest.mark.parametrize("argv, status", [(["--help"], 0), (["--version"], 0), (["report", "--help"], 0),
                                          (["train", "--help"], 0), (["tune", "--help"], 0)])
def test_help_and_version_load_no_deep_learning_framework(argv, status, tmp_path):
    result, output = _run(argv, tmp_path)
    assert result["status"] == status
    assert not set(HEAVY) & set(result["loaded"]), sorted(set(HEAVY) & set(result["loaded"]))
    if argv == ["--version"]:
        from alexnet_keras import __version__

        assert f"alexnet-keras {__version__}" in output


def test_report_reads_the_store_without_tensorflow_or_keras(tmp_path):
    """`report` runs its whole path (MLflow store, error handling) and ends with one clear error for a
    run the store does not have, still without loading TensorFlow or Keras."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(uri).search_experiments()   # the store exists (a missing one is refused before any lookup)
    result, output = _run(["report", "0" * 32, "--tracking-uri", uri], tmp_path)
    assert result["status"] == 2 and "no MLflow run '" + "0" * 32 in output
    assert "mlflow" in result["loaded"]
    assert not set(HEAVY) & set(result["loaded"]), sorted(set(HEAVY) & set(result["loaded"]))


def test_report_of_a_study_builds_its_tables_and_figures_without_tensorflow_or_keras(tmp_path):
    """The whole `report PARENT_RUN_ID` path (spec, children, tables, figures, logging on the parent), on
    a study parent whose children have not run yet."""
    from mlflow.tracking import MlflowClient

    from alexnet_keras import tracking
    from alexnet_keras.experiments.study import load_study

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    parent = client.create_run(client.create_experiment("startup", artifact_location=str(tmp_path / "art")))
    client.set_tag(parent.info.run_id, tracking.ROLE_TAG, "parent")
    client.log_dict(parent.info.run_id, load_study(ROOT / "experiments" / "smoke.yaml").spec(), tracking.SPEC_ARTIFACT)
    result, output = _run(["report", parent.info.run_id, "--tracking-uri", uri], tmp_path)
    assert result["status"] == 0, output[-3000:]
    assert "reports/ablation.csv" in output
    assert "reports/ablation_table.json" in {a.path for a in client.list_artifacts(parent.info.run_id, "reports")}
    assert not set(HEAVY) & set(result["loaded"]), sorted(set(HEAVY) & set(result["loaded"]))


def test_package_names_still_resolve_when_first_used():
    """The lazily loaded names (alexnet_keras.AlexNet, alexnet_keras.data.load_data ...) are the real ones."""
    import alexnet_keras
    from alexnet_keras import data
    from alexnet_keras.data import pipeline
    from alexnet_keras.model.alexnet import AlexNet

    assert alexnet_keras.AlexNet is AlexNet and "AlexNet" in dir(alexnet_keras)
    assert data.load_data is pipeline.load_data and set(data.__all__) <= set(dir(data))
    for name in data.__all__:
        assert getattr(data, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        alexnet_keras.Nope  # noqa: B018
