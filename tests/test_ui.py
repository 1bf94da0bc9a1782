"""The MLflow UI shows what a training run logged: started for real, read by headless Chromium.

Skipped where Chromium is absent (.ci/run installs Debian's `chromium`). A screenshot of the run page is
kept under test-artifacts/ for a person to look at.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from conftest import TINY, all_runs

from alexnet_keras import cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _chromium(url: str, *extra: str, profile: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
             "--virtual-time-budget=20000", "--window-size=1400,1000"]
    return subprocess.run([CHROMIUM, *flags, *extra, url], capture_output=True, text=True, timeout=120)


@pytest.fixture
def ui(mlflow_store, tmp_path):
    """`mlflow ui` on a free loopback port over a store holding one real training run."""
    flags = []
    for key, value in {**TINY, "epochs": 1, "run_name": "ui-check-run", "lrn": "false"}.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    assert cli.main(["train", *flags]) == 0
    (run,) = all_runs(mlflow_store)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", mlflow_store, "--host", "127.0.0.1",
         "--port", str(port)], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
        yield base, run
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def test_ui_lists_the_experiment_and_shows_the_run_with_params(ui, tmp_path):
    base, run = ui
    page = f"{base}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    dom = _chromium(page, "--dump-dom", profile=tmp_path / "profile-dom").stdout
    assert "ui-check-run" in dom                       # the run page rendered (a React app: needs JS)
    for param in ("lrn", "weight_decay", "batch_size"):
        assert param in dom, param
    assert "Finished" in dom

    listing = _chromium(f"{base}/#/experiments", "--dump-dom", profile=tmp_path / "profile-list").stdout
    assert "alexnet-keras" in listing                  # the experiment appears in the experiments list

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "mlflow-ui-run-page.png"
    _chromium(page, f"--screenshot={shot}", profile=tmp_path / "profile-shot")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000

    # The artifacts the page links to: figures and the model are served by the same server.
    artifacts = mlflow.artifacts.list_artifacts(run_id=run.info.run_id, tracking_uri=mlflow.get_tracking_uri())
    assert {"figures", "model"} <= {a.path for a in artifacts}
