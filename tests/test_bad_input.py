"""Bad input: each case ends in one clear message (what is wrong, where, how to fix) and no MLflow run.

A bad option or file is found before the store is opened: those tests assert that no store file was
created at all (`untouched_store`). Data and store problems are found after the store is opened and
before any run exists: those assert an empty store (`mlflow_store`). Cases that are not errors by design
(corrupt files among good ones, grayscale/RGBA/CMYK images, huge images) are checked for their
documented outcome instead. docs/reliability.md lists every case.
"""

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import TINY, all_runs, cli_flags
from PIL import Image

from alexnet_keras import cli


def _write_images(folder, count=6, size=(20, 24), mode="RGB", colour=100):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(colour)
    for i in range(count):
        pixels = np.clip(rng.normal(colour, 30, size=(*size, 3)), 0, 255).astype("uint8")
        Image.fromarray(pixels).convert(mode).save(folder / f"{i}.png")


def _train_fails(capsys, args, *fragments):
    code = cli.main(["train", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def _fails_before_the_store(store_path, capsys, args, *fragments):
    err = _train_fails(capsys, args, *fragments)
    assert not store_path.exists(), "the store was opened for an input that is wrong from the start"
    return err


def _fails_before_any_run(uri, capsys, args, *fragments):
    err = _train_fails(capsys, args, *fragments)
    assert all_runs(uri) == [], "a bad input must not leave a run behind"
    return err


FOLDER = {**TINY, "dataset": "folder", "epochs": 1}


# --- options -------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, fragments", [
    (["--dropout", "1.5"], ["model.dropout must be in [0.0, 1.0); got 1.5"]),
    (["--pool", "foo"], ["model.pool", "must be one of 'overlapping', 'non_overlapping'; got 'foo'",
                         "--pool overlapping"]),
    (["--activation", "swish"], ["'relu', 'tanh', 'sigmoid'", "'swish'"]),
    (["--dataset", "imagenet"], ["must be one of 'cifar10', 'folder', 'synthetic'; got 'imagenet'"]),
    (["--epochs", "0"], ["train.epochs must be a positive integer"]),
    (["--batch-size", "many"], ["train.batch_size must be an integer; got 'many'"]),
    (["--learning-rate", "-1"], ["train.learning_rate", "-1"]),
    (["--lrn", "perhaps"], ["model.lrn must be true or false; got 'perhaps'"]),
    (["--variant", "paper", "--image-size", "50"], ["model.image_size must be an integer >= 67", "50"]),
    (["--val-fraction", "0.9"], ["data.val_fraction must be in (0.0, 0.5]"]),
])
def test_bad_option_values(untouched_store, capsys, flags, fragments):
    _fails_before_the_store(untouched_store, capsys, [*cli_flags(TINY), *flags], *fragments)


def test_unknown_option_is_refused_by_the_parser(untouched_store, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--lrnn", "false"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --lrnn" in capsys.readouterr().err
    assert not untouched_store.exists()


@pytest.mark.parametrize("argv, typo, hint", [
    (["train", "--lrm", "false"], "--lrm false", "Did you mean --lrn?"),
    (["train", "--epoch", "2"], "--epoch 2", "Did you mean --epochs?"),            # no abbreviations
    (["ablate", "s.yaml", "--paralel", "2"], "--paralel", "Did you mean --parallel?"),
    (["tune", "s.yaml", "--max-trial", "2"], "--max-trial", "Did you mean --max-trials?"),
])
def test_a_typod_flag_gets_did_you_mean_in_one_line(untouched_store, capsys, argv, typo, hint):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"unrecognized arguments: {typo}" in err and hint in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not untouched_store.exists()


# --- experiment files ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, fragment", [
    ("model: {lrn: false\n", "is not valid YAML"),
    ("- lrn\n- false\n", "must hold a mapping"),
    ("model:\n  lrm: false\n", "unknown option 'model.lrm'. Did you mean lrn"),
    ("model:\n  lrn: false\n  lrn: true\n", "has the key 'lrn' twice in one mapping (again at line 3)"),
    ("model: {lrn: false}\ntrain: {epochs: 2}\nmodel: {dropout: 0}\n", "key 'model' twice"),
])
def test_malformed_experiment_file(untouched_store, capsys, tmp_path, text, fragment):
    path = tmp_path / "experiment.yaml"
    path.write_text(text)
    err = _fails_before_the_store(untouched_store, capsys, ["--config", str(path)], fragment)
    assert str(path) in err                                         # says which file


