"""`alexnet-keras predict`: the same preprocessing as training, from what the model carries."""

from __future__ import annotations

import json
import os
import shutil
import signal
import zipfile
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from conftest import all_runs
from conftest import CLASSES, make_folder

from alexnet_keras import cli
from alexnet_keras.config import ModelConfig
from alexnet_keras.data import decode_image
from alexnet_keras.model.inference import save_model
from alexnet_keras.model.alexnet import build_alexnet
from alexnet_keras.serving import load_predictor, logged_model_uri

STORED, SIZE = 28, 24
SPEC = {"recipe": "paper", "resize": "shorter_side_crop", "stored_size": STORED, "image_size": SIZE,
        "pixel_mean": False}


pytestmark = pytest.mark.usefixtures("isolated_data")


def untrained_model(seed: int = 0, mean=(120.0, 110.0, 100.0), std=(60.0, 60.0, 60.0)) -> keras.Model:
    """An untrained 24-px AlexNet with a fixed seed, its logits spread so that inputs matter."""
    keras.utils.set_random_seed(seed)
    model = build_alexnet(ModelConfig(variant="cifar", image_size=SIZE, width=0.125, init="keras", dropout=0.0),
                          num_classes=len(CLASSES), input_mean=list(mean), input_std=list(std))
    fc8 = model.get_layer("fc8")
    fc8.kernel.assign(fc8.kernel * 30.0)
    return model


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Odd sizes, grayscale, CMYK JPEG, RGBA, and a corrupt file."""
    root = make_folder(tmp_path_factory.mktemp("predict") / "images", n_train=5, n_test=0, seed=5)
    return sorted(str(p) for p in (root / "train").rglob("*") if p.is_file())


def expected_probabilities(model, files, mean_image=None, crops="center"):
    """The model on pixels prepared independently: decode, then NumPy crops."""
    out = []
    for path in files:
        stored = decode_image(tf.io.read_file(path), STORED, "shorter_side_crop").numpy().astype(np.float32)
        if mean_image is not None:
            stored = stored - mean_image
        o = (STORED - SIZE) // 2
        views = [stored[o:o + SIZE, o:o + SIZE]]
        if crops == "ten":
            e = STORED - SIZE
            views = [stored[t:t + SIZE, l:l + SIZE] for t, l in ((0, 0), (0, e), (e, 0), (e, e), (o, o))]
            views += [v[:, ::-1] for v in views]
        out.append(model.predict_on_batch(np.stack(views)).mean(axis=0))   # predict(): ~0.2 s of set-up a call
    return np.asarray(out)


@pytest.mark.parametrize("crops", ["center", "ten"])
def test_predict_matches_model_predict_on_the_same_pixels(images, tmp_path, crops):
    model = untrained_model()
    path = save_model(model, tmp_path / "net.keras", CLASSES, SPEC)
    predictor = load_predictor(str(path))
    assert predictor.preprocessing == SPEC and predictor.class_names == CLASSES
    readable = [f for f in images if not f.endswith("corrupt.jpg")]
    results = predictor.predict_files(images, crops=crops, top=5)
    assert [r["file"] for r in results] == images
    assert [r for r in results if "error" in r] == [{"file": next(f for f in images if f.endswith("corrupt.jpg")),
                                                      "error": "not a readable image (JPEG, PNG, GIF or BMP)"}]
    expected = expected_probabilities(model, readable, crops=crops)
    assert np.ptp(expected.argmax(axis=1)) > 0 or np.ptp(expected[:, 0]) > 0.05   # inputs change outputs
    got = [r for r in results if "error" not in r]
    for result, probs in zip(got, expected):
        assert [p["index"] for p in result["predictions"]] == list(np.argsort(-probs, kind="stable")[:3])
        assert [p["class"] for p in result["predictions"]] == [CLASSES[i] for i in np.argsort(-probs, kind="stable")]
        np.testing.assert_allclose([p["probability"] for p in result["predictions"]], np.sort(probs)[::-1],
                                   atol=1e-5)


def test_pixel_mean_model_subtracts_its_mean_image(images, tmp_path):
    mean_image = np.random.default_rng(0).uniform(50, 200, size=(STORED, STORED, 3)).astype(np.float32)
    model = untrained_model(mean=(0.0, 0.0, 0.0), std=(50.0, 50.0, 50.0))
    path = save_model(model, tmp_path / "pm.keras", CLASSES, {**SPEC, "pixel_mean": True}, mean_image)
    predictor = load_predictor(str(path))
    np.testing.assert_array_equal(predictor.mean_image, mean_image)
    readable = [f for f in images if not f.endswith("corrupt.jpg")][:4]
    got = np.array([[p["probability"] for p in sorted(r["predictions"], key=lambda p: p["index"])]
                    for r in predictor.predict_files(readable)])
    np.testing.assert_allclose(got, expected_probabilities(model, readable, mean_image), atol=1e-5)


def test_native_size_model_gets_small_images_resized_as_in_training(images, tmp_path):
    # A model trained on 8-px in-memory images resized to 28 per batch (as CIFAR's 32 -> 256).
    model = untrained_model()
    path = save_model(model, tmp_path / "small.keras", CLASSES, {**SPEC, "native_size": 8})
    readable = [f for f in images if not f.endswith("corrupt.jpg")][:3]
    got = load_predictor(str(path)).predict_files(readable, top=1)
    small = np.stack([decode_image(tf.io.read_file(f), 8, "squash").numpy() for f in readable])
    upscaled = tf.image.resize(small.astype(np.float32), [STORED, STORED]).numpy()   # bilinear, in float
    o = (STORED - SIZE) // 2
    expected = model.predict(upscaled[:, o:o + SIZE, o:o + SIZE], verbose=0)
    assert [r["predictions"][0]["index"] for r in got] == expected.argmax(axis=1).tolist()
    np.testing.assert_allclose([r["predictions"][0]["probability"] for r in got], expected.max(axis=1), atol=1e-5)


def test_predict_cli_text_json_and_errors(images, tmp_path, capsys):
    path = save_model(untrained_model(), tmp_path / "net.keras", CLASSES, SPEC)
    folder = str(Path(images[0]).parent.parent)
    assert cli.main(["predict", "--model", str(path), images[0], "--json", "--crops", "ten"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["crops"] == "ten" and out["preprocessing"] == SPEC
    (result,) = out["results"]
    assert result["file"] == images[0] and [p["rank"] for p in result["predictions"]] == [1, 2, 3]
    assert sum(p["probability"] for p in result["predictions"]) == pytest.approx(1.0, abs=1e-5)

    assert cli.main(["predict", "--model", str(path), folder, "--top", "2"]) == 1   # the corrupt file
    text = capsys.readouterr().out
    assert "corrupt.jpg  (centre crop)\n  error: not a readable image" in text
    assert text.count("  1. ") == len(images) - 1 and "  3. " not in text

    bare = tmp_path / "bare" / "net.keras"
    bare.parent.mkdir()
    untrained_model().save(bare)
    assert cli.main(["predict", "--model", str(bare), images[0]]) == 2
    assert "net.preprocessing.json" in capsys.readouterr().err
    assert cli.main(["predict", "--model", "no-such-model", images[0]]) == 2
    assert "neither an existing .keras file" in capsys.readouterr().err


def test_trained_run_predicts_logs_recipe_and_serves_pyfunc(mlflow_store, tmp_path, capsys):
    """Train a tiny paper-recipe model, then use it through its run id and through mlflow.pyfunc."""
    root = make_folder(tmp_path / "data", n_train=8, n_test=3, seed=2)
    flags = ["--variant", "cifar", "--width", "0.125", "--init", "keras", "--dataset", "folder",
             "--data-dir", str(root), "--recipe", "paper", "--stored-size", "36", "--epochs", "1",
             "--batch-size", "8", "--pixel-mean", "true", "--experiment", "paper-recipe-test"]
    assert cli.main(["train", *flags]) == 0
    (run,) = all_runs(mlflow_store)
    run_id = run.info.run_id
    metrics = run.data.metrics
    for key in ("test_accuracy", "test_top5_accuracy", "test_10crop_accuracy", "test_10crop_top5_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert run.data.params["recipe"] == "paper" and run.data.params["pca_color"] == "true"
    data_json = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="data.json", tracking_uri=mlflow_store)).read_text())
    assert data_json["class_names"] == CLASSES
    assert data_json["preprocessing"] == {"recipe": "paper", "resize": "shorter_side_crop", "stored_size": 36,
                                          "image_size": 32, "pixel_mean": True}
    stats = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="preprocessing/statistics.json", tracking_uri=mlflow_store)).read_text())
    assert len(stats["pca_eigenvalues"]) == 3 and stats["augmentation"]["pca_color"] is True
    model_uri = logged_model_uri(run)
    info = mlflow.models.get_model_info(model_uri)
    assert info.metadata["alexnet_keras"]["class_names"] == CLASSES

    files = sorted(str(p) for p in (root / "test").rglob("*.png"))[:4]
    capsys.readouterr()
    assert cli.main(["predict", "--model", run_id, *files, "--json"]) == 0
    by_run = json.loads(capsys.readouterr().out)["results"]
    predictor = load_predictor(model_uri)
    assert predictor.mean_image.shape == (36, 36, 3)
    assert predictor.predict_files(files) == by_run

    # mlflow.pyfunc on the files' bytes: the same classes and probabilities as predict.
    served = mlflow.pyfunc.load_model(model_uri).predict(
        pd.DataFrame({"image": [Path(f).read_bytes() for f in files]}), params={"top_k": 3})
    assert served["top_k"].tolist() == [r["predictions"] for r in by_run]
    np.testing.assert_allclose([r["predictions"][0]["probability"] for r in by_run], served["probability"], atol=1e-6)


def test_pixel_arrays_and_encoded_bytes_give_what_the_files_give(images, tmp_path):
    predictor = load_predictor(str(save_model(untrained_model(), tmp_path / "net.keras", CLASSES, SPEC)))
    pngs = [f for f in images if f.endswith(".png")][:3]
    by_file = predictor.predict_files(pngs, top=3)
    decoded = [np.asarray(tf.io.decode_image(tf.io.read_file(f), channels=3, expand_animations=False)) for f in pngs]
    by_array = predictor.predict_images(decoded, top=3)
    by_bytes = predictor.predict_images([Path(f).read_bytes() for f in pngs], top=3)
    assert [r["predictions"] for r in by_array] == [r["predictions"] for r in by_file]
    assert [r["predictions"] for r in by_bytes] == [r["predictions"] for r in by_file]
    as_lists = predictor.predict_images([d.astype(np.int64).tolist() for d in decoded], top=3)   # JSON's form
    assert [r["predictions"] for r in as_lists] == [r["predictions"] for r in by_file]
    bad = predictor.predict_images([b"", b"not an image", np.zeros((4, 4)), np.full((2, 2, 3), 256),
                                    np.full((2, 2, 3), 0.5), "aGVsbG8=", [[1, 2], [3]]])
    assert [r["error"].split(" ")[0] for r in bad] == ["empty", "not", "pixel", "pixel", "pixel", "a", "not"]


@pytest.mark.parametrize("flags, fragment", [
    (["--top", "0"], "top must be a whole number of at least 1; got 0"),
    (["--batch-size", "-4"], "batch size must be a whole number of at least 1; got -4"),
])
def test_bad_predict_options_are_one_line_before_any_model_is_loaded(images, capsys, flags, fragment):
    assert cli.main(["predict", "--model", "no-such-model", images[0], *flags]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"alexnet-keras predict: error: {fragment}."


def test_predict_on_a_failed_run_says_it_has_no_model(images, mlflow_store, capsys):
    mlflow.set_experiment("failed")
    with mlflow.start_run() as run:
        mlflow.log_text("summary", "model/summary.txt")   # train logs this before training
    mlflow.MlflowClient().set_terminated(run.info.run_id, "FAILED")
    capsys.readouterr()
    assert cli.main(["predict", "--model", run.info.run_id, images[0]]) == 2
    err = capsys.readouterr().err
    assert "holds no logged model" in err and "status is FAILED" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def crafted_keras(tmp_path: Path, config: dict) -> Path:
    """A .keras file whose config.json is `config`, with the weights of a real model and a sidecar."""
    tmp_path.mkdir()
    good = save_model(untrained_model(), tmp_path / "good.keras", CLASSES, SPEC)
    path = tmp_path / "crafted.keras"
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(path, "w") as target:
        for name in source.namelist():
            target.writestr(name, json.dumps(config) if name == "config.json" else source.read(name))
    (tmp_path / "crafted.preprocessing.json").write_text((tmp_path / "good.preprocessing.json").read_text())
    return path


def test_hostile_or_broken_model_files_are_refused_in_one_line(images, tmp_path, capsys):
    marker = tmp_path / "ran"
    cases = {}
    not_zip = tmp_path / "notzip.keras"
    not_zip.write_bytes(b"hello, not a zip")
    (tmp_path / "notzip.preprocessing.json").write_text(json.dumps({"class_names": CLASSES, "preprocessing": SPEC}))
    cases[str(not_zip)] = "is not a .keras model file"
    for class_name in ("function", "system"):   # os.system named as a function, and as a class
        cases[str(crafted_keras(tmp_path / class_name, {
            "module": "os", "class_name": class_name, "config": "system", "registered_name": "system",
            "args": [f"touch {marker}"]}))] = "refused to load"
    for case, fragment in cases.items():
        assert cli.main(["predict", "--model", case, images[0]]) == 2, case
        err = capsys.readouterr().err
        assert fragment in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not marker.exists()


@pytest.fixture(scope="module")
def pixel_mean_net(tmp_path_factory):
    """A folder with an untrained pixel-mean model saved as net.keras and its sidecars."""
    folder = tmp_path_factory.mktemp("pixel-mean-net")
    save_model(untrained_model(), folder / "net.keras", CLASSES, {**SPEC, "pixel_mean": True},
               np.zeros((STORED, STORED, 3), np.float32))
    return folder


@pytest.mark.parametrize("sidecar, content, fragment", [
    ("preprocessing.json", b"{not json", "cannot read"),
    ("preprocessing.json", b"\xff\xfe\x00", "cannot read"),
    ("preprocessing.json", json.dumps({"class_names": "bee", "preprocessing": SPEC}).encode(), "`class_names` must be a list; got 'bee'"),
    ("preprocessing.json", json.dumps({"class_names": CLASSES, "preprocessing": {**SPEC, "stored_size": -1}}).encode(),
     "`preprocessing.stored_size` must be a positive integer (at most"),
    ("preprocessing.json", json.dumps({"class_names": CLASSES, "preprocessing": {**SPEC, "resize": "x"}}).encode(),
     "`preprocessing.resize` must be one of 'squash', 'shorter_side_crop'; got 'x'"),
    ("preprocessing.json", json.dumps({"class_names": CLASSES, "preprocessing": {**SPEC, "image_size": 32}}).encode(),
     "image_size 32 is larger than stored_size 28"),
    ("mean_image.npy", b"garbage", "cannot read the mean image"),
    ("mean_image.npy", None, "cannot read the mean image"),          # an object array: would need pickle
])
def test_corrupt_sidecars_are_one_clear_line(images, pixel_mean_net, tmp_path, capsys, sidecar, content, fragment):
    for file in pixel_mean_net.iterdir():   # a copy of the model and its sidecars, one of which is then broken
        shutil.copy(file, tmp_path)
    path = tmp_path / "net.keras"
    target = tmp_path / f"net.{sidecar}"
    if content is None:
        np.save(target, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    else:
        target.write_bytes(content)
    assert cli.main(["predict", "--model", str(path), images[0]]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_predict_folder_opens_regular_files_only(images, tmp_path, capsys):
    """A FIFO (opening it would block forever), links out of the folder, dangling and looping links are
    never followed; the walk says what it skipped. A FIFO named on the command line is not opened."""
    path = save_model(untrained_model(), tmp_path / "net.keras", CLASSES, SPEC)
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    good = folder / "sub" / "a.png"
    good.write_bytes(Path(next(f for f in images if f.endswith(".png"))).read_bytes())
    outside = tmp_path / "outside.png"
    outside.write_bytes(good.read_bytes())
    os.mkfifo(folder / "pipe.jpg")
    (folder / "out.png").symlink_to(outside)
    (folder / "dangling.jpg").symlink_to(tmp_path / "missing.jpg")
    (folder / "loop").symlink_to(folder)
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("predict blocked on a special file"))
    signal.alarm(120)
    try:
        assert cli.main(["predict", "--model", str(path), str(folder), "--json"]) == 0
        captured = capsys.readouterr()
        results = json.loads(captured.out)["results"]
        assert [r["file"] for r in results] == [str(good)]
        assert "skipped 4 entries" in captured.err
        assert cli.main(["predict", "--model", str(path), str(folder / "pipe.jpg"), str(good), "--json"]) == 1
        fifo, ok = json.loads(capsys.readouterr().out)["results"]
        assert fifo["error"] == "not a regular file" and "predictions" in ok
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
