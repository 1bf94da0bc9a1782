"""A training run's evaluation artifacts at 1,000 classes (synthetic, and an image folder of 1,000 class
folders): the confusion figure keeps a fixed canvas, the whole matrix is a sparse CSV, and the process's
peak memory does not grow with the class count. The artifacts are made in a fresh Python process, the
way train.log_evaluation makes them (MLflow's log_figure saves with savefig's defaults), without
TensorFlow so that it takes seconds. Then the commands themselves at 1,000 class folders (prepare, one
tiny training, predict, the served model's answer) in one TensorFlow process, and the 10-crop test's
memory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alexnet_keras import figures, tables
from conftest import copy_store, run_script, subprocess_env

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


@pytest.fixture(scope="module")
def thousand_folders(tmp_path_factory):
    """An image folder of 1,000 class folders (`n00000000` ...) of two 8x8 JPEGs each."""
    folder = tmp_path_factory.mktemp("thousand") / "images"
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    for c in range(1000):
        (folder / f"n{c:08d}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(pixels).save(folder / f"n{c:08d}" / f"{i}.jpg")
    return folder


def test_evaluation_artifacts_of_1000_classes_stay_small(tmp_path, thousand_folders):
    folder = thousand_folders
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


# prepare, train (paper recipe, 10-crop test), predict and the served model's answer at 1,000 classes, in one
# fresh process: the peak memory after each (VmHWM), from the same start (what each command imports).
COMMANDS = r"""
import json, sys
from pathlib import Path
import mlflow, pandas as pd
from alexnet_keras import serving
from alexnet_keras.config import load_config
from alexnet_keras.data.tfrecord import prepare
from alexnet_keras.training.train import train_and_evaluate

def peak_mb():
    return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 1024

folder, work = Path(sys.argv[1]), Path(sys.argv[2])
peaks = {"imports": peak_mb()}
prepare(folder, work / "shards", stored_size=36, verbose=False)
peaks["prepare"] = peak_mb()
options = dict(variant="cifar", width=0.125, init="keras", dataset="folder", data_dir=work / "shards", recipe="paper",
               stored_size=36, epochs=1, batch_size=64, experiment="thousand", checkpoint_dir=work / "checkpoints",
               system_metrics=False)
run_id = train_and_evaluate(load_config(None, {k: str(v) for k, v in options.items()})).run_id
peaks["train"] = peak_mb()
files = [str(folder / name / "1.jpg") for name in ("n00000000", "n00000999")]
predicted = serving.load_predictor(run_id).predict_files(files, crops="ten")
peaks["predict"] = peak_mb()
model = mlflow.pyfunc.load_model(serving.logged_model_uri(mlflow.get_run(run_id)))
request = pd.DataFrame({"image": [Path(f).read_bytes() for f in files]})
served = model.predict(request, params={"top_k": 5, "crops": "ten"})
peaks["serve"] = peak_mb()
served = json.loads(served.to_json(orient="records"))
print("RESULT " + json.dumps({"run_id": run_id, "peaks": peaks, "predicted": predicted, "served": served}))
"""


@pytest.fixture(scope="module")
def thousand_run(thousand_folders, store_template, tmp_path_factory):
    """COMMANDS on `thousand_folders`, logged to a store of its own: (its result, the working folder)."""
    work = tmp_path_factory.mktemp("thousand-run")
    env = {**subprocess_env(copy_store(store_template, work)), "ALEXNET_KERAS_CACHE": str(work / "cache"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return run_script(COMMANDS, thousand_folders, work, env=env, cwd=work, timeout=300), work


def test_every_command_at_1000_classes_in_bounded_memory(thousand_run):
    result, work = thousand_run
    peaks = result["peaks"]
    # What TensorFlow, Keras and MLflow take on import is most of it; a 1,000-class train on a 1/8-width
    # network adds ~200 MB (the same as at 10 classes, 2026-12-06).
    assert peaks["serve"] < 1500 and peaks["serve"] - peaks["imports"] < 600, peaks
    (manifest,) = work.glob("shards/manifest.json")
    assert len(json.loads(manifest.read_text())["classes"]) == 1000 and manifest.stat().st_size < 100_000
    (artifacts,) = work.glob(f"mlruns/*/{result['run_id']}/artifacts")
    sizes = {str(p.relative_to(artifacts)): p.stat().st_size for p in artifacts.rglob("*") if p.is_file()}
    assert sizes["figures/confusion_matrix.png"] < 250_000 and sizes["reports/confusion_matrix.csv"] < 100_000, sizes
    assert max(sizes.values()) < 250_000, sizes          # every run artifact; the model is logged apart
    (mlmodel,) = work.glob("mlruns/*/models/*/artifacts/MLmodel")
    assert mlmodel.stat().st_size < 50_000              # the class names in its metadata, once


def test_predict_and_the_served_model_answer_the_top5_of_1000_class_names(thousand_run):
    result, _ = thousand_run
    for answer in (*result["predicted"], *result["served"]):
        top = answer["predictions"] if "predictions" in answer else answer["top_k"]
        assert [p["rank"] for p in top] == [1, 2, 3, 4, 5]
        assert all(p["class"] == f"n{p['index']:08d}" for p in top)
        assert [p["probability"] for p in top] == sorted((p["probability"] for p in top), reverse=True)
    assert [a["class"] for a in result["served"]] == [a["predictions"][0]["class"] for a in result["predicted"]]


def test_ten_crop_metrics_hold_one_batch_of_scores_at_a_time():
    import tracemalloc

    from alexnet_keras.model.inference import ten_crop_metrics, top_k_accuracy

    rng = np.random.default_rng(3)
    scores = rng.random((10_000, 1000), dtype=np.float32)   # 1,000 test images x 10 views, 1,000 classes: 40 MB
    labels = rng.integers(0, 1000, 1000)
    labels[:250] = scores[:2500].reshape(250, 10, -1).mean(axis=1).argmax(axis=1)   # some right at top-1

    class Model:
        def predict_on_batch(self, views):
            return scores[views]

        def predict(self, dataset, verbose=0):               # a whole-set predict: every score at once
            return np.concatenate([scores[views] for views in dataset])

    class Data:
        test_ten_crop = np.arange(10_000).reshape(250, 40)   # batches of the views of 4 images
        test_labels = labels

    tracemalloc.start()
    metrics = ten_crop_metrics(Model(), Data())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    averaged = scores.reshape(1000, 10, -1).mean(axis=1)
    assert metrics == {"test_10crop_accuracy": top_k_accuracy(averaged, labels, 1),
                       "test_10crop_top5_accuracy": top_k_accuracy(averaged, labels, 5)}
    assert metrics["test_10crop_accuracy"] >= 0.25
    assert peak < 2_000_000, peak    # 0.56 MB, a batch's; the whole set's scores in float32 and float64: 120 MB
