"""The MLflow UI shows what a training run logged: started for real, read by headless Chromium.

One store holds a `train --register` run (no --run-name: named for what it is) and a tiny ablation study.
The run page shows the run's name, its params, its description and its registered model; the study's
parent shows the study table (reports/ablation_table.json, an MLflow table) as a table, and its report
(reports/ablation.md) rendered, with the figures. Skipped where
Chromium is absent (.ci/run installs Debian's `chromium`). A screenshot of the run page is kept under
test-artifacts/ for a person to look at.
"""

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import QUIET_SERVER, TINY, all_runs, copy_store, free_port, point_at

from alexnet_keras import cli, tracking

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")


def _chromium(url: str, *extra: str, profile: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
             "--virtual-time-budget=20000", "--window-size=1400,1000"]
    return subprocess.run([CHROMIUM, *flags, *extra, url], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def ui(tmp_path_factory, store_template):
    """`mlflow ui` on a free loopback port over a store holding a real registered training run and a
    tiny study (two variants, one seed); shared by the tests below (training is the slow part)."""
    tmp_path = tmp_path_factory.mktemp("ui")
    mlflow_store = copy_store(store_template, tmp_path)
    flags = []
    for key, value in {**TINY, "epochs": 1, "lrn": "false", "register": "ui-model"}.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    study = yaml.safe_load((ROOT / "experiments" / "smoke.yaml").read_text())
    study.update(name="ui-study", seeds=[0], axes={"dropout": [0.5, 0.0]}, experiment="alexnet-keras")
    study["base"]["data"]["synthetic_samples"] = 64
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    with pytest.MonkeyPatch.context() as patch:
        point_at(patch, tmp_path, mlflow_store)
        assert cli.main(["train", *flags]) == 0
        assert cli.main(["ablate", str(tmp_path / "study.yaml")]) == 0
    runs = all_runs(mlflow_store)
    (run,) = [r for r in runs if tracking.STUDY_TAG not in r.data.tags]
    (parent,) = [r for r in runs if r.data.tags.get(tracking.ROLE_TAG) == "parent"]
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, **QUIET_SERVER}
    # One worker, no job runner: 10 CPU-s in the first 30 s against 58 with `mlflow ui`'s defaults
    # (benchmarks/results/mlflow-server-cpu.txt).
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", mlflow_store, "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, "mlflow ui exited"
            assert time.monotonic() < deadline, "mlflow ui did not answer within 90 s"
            time.sleep(0.5)
        yield base, run, parent, mlflow_store
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def test_ui_lists_the_experiment_and_shows_the_run_with_params(ui, tmp_path):
    base, run, _, uri = ui
    page = f"{base}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "mlflow-ui-run-page.png"
    shot.unlink(missing_ok=True)
    # One Chromium renders the page, prints its DOM and takes the screenshot.
    dom = _chromium(page, "--dump-dom", f"--screenshot={shot}", profile=tmp_path / "profile-dom").stdout
    assert run.info.run_name.endswith("-" + run.data.tags["alexnet_keras.config_digest"][:6])
    assert run.info.run_name in dom     # the run page rendered (a React app: needs JS)
    for param in ("lrn", "weight_decay", "batch_size"):
        assert param in dom, param
    assert "Finished" in dom
    assert "AlexNet (cifar variant, 32 px input, width 0.125) trained on synthetic" in dom   # the description
    # The registered model, linked from the run page ("Registered models": ui-model v1).
    assert 'href="#/models/ui-model/versions/1"' in dom
    assert "Registered models" in dom

    listing = _chromium(f"{base}/#/experiments", "--dump-dom", profile=tmp_path / "profile-list").stdout
    assert "alexnet-keras" in listing                  # the experiment appears in the experiments list

    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000

    # The artifacts the page links to: figures and the model are served by the same server.
    artifacts = mlflow.artifacts.list_artifacts(run_id=run.info.run_id, tracking_uri=uri)
    assert {"figures", "summary"} <= {a.path for a in artifacts} and "model" not in {a.path for a in artifacts}
    (output,) = mlflow.MlflowClient(uri).get_run(run.info.run_id).outputs.model_outputs   # the logged model
    model_files = mlflow.artifacts.list_artifacts(artifact_uri=f"models:/{output.model_id}", tracking_uri=uri)
    assert "MLmodel" in {a.path for a in model_files}


def test_ui_shows_the_study_parent_with_its_table(ui, tmp_path):
    """The study's parent, named after the study, shows reports/ablation_table.json (logged with
    mlflow.log_table) as a table: its columns as header cells, one row per variant."""
    base, _, parent, _ = ui
    assert parent.info.run_name == "ui-study"
    page = (f"{base}/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}"
            f"/artifacts/reports/ablation_table.json")
    dom = _chromium(page, "--dump-dom", profile=tmp_path / "profile-table").stdout
    assert "ui-study" in dom and "View as table" in dom
    for column in ("variant", "test_accuracy_mean", "delta_test_accuracy", "reading"):
        assert re.search(rf'table-header-text[^>]*title="{column}"', dom), column
    text = re.sub(r"<[^>]+>", " ", dom)
    assert re.search(r"\bbaseline\b", text) and "dropout=0.0" in text


def test_ui_renders_the_study_report_and_its_figures(ui, tmp_path):
    """reports/ablation.md, where the parent's short description points, renders in the artifact view as
    Markdown (a heading, and the study table as a table, not source text); its figures show as images."""
    base, _, parent, _ = ui
    run_page = f"{base}/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}"
    dom = _chromium(f"{run_page}/artifacts/reports/ablation.md", "--dump-dom", profile=tmp_path / "profile-md").stdout
    assert re.search(r"<h2[^>]*>Ablation study (<[^>]+>)*<code>ui-study</code>", dom)   # rendered, not "## ..."
    assert "## Ablation study" not in dom
    for column in ("variant", "test acc", "p (Holm)", "reading"):
        assert re.search(rf'table-header[^>]*>(<[^>]+>)*{re.escape(column)}<', dom), column
    figure = _chromium(f"{run_page}/artifacts/figures/ablation_test_accuracy.png", "--dump-dom",
                       profile=tmp_path / "profile-figure").stdout
    assert re.search(r'<img alt="figures/ablation_test_accuracy\.png" src="blob:', figure)
