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
# Each argv in turn (a line of "=" after each one's output), then per argv its status and the modules loaded by
# its end (a later command's list holds an earlier one's: the stricter check).
PROBE = r"""
import json, sys
from alexnet_keras import cli
statuses, loaded = [], []
for argv in json.loads(sys.argv[1]):
    try:
        statuses.append(cli.main(argv))
    except SystemExit as exit:
        statuses.append(exit.code)
    loaded.append(sorted({m.split(".")[0] for m in sys.modules}))
    print("=" * 20, flush=True)
    print("=" * 20, file=sys.stderr, flush=True)
print("RESULT " + json.dumps({"status": statuses, "loaded": loaded}))
"""


def _run_all(argvs: list[list[str]], tmp_path) -> tuple[dict, list[str]]:
    """`argvs` run one after another in one fresh Python: the result, and each command's output."""
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argvs)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    parts = zip(proc.stdout.split("=" * 20 + "\n"), proc.stderr.split("=" * 20 + "\n"))
    return json.loads(line[len("RESULT "):]), [out + err for out, err in parts][:len(argvs)]


def _run(argv: list[str], tmp_path) -> tuple[dict, str]:
    result, (output,) = _run_all([argv], tmp_path)
    return {"status": result["status"][0], "loaded": result["loaded"][0]}, output


@pytest.mark.parametrize("argv, status", [(["--help"], 0), (["--version"], 0), (["report", "--help"], 0),
                                          (["train", "--help"], 0), (["tune", "--help"], 0)])
def test_help_and_version_load_no_deep_learning_framework(argv, status, tmp_path):
    result, output = _run(argv, tmp_path)
    assert result["status"] == status
    assert not set(HEAVY) & set(result["loaded"]), sorted(set(HEAVY) & set(result["loaded"]))
    if argv == ["--version"]:
        from alexnet_keras import __version__

        assert f"alexnet-keras {__version__}" in output


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """`report` on a store without the run asked for, then on a study parent whose children have not run yet,
    in one fresh Python (each test below checks one): (result, [each output], study store URI, parent id)."""
    from mlflow.tracking import MlflowClient

    from alexnet_keras import tracking
    from alexnet_keras.experiments.study import load_study

    folder = tmp_path_factory.mktemp("reports")
    empty, study = f"sqlite:///{folder}/empty.db", f"sqlite:///{folder}/mlflow.db"
    MlflowClient(empty).search_experiments()   # the store exists (a missing one is refused before any lookup)
    client = MlflowClient(study)
    parent = client.create_run(client.create_experiment("startup", artifact_location=str(folder / "art")))
    client.set_tag(parent.info.run_id, tracking.ROLE_TAG, "parent")
    client.log_dict(parent.info.run_id, load_study(ROOT / "experiments" / "smoke.yaml").spec(), tracking.SPEC_ARTIFACT)
    result, outputs = _run_all([["report", "0" * 32, "--tracking-uri", empty],
                                ["report", parent.info.run_id, "--tracking-uri", study]], folder)
    return result, outputs, study, parent.info.run_id


def test_report_reads_the_store_without_tensorflow_or_keras(reports):
    """`report` runs its whole path (MLflow store, error handling) and ends with one clear error for a
    run the store does not have, still without loading TensorFlow or Keras."""
    result, (output, _), _, _ = reports
    loaded = result["loaded"][0]
    assert result["status"][0] == 2 and "no MLflow run '" + "0" * 32 in output
    assert "mlflow" in loaded
    assert not set(HEAVY) & set(loaded), sorted(set(HEAVY) & set(loaded))


def test_report_of_a_study_builds_its_tables_and_figures_without_tensorflow_or_keras(reports):
    """The whole `report PARENT_RUN_ID` path (spec, children, tables, figures, logging on the parent), on
    a study parent whose children have not run yet."""
    from mlflow.tracking import MlflowClient

    result, (_, output), uri, parent_id = reports
    loaded = result["loaded"][1]
    assert result["status"][1] == 0, output[-3000:]
    assert "reports/ablation.csv" in output
    assert "reports/ablation_table.json" in {a.path for a in MlflowClient(uri).list_artifacts(parent_id, "reports")}
    assert not set(HEAVY) & set(loaded), sorted(set(HEAVY) & set(loaded))


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