def test_missing_experiment_file(untouched_store, capsys, tmp_path):
    _fails_before_the_store(untouched_store, capsys, ["--config", str(tmp_path / "nope.yaml")], "does not exist")


# --- data folders --------------------------------------------------------------------------------

def test_data_dir_that_does_not_exist(mlflow_store, capsys, tmp_path):
    _fails_before_any_run(mlflow_store, capsys, cli_flags({**FOLDER, "data_dir": tmp_path / "missing"}),
                 str(tmp_path / "missing"), "does not exist", "--data-dir")


def test_empty_data_dir(mlflow_store, capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    _fails_before_any_run(mlflow_store, capsys, cli_flags({**FOLDER, "data_dir": tmp_path / "empty"}), str(tmp_path / "empty"))


def test_data_dir_with_one_class(mlflow_store, capsys, tmp_path):
    _write_images(tmp_path / "one" / "cats")
    _fails_before_any_run(mlflow_store, capsys, cli_flags({**FOLDER, "data_dir": tmp_path / "one"}), "class")


def test_data_dir_with_files_but_no_images(mlflow_store, capsys, tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "text" / cls).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "text" / cls / f"{i}.txt").write_text("not an image")
    _fails_before_any_run(mlflow_store, capsys, cli_flags({**FOLDER, "data_dir": tmp_path / "text"}), str(tmp_path / "text"))


