"""benchmarks/device_check.py, the script to run first when a GPU is lent, run end to end at toy sizes on
the CPU: every section measures through the training path and writes its table, so that the one GPU call
is spent measuring, not debugging."""

import csv
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_device_check_runs_every_section_at_toy_sizes(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    spec = importlib.util.spec_from_file_location("device_check", ROOT / "benchmarks" / "device_check.py")
    device_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "device_check", device_check)   # its dataclasses look their module up
    spec.loader.exec_module(device_check)
    out = tmp_path / "out"
    code = device_check.main(["--tiny", "--out", str(out), "--sections", "resident,jpeg,cifar10"])
    rows = {r["section"]: r for r in csv.DictReader(open(out / "device-check.csv"))}
    assert code == 0, rows
    assert set(rows) == {"resident", "memory", "jpeg", "cifar10"}
    for section in ("resident", "memory", "jpeg"):   # images per second, through the device and the pipeline
        assert float(rows[section]["img_s"]) > 0, rows[section]
    assert float(rows["jpeg"]["pipeline_img_s"]) > 0 and int(rows["jpeg"]["files"]) == 3 * 6
    assert 0.0 <= float(rows["cifar10"]["test_accuracy"]) <= 1.0 and rows["cifar10"]["run_id"]
    info = json.loads((out / "device-check.json").read_text())["info"]
    assert info["backend"] and info["cores"] >= 1 and "--tiny" in info["command"]
    assert "| resident |" in (out / "device-check.md").read_text()
    assert not (out / "work").exists()   # the generated JPEG folder is removed
