"""A training run's evaluation artifacts at 1,000 classes (synthetic, and an image folder of 1,000 class
folders): the confusion figure keeps a fixed canvas, the whole matrix is a sparse CSV, and the process's
peak memory does not grow with the class count. The artifacts are made in a fresh Python process, the
way train.log_evaluation makes them (MLflow's log_figure saves with savefig's defaults), without
TensorFlow so that it takes seconds."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from alexnet_keras import figures, tables

ROOT = Path(__file__).resolve().parent.parent

EVALUATE = r"""
import json, sys
from pathlib import Path
import numpy as np
from sklearn.metrics import classification_report
from alexnet_keras import figures, tables
from alexnet_keras.data.files import folder_layout

def peak_mb():   # this process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited across exec)
    status = Path("/proc/self/status").read_text().split("VmHWM:")[1]
    return int(status.split()[0]) / 1024

def evaluate(name, labels, names):
    rng = np.random.default_rng(0)
    predictions = np.where(rng.random(len(labels)) < 0.5, labels, rng.integers(0, len(names), len(labels)))
    out = Path(sys.argv[2]) / name
    out.mkdir()
    report = dict(y_true=labels, y_pred=predictions, labels=list(range(len(names))), target_names=names,
                  zero_division=0)
    (out / "classification_report.txt").write_text(classification_report(**report, digits=4))
    (out / "classification_report.json").write_text(json.dumps(classification_report(**report, output_dict=True)))
    (out / "confusion_matrix.csv").write_text(tables.csv_text(tables.confusion_rows(labels, predictions, names)))
    figures.confusion_matrix(labels, predictions, names, title=name).savefig(out / "confusion_matrix.png")
    return peak_mb()

peaks = {"start": peak_mb()}
peaks["10 classes"] = evaluate("ten", np.arange(1000) % 10, [f"class_{i}" for i in range(10)])
peaks["1000 synthetic classes"] = evaluate("synthetic", np.arange(1000) % 1000, [f"class_{i}" for i in range(1000)])
listing = folder_layout(Path(sys.argv[1]), "")
peaks["1000 class folders"] = evaluate("folder", np.array(listing.labels), listing.class_names)
print(json.dumps(peaks))
"""


def test_evaluation_artifacts_of_1000_classes_stay_small(tmp_path):
    folder = tmp_path / "images"
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    for c in range(1000):
        (folder / f"n{c:08d}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(pixels).save(folder / f"n{c:08d}" / f"{i}.jpg")
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", EVALUATE, str(folder), str(out)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    peaks = json.loads(done.stdout.strip().splitlines()[-1])
    # 1,000 classes take no more memory than 10 beyond a few arrays of class count (a 1,000-class full
    # matrix figure needed a canvas of ~8 GB).
    assert peaks["1000 class folders"] - peaks["10 classes"] < 100, peaks
    assert peaks["1000 class folders"] < 800, peaks
    for case in ("synthetic", "folder"):
        sizes = {p.name: p.stat().st_size for p in (out / case).iterdir()}
        assert sizes["confusion_matrix.png"] < 250_000, sizes
        assert sizes["confusion_matrix.csv"] < 100_000 and sizes["classification_report.txt"] < 150_000, sizes
        rows = (out / case / "confusion_matrix.csv").read_text().splitlines()
        assert rows[0] == "true,predicted,count,fraction_of_true" and len(rows) <= 1 + 2000
        assert (out / case / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out / "folder" / "confusion_matrix.png") as image:
        assert image.size == (1300, 600)                  # the same canvas as for 30 or 100 classes
    assert "n00000999" in (out / "folder" / "classification_report.txt").read_text()


def test_the_confusion_figure_is_the_whole_matrix_up_to_30_classes_and_fixed_above():
    rng = np.random.default_rng(1)
    for n, size in ((10, (7.0, 7.0)), (30, (16.0, 16.0)), (31, (13.0, 6.0)), (20_000, (13.0, 6.0))):
        labels = rng.integers(0, n, 200)
        figure = figures.confusion_matrix(labels, labels[::-1], [f"c{i}" for i in range(n)])
        assert tuple(figure.get_size_inches()) == size, n
        figures.plt.close(figure)


def test_confusion_rows_are_the_matrix_non_zero_cells_most_frequent_first():
    from sklearn.metrics import confusion_matrix

    rng = np.random.default_rng(2)
    labels, predictions = rng.integers(0, 7, 300), rng.integers(0, 7, 300)
    names = [f"c{i}" for i in range(9)]                   # two classes with no example at all
    rows = tables.confusion_rows(labels, predictions, names)
    dense = confusion_matrix(labels, predictions, labels=range(9))
    assert len(rows) == np.count_nonzero(dense)
    assert [r["count"] for r in rows] == sorted((r["count"] for r in rows), reverse=True)
    for r in rows:
        t, p = names.index(r["true"]), names.index(r["predicted"])
        assert r["count"] == dense[t, p] and r["fraction_of_true"] == dense[t, p] / dense[t].sum()


def test_learning_curve_ticks_are_whole_epochs():
    figure = figures.learning_curves({"loss": [2.0, 1.5, 1.2], "val_loss": [2.1, 1.7, 1.4],
                                      "accuracy": [0.2, 0.3, 0.4]})
    for ax in figure.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    figures.plt.close(figure)