def test_data_dir_that_is_a_plain_file(mlflow_store, capsys, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("x")
    _fails_before_any_run(mlflow_store, capsys, cli_flags({**FOLDER, "data_dir": path}), "is a file")


def test_unreadable_files_are_skipped_and_counted_and_every_image_mode_is_converted(mlflow_store, tmp_path):
    """Not errors, in one training: truncated, empty and garbage files are skipped and counted; grayscale,
    RGBA, CMYK and huge images, and images of odd sizes, all become RGB at the model's size."""
    root = tmp_path / "mixed"
    _write_images(root / "gray", count=8, mode="L", colour=50)
    _write_images(root / "rgba", count=8, mode="RGBA", colour=200)
    rng = np.random.default_rng(0)
    for i in range(4):   # odd sizes, portrait and landscape
        pixels = np.clip(rng.normal(50, 20, size=(24 + i, 30 - 2 * i, 3)), 0, 255).astype("uint8")
        Image.fromarray(pixels).save(root / "gray" / f"odd{i}.png")
    Image.fromarray(np.full((30, 30, 3), 60, "uint8")).convert("CMYK").save(root / "gray" / "cmyk.jpg")
    Image.fromarray(np.full((3000, 2500, 3), 200, "uint8")).save(root / "rgba" / "huge.png")
    good = (root / "gray" / "0.png").read_bytes()
    (root / "gray" / "truncated.png").write_bytes(good[: len(good) // 3])
    (root / "rgba" / "empty.jpg").write_bytes(b"")
    (root / "rgba" / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 garbage")
    assert cli.main(["train", *cli_flags({**FOLDER, "data_dir": root})]) == 0
    (run,) = all_runs(mlflow_store)
    assert run.info.status == "FINISHED" and run.data.metrics["skipped_files"] == 3   # the three broken ones
    data_json = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="data.json", tracking_uri=mlflow_store)).read_text())
    assert data_json["class_names"] == ["gray", "rgba"] and data_json["counts"]["skipped"] == 3
    counts = data_json["counts"]
    assert counts["train"] + counts["val"] + counts["test"] == 8 + 4 + 1 + 8 + 1   # every readable image


# --- the MLflow store ----------------------------------------------------------------------------

def test_store_folder_that_does_not_exist(capsys):
    code = cli.main(["train", *cli_flags(TINY), "--tracking-uri", "sqlite:////nonexistent/dir/mlflow.db"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "/nonexistent/dir" in err and "not writable" in err and "--tracking-uri" in err


def test_unwritable_artifact_folder_fails_before_training(mlflow_store, capsys):
    from mlflow.tracking import MlflowClient

    # /dev/null is a file, so nothing can be created below it (chmod would not stop root).
    MlflowClient().create_experiment("blocked", artifact_location="/dev/null/artifacts")
    err = _fails_before_any_run(mlflow_store, capsys, [*cli_flags(TINY), "--experiment", "blocked"],
                                "/dev/null/artifacts", "not writable")
    assert "--experiment" in err


def test_offline_without_data_points_at_data_dir(mlflow_store, capsys, monkeypatch):
    import keras

    def offline():
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(keras.datasets.cifar10, "load_data", offline)
    monkeypatch.delenv("ALEXNET_KERAS_DATA_DIR", raising=False)
    _fails_before_any_run(mlflow_store, capsys, ["--variant", "cifar", "--dataset", "cifar10"],
                          "--data-dir", "ALEXNET_KERAS_DATA_DIR")


def test_model_with_a_lambda_layer_is_refused_by_predict(tmp_path, capsys):
    """An untrusted .keras file whose Lambda layer would run code on loading: refused (safe_mode)."""
    import json

    import keras

    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.Lambda(lambda x: x * 2.0, name="payload")(inputs)
    path = tmp_path / "untrusted.keras"
    keras.Model(inputs, outputs).save(path)
    (tmp_path / "untrusted.preprocessing.json").write_text(json.dumps({"class_names": ["a", "b"], "preprocessing": {
        "recipe": "simple", "resize": "squash", "stored_size": 8, "image_size": 8, "pixel_mean": False}}))
    Image.fromarray(np.zeros((8, 8, 3), "uint8")).save(tmp_path / "x.png")
    code = cli.main(["predict", "--model", str(path), str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "refused to load" in err and "safe_mode" in err, err


# --- archives whose extraction would be unbounded (issue 25) ---------------------------------------

def _zip_of_zeros(path, size, declared=None):
    """A zip of one member holding `size` zero bytes; its central directory says `declared` bytes."""
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.writestr("set/a/zeros.bin", bytes(size))
    if declared is not None:
        raw = bytearray(path.read_bytes())
        start = raw.find(b"PK\x01\x02")   # the central header's uncompressed size, at offset 24
        raw[start + 24:start + 28] = declared.to_bytes(4, "little")
        path.write_bytes(bytes(raw))
    return path


def _tgz_of_zeros(path, size, declared=None):
    """A tar.gz of one member holding `size` zero bytes, whose header says `declared` bytes."""
    import gzip
    import tarfile

    info = tarfile.TarInfo("set/a/zeros.bin")
    info.size = size if declared is None else declared
    with gzip.open(path, "wb", compresslevel=9) as gz:
        gz.write(info.tobuf() + bytes(size) + bytes(-size % 512) + bytes(1024))
    return path


def test_an_archive_declaring_1_gib_is_refused_from_its_headers(tmp_path, isolated_data):
    """Members that say they hold 1 GiB in a few hundred bytes: refused before anything is written."""
    import time

    from alexnet_keras.data import DataError, locate_data_dir

    for archive in (_zip_of_zeros(tmp_path / "bomb.zip", 16, 2 ** 30),
                    _tgz_of_zeros(tmp_path / "bomb.tar.gz", 16, 2 ** 30)):
        start = time.perf_counter()
        with pytest.raises(DataError) as err:
            locate_data_dir(str(archive))
        assert time.perf_counter() - start < 2
        assert "bomb" in str(err.value) and "1,024.0 MiB" in str(err.value), err.value
        assert "decompression bomb" in str(err.value) and "ALEXNET_KERAS_MAX_EXTRACT_RATIO=" in str(err.value)
        assert list((tmp_path / "cache" / "datasets").iterdir()) == []


def test_an_archive_over_the_ratio_is_refused_and_the_setting_named_raises_it(tmp_path, isolated_data,
                                                                             monkeypatch):
    """Real zeros (8 MiB packed into kilobytes), with the 64 MiB floor lowered to 0 so a test can afford it."""
    import re

    from alexnet_keras.data import DataError, archives, locate_data_dir

    monkeypatch.setattr(archives, "RATIO_FREE", 0)
    for archive in (_zip_of_zeros(tmp_path / "zeros.zip", 2 ** 23), _tgz_of_zeros(tmp_path / "zeros.tgz", 2 ** 23)):
        monkeypatch.setenv("ALEXNET_KERAS_CACHE", str(tmp_path / f"cache-{archive.name}"))
        with pytest.raises(DataError, match="over 100 times its") as err:
            locate_data_dir(str(archive))
        assert list((tmp_path / f"cache-{archive.name}" / "datasets").iterdir()) == []
        setting = re.search(r"ALEXNET_KERAS_MAX_EXTRACT_RATIO=(\d+)", str(err.value)).group(1)
        monkeypatch.setenv("ALEXNET_KERAS_MAX_EXTRACT_RATIO", setting)
        assert (locate_data_dir(str(archive)).path / "zeros.bin").stat().st_size == 2 ** 23
        monkeypatch.delenv("ALEXNET_KERAS_MAX_EXTRACT_RATIO")
    monkeypatch.setenv("ALEXNET_KERAS_MAX_EXTRACT_RATIO", "many")
    with pytest.raises(DataError, match="ALEXNET_KERAS_MAX_EXTRACT_RATIO='many' must be a positive number"):
        locate_data_dir(str(_zip_of_zeros(tmp_path / "other.zip", 64)))


def test_an_archive_beyond_the_free_space_of_the_cache_is_refused(tmp_path, isolated_data, monkeypatch):
    import collections
    import shutil

    from alexnet_keras.data import DataError, locate_data_dir

    monkeypatch.setattr(shutil, "disk_usage", lambda path: collections.namedtuple("usage", "total used free")(
        2 ** 20, 2 ** 20 - 1000, 1000))
    with pytest.raises(DataError, match=r"more than the 0.0 MiB free in the data cache .* ALEXNET_KERAS_CACHE"):
        locate_data_dir(str(_zip_of_zeros(tmp_path / "small.zip", 4096)))
    assert list((tmp_path / "cache" / "datasets").iterdir()) == []


def test_a_header_that_understates_a_member_gets_no_more_bytes_written(tmp_path, isolated_data):
    """Headers can lie: zipfile and tarfile write what a header declares, never the bytes beyond it."""
    from alexnet_keras.data import DataError, locate_data_dir

    with pytest.raises(DataError, match="could not extract .*liar.zip.*CRC"):   # 10 bytes written, then refused
        locate_data_dir(str(_zip_of_zeros(tmp_path / "liar.zip", 2 ** 20, declared=10)))
    assert list((tmp_path / "cache" / "datasets").iterdir()) == []
    extracted = locate_data_dir(str(_tgz_of_zeros(tmp_path / "liar.tar.gz", 2 ** 20, declared=10))).path
    assert [f.stat().st_size for f in extracted.rglob("*") if f.is_file()] == [10]


# --- the working folder, Ray options, study and sweep files (issue 25) -------------------------------

def test_a_read_only_working_folder_creates_no_experiment(mlflow_store, read_only_folder, tmp_path, monkeypatch,
                                                          capsys):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(read_only_folder)   # a new experiment's artifacts would go to ./mlruns, for good
    args = [*cli_flags(TINY), "--experiment", "elsewhere", "--checkpoint-dir", str(tmp_path / "checkpoints")]
    _fails_before_any_run(mlflow_store, capsys, args, "new experiment 'elsewhere'", f"'{read_only_folder}/mlruns'",
                          "not writable; it is not created", "--experiment")
    assert MlflowClient(mlflow_store).get_experiment_by_name("elsewhere") is None


def _spec(tmp_path, text):
    path = tmp_path / "spec.yaml"
    base = "" if "base:" in text else "base: {dataset: synthetic, variant: cifar, width: 0.125}\n"
    path.write_text(f"name: spec\n{base}{text}")
    return str(path)


def _refused(capsys, args, *fragments):
    code = cli.main(args)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


@pytest.mark.parametrize("command, text, fragments", [
    ("ablate", "axes: {data_dir: [/tmp/a, /tmp/b]}\nseeds: 1",
     ["axis 'data_dir' varies data_dir, which dataset 'synthetic' does not read", "set `dataset` in `base`"]),
    ("ablate", "axes: {synthetic_classes: [3, 4]}\nseeds: 1\nbase: {dataset: cifar10, variant: cifar}",
     ["axis 'synthetic_classes'", "dataset 'cifar10' does not read"]),
    ("ablate", "axes: {cache: {a: {max_memory_mb: 1}, b: {max_memory_mb: 2}}}\nseeds: 1",
     ["axis 'cache' varies max_memory_mb, which dataset 'synthetic' does not read"]),
    ("ablate", "axes: {stored_size: [64, 96]}\nseeds: 1", ["recipe 'simple' does not read"]),
    ("ablate", "axes: {lrn: [true, false]}\nseeds: 1\nnuisance_grid: {pca_std: [0.1, 0.2]}",
     ["nuisance_grid 'pca_std' varies pca_std, which recipe 'simple' does not read"]),
    ("tune", "search_space: {learning_rate: [0.01, 0.02], data_dir: [/a, /b]}\nbudget: {max_trials: 2}",
     ["search_space.data_dir varies data_dir, which dataset 'synthetic' does not read"]),
    ("ablate", "axes: {lrn: [true, false]}\nseeds: true", ["`seeds` must be a list; got True"]),
    ("ablate", "axes: {lrn: [true, false]}\nseeds: [true, 2]", ["`seeds.0` must be an integer; got True"]),
    ("ablate", "axes: {lrn: [true, false]}\nseeds: 1\nmax_runs: yes", ["`max_runs` must be an integer; got True"]),
    ("ablate", "axes: {epochs: [true, 2]}\nseeds: 1", ["axis 'epochs', value 'true': train.epochs must be an integer"]),
    ("tune", "search_space: {lrn: [true, false]}\nbudget: {max_trials: yes}",
     ["`budget.max_trials` must be an integer; got True"]),
    ("tune", "search_space: {lrn: [true, false]}\nseed: true", ["`seed` must be an integer; got True"]),
    ("tune", "search_space: {batch_size: {type: int, min: true, max: 4}}",
     ["`search_space.batch_size.min` must be an integer; got True"]),
    ("tune", "search_space: {width: {type: float, min: 0.1, max: yes}}",
     ["`search_space.width.max` must be a number; got True"]),
    ("tune", "search_space: {epochs: [true, 2]}", ["search_space.epochs: True is not a valid value"]),
])
def test_study_and_sweep_files_that_would_train_copies_or_read_yes_as_1(tmp_path, untouched_store, capsys, command,
                                                                         text, fragments):
    _refused(capsys, [command, _spec(tmp_path, text), "--dry-run"], *fragments)
    assert not untouched_store.exists()


@pytest.mark.parametrize("args, fragment", [
    (["tune", "SPEC", "--ray", "--ray-workers", "0"], "--ray-workers: expected a positive whole number, got '0'"),
    (["tune", "SPEC", "--ray", "--ray-workers", "1.5"], "expected a positive whole number, got '1.5'"),
    (["ablate", "SPEC", "--parallel", "0"], "argument --parallel: expected a positive whole number, got '0'"),
    (["ablate", "SPEC", "--ray", "--ray-cpus", "-1"], "argument --ray-cpus: expected a positive number of CPUs"),
])
def test_ray_options_out_of_range_are_refused_while_parsing(tmp_path, untouched_store, capsys, args, fragment):
    spec = _spec(tmp_path, "axes: {lrn: [true, false]}\nseeds: 1")
    with pytest.raises(SystemExit) as exit_:
        cli.main([spec if a == "SPEC" else a for a in args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
    assert not untouched_store.exists()
