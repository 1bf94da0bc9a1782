"""The paper's data recipe (docs/data.md, "Recipes") and TFRecord shards (data/tfrecord.py), on tiny
generated folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import CLASSES, make_folder
from PIL import Image

from alexnet_keras import cli
from alexnet_keras import data as data_module
from alexnet_keras.config import ConfigError, DataConfig, load_config
from alexnet_keras.data import tfrecord
from alexnet_keras.data import (DataError, center_crop, decode_image, load_data, model_views, pca_color_shift,
                                random_crops, ten_crops)
from alexnet_keras.model.inference import ten_crop_metrics, top_k, top_k_accuracy

STORED, CROP = 20, 16


pytestmark = pytest.mark.usefixtures("isolated_data")


def collect(ds):
    xs, ys = [], []
    for x, y in ds:
        xs.append(x.numpy())
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("recipe") / "images")


def paper(folder, **kw) -> DataConfig:
    kw.setdefault("stored_size", STORED)
    return DataConfig(dataset="folder", data_dir=str(folder), recipe="paper", **kw)


def load(cfg, image_size=CROP, batch_size=8):
    with pytest.warns(UserWarning, match="skipped 1 file"):
        return load_data(cfg, image_size, batch_size, verbose=False)


# --------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------

def test_shorter_side_crop_policy_and_cmyk_grayscale(tmp_path):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(30, 50, 3), dtype=np.uint8)      # landscape: h 30, w 50
    Image.fromarray(pixels).save(tmp_path / "a.png")
    out = decode_image(tf.io.read_file(str(tmp_path / "a.png")), 20, "shorter_side_crop").numpy()
    # Shorter side 30 -> 20, longer 50 -> 33, then the central 20 columns (6..26).
    expected = tf.cast(tf.clip_by_value(tf.round(tf.image.resize(pixels, [20, 33], antialias=True)), 0, 255),
                       tf.uint8).numpy()[:, 6:26]
    np.testing.assert_array_equal(out, expected)
    # The squash policy ignores the aspect ratio.
    assert decode_image(tf.io.read_file(str(tmp_path / "a.png")), 20, "squash").shape == (20, 20, 3)

    rgb = np.zeros((24, 24, 3), np.uint8)
    rgb[..., 0], rgb[:, 12:, 2] = 210, 160
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    cmyk = decode_image(tf.io.read_file(str(tmp_path / "cmyk.jpg")), 24, "shorter_side_crop").numpy()
    # As Pillow decodes it (up to the decoders' chroma upsampling at the colour edge).
    pillow = np.asarray(Image.open(tmp_path / "cmyk.jpg").convert("RGB")).astype(int)
    assert np.abs(cmyk.astype(int) - pillow).mean() < 1 and np.abs(cmyk.astype(int) - pillow).max() <= 12
    assert np.abs(cmyk.astype(int) - rgb).mean() < 1    # red left, magenta right: RGB, not inverted

    Image.fromarray(rgb).convert("L").save(tmp_path / "grey.png")
    grey = decode_image(tf.io.read_file(str(tmp_path / "grey.png")), 12, "shorter_side_crop").numpy()
    assert grey.shape == (12, 12, 3) and (grey[..., 0] == grey[..., 2]).all()


# --------------------------------------------------------------------------------------------
# the paper recipe on a folder
# --------------------------------------------------------------------------------------------

def test_paper_recipe_shapes_counts_and_streaming_equivalence(folder):
    data = load(paper(folder))
    assert data.class_names == CLASSES and data.counts["skipped"] == 1
    assert data.counts["train"] + data.counts["val"] == 18 and data.counts["test"] == 6
    assert data.preprocessing == {"recipe": "paper", "resize": "shorter_side_crop", "stored_size": STORED,
                                  "image_size": CROP, "pixel_mean": False}
    x, y = next(iter(data.train))
    assert x.shape == (8, CROP, CROP, 3) and x.dtype == tf.float32 and y.dtype == tf.int32
    xt, yt = collect(data.test)
    assert xt.shape == (6, CROP, CROP, 3)
    np.testing.assert_array_equal(yt, data.test_labels)
    ten = np.concatenate([b.numpy() for b in data.test_ten_crop])
    assert ten.shape == (60, CROP, CROP, 3)
    np.testing.assert_array_equal(ten[4::10], xt)          # view 4 of every image is the centre crop
    stats = data.recipe_stats
    assert stats["images"] == data.counts["train"] and stats["pixels"] == data.counts["train"] * STORED ** 2
    assert len(stats["pca_eigenvalues"]) == 3 and np.shape(stats["pca_eigenvectors_columns"]) == (3, 3)

    # Streamed from the files (max_memory_mb 0): the same images, labels and statistics.
    streamed = load(paper(folder, max_memory_mb=0))
    assert streamed.recipe_stats["streamed"] and not stats["streamed"]
    for a, b in ((data.val, streamed.val), (data.test, streamed.test)):
        (xa, ya), (xb, yb) = collect(a), collect(b)
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    np.testing.assert_allclose(streamed.recipe_stats["covariance_rgb"], stats["covariance_rgb"], rtol=1e-9)
    assert streamed.digest == data.digest


def test_pca_and_mean_statistics_match_numpy_on_the_same_pixels(folder):
    # No augmentation and image_size == stored_size: the training pipeline yields the stored pixels.
    data = load(paper(folder, augment=False, pixel_mean=True), image_size=STORED)
    x, _ = collect(data.train)
    pixels = x.reshape(-1, 3).astype(np.float64)
    # pixel_mean: the pipeline subtracted the mean image; add it back to get the stored pixels.
    stored = x + data.mean_image
    pixels = stored.reshape(-1, 3).astype(np.float64)
    assert np.allclose(stored, np.rint(stored), atol=1e-3)              # whole uint8 values
    cov = np.cov(pixels.T, bias=True)
    stats = data.recipe_stats
    np.testing.assert_allclose(stats["mean_rgb"], pixels.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(stats["covariance_rgb"], cov, rtol=1e-6, atol=1e-6)
    eigenvalues, eigenvectors = np.linalg.eigh(cov / 255.0 ** 2)
    np.testing.assert_allclose(stats["pca_eigenvalues"], eigenvalues[::-1], rtol=1e-6)
    ours = np.asarray(stats["pca_eigenvectors_columns"])
    for i in range(3):   # eigenvectors are defined up to sign
        assert abs(abs(ours[:, i] @ eigenvectors[:, 2 - i]) - 1) < 1e-6
    # The per-pixel mean image and the std of what remains (which the model divides by).
    np.testing.assert_allclose(data.mean_image, stored.mean(axis=0), atol=1e-3)
    assert data.mean == [0.0, 0.0, 0.0]
    np.testing.assert_allclose(data.std, (stored - stored.mean(axis=0)).reshape(-1, 3).std(axis=0), rtol=1e-4)

    # The statistics on their own, against NumPy on random images.
    from alexnet_keras.data.images import ArrayImages
    from alexnet_keras.data.pixel_stats import statistics

    images = np.random.default_rng(3).integers(0, 256, size=(15, 7, 7, 3), dtype=np.uint8)
    flat = images.reshape(-1, 3).astype(np.float64)
    result = statistics(ArrayImages(images, np.zeros(15)), "random-images", pixel_mean=False, verbose=False)
    np.testing.assert_allclose(result.covariance, np.cov(flat.T, bias=True), rtol=1e-9)
    np.testing.assert_allclose(result.std, flat.std(axis=0), rtol=1e-9)


def test_augmentation_toggles(folder):
    def train_images(**kw):
        # Same seed, same size: every load shuffles the training images into the same order.
        return collect(load(paper(folder, **kw)).train)[0]

    plain = train_images(augment=False)                   # the master switch: centre crops, no colour
    assert np.array_equal(plain, np.rint(plain))
    np.testing.assert_array_equal(train_images(random_crop=False, random_flip=False, pca_color=False), plain)
    flipped = train_images(random_crop=False, pca_color=False)
    mirrored = [np.array_equal(f, p[:, ::-1]) and not np.array_equal(f, p) for f, p in zip(flipped, plain)]
    assert all(m or np.array_equal(f, p) for m, f, p in zip(mirrored, flipped, plain)) and any(mirrored)
    coloured = train_images(random_crop=False, random_flip=False)
    offset = coloured - plain                             # one RGB offset per image, different per image
    assert np.allclose(offset, offset[:, :1, :1, :], atol=1e-3)
    assert np.abs(offset).max() > 0.1 and len(np.unique(np.round(offset[:, 0, 0, 0], 3))) == len(offset)
    cropped = train_images(random_flip=False, pca_color=False)
    assert np.array_equal(cropped, np.rint(cropped)) and not np.array_equal(cropped, plain)


def test_recipe_config_validation(folder):
    with pytest.raises(ConfigError, match="'simple', 'paper'; got 'imagenet'"):
        load_config(overrides={"recipe": "imagenet"})
    with pytest.raises(ConfigError, match="pca_std must be in"):
        load_config(overrides={"pca_std": -1})
    with pytest.raises(ConfigError, match="stored_size must be an integer >= 8"):
        load_config(overrides={"stored_size": 4})
    with pytest.raises(DataError, match="--stored-size"):
        load_data(paper(folder), 32, 8, verbose=False)   # 32 px crops from 20 px images
    limited = load(paper(folder, test_limit=3))          # a stratified subset of the test set
    assert limited.counts["test"] == 3 and sorted(limited.test_labels.tolist()) == [0, 1, 2]
    assert sum(len(b) for b in limited.test_ten_crop) == 30
    config = load_config(Path(__file__).parent.parent / "experiments" / "paper_cifar227.yaml")
    assert config.data.recipe == "paper" and config.model.variant == "paper" and config.data.stored_size == 256


# --------------------------------------------------------------------------------------------
# crops, colour, top-k
# --------------------------------------------------------------------------------------------

def test_ten_crops_are_the_papers_views():
    images = np.arange(2 * 9 * 11 * 3, dtype=np.float32).reshape(2, 9, 11, 3)
    views = ten_crops(images, 5).numpy()
    assert views.shape == (2, 10, 5, 5, 3)
    expected = [images[:, 0:5, 0:5], images[:, 0:5, 6:11], images[:, 4:9, 0:5], images[:, 4:9, 6:11],
                images[:, 2:7, 3:8]]
    expected += [e[:, :, ::-1] for e in expected]                    # each patch reflected left-right
    for i, e in enumerate(expected):
        np.testing.assert_array_equal(views[:, i], e, err_msg=data_module.TEN_CROP_VIEWS[i])
    np.testing.assert_array_equal(center_crop(images, 5).numpy(), expected[4])
    flat = model_views(images, image_size=5, stored_size=9, crops="ten")   # already 9 px high: no resize
    assert flat.shape == (20, 5, 5, 3)
    np.testing.assert_array_equal(flat.numpy()[10:20], views[1])      # image 1's ten views follow image 0's


def test_random_crops_are_windows_of_the_image_and_reproducible():
    images = np.arange(4 * 10 * 10 * 3, dtype=np.float32).reshape(4, 10, 10, 3)
    seed = tf.constant([3, 4])
    out = random_crops(images, 7, seed).numpy()
    np.testing.assert_array_equal(out, random_crops(images, 7, seed).numpy())
    positions = set()
    for b in range(4):
        found = [(t, l, f) for t in range(4) for l in range(4) for f in (False, True)
                 if np.array_equal(out[b], images[b, t:t + 7, l:l + 7][:, ::-1] if f else images[b, t:t + 7, l:l + 7])]
        assert len(found) == 1
        positions.add(found[0])
    assert len(positions) > 1
    np.testing.assert_array_equal(random_crops(images, 7, seed, crop=False, flip=False).numpy(),
                                  center_crop(images, 7).numpy())


def test_pca_color_shift_follows_the_formula():
    eigenvalues = np.array([0.05, 0.01, 0.002])
    eigenvectors = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
    images = tf.zeros([2000, 2, 2, 3])
    seed = tf.constant([7, 8], tf.int64)
    out = pca_color_shift(images, seed, eigenvalues, eigenvectors, std=0.1).numpy()
    assert np.allclose(out, out[:, :1, :1, :])                           # one offset per image
    alpha = tf.random.stateless_normal([2000, 3], seed, stddev=0.1).numpy()
    expected = 255.0 * (alpha * eigenvalues) @ eigenvectors.T            # sum_i alpha_i lambda_i p_i
    np.testing.assert_allclose(out[:, 0, 0], expected, rtol=1e-4, atol=1e-4)
    assert abs(alpha.std() - 0.1) < 0.01


def test_top_k_on_known_logits():
    scores = np.array([[0.1, 0.5, 0.2, 0.15, 0.05, 0.0],
                       [3.0, 1.0, 2.0, 0.0, -1.0, 5.0],
                       [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]])              # a tie: the lower index first
    np.testing.assert_array_equal(top_k(scores, 5), [[1, 2, 3, 0, 4], [5, 0, 2, 1, 3], [0, 1, 2, 3, 4]])
    labels = np.array([0, 3, 5])        # ranks 4, 5 and 6
    assert top_k_accuracy(scores, labels, 1) == 0.0
    assert top_k_accuracy(scores, labels, 4) == pytest.approx(1 / 3)
    assert top_k_accuracy(scores, labels, 5) == pytest.approx(2 / 3)
    assert top_k_accuracy(scores, labels, 10) == 1.0                     # k capped at the class count
    assert top_k_accuracy(scores, [1, 5, 0], 1) == 1.0                  # the tie goes to class 0


def test_ten_crop_metrics_average_the_softmax_of_the_views():
    probs = np.full((20, 3), 1 / 3)
    probs[0:10] = [0.1, 0.2, 0.7]                            # image 0: class 2 in every view
    probs[10:16] = [0.0, 0.9, 0.1]                           # image 1: 6 views say 1 ...
    probs[16:20] = [1.0, 0.0, 0.0]                           # ... 4 views say 0 with certainty

    class Views:
        test_labels = np.array([2, 0])
        test_ten_crop = [np.arange(10), np.arange(10, 20)]   # a batch of one image's views each (view numbers)

    class Model:
        def predict_on_batch(self, views):
            return probs[views]

    # Image 1 averages to (0.4, 0.54, 0.06): class 1, wrong at top-1 (a majority vote would say the same,
    # a max over views would say 0), right at top-2.
    metrics = ten_crop_metrics(Model(), Views())
    assert metrics == {"test_10crop_accuracy": 0.5, "test_10crop_top5_accuracy": 1.0}
    assert ten_crop_metrics(Model(), type("NoTen", (), {"test_ten_crop": None})()) == {}


# --------------------------------------------------------------------------------------------
# TFRecords
# --------------------------------------------------------------------------------------------

def test_prepare_writes_shards_that_load_like_the_folder(folder, tmp_path, capsys):
    out = tmp_path / "records"
    assert cli.main(["prepare", str(folder), str(out), "--stored-size", str(STORED), "--encoding", "png",
                     "--shard-size", "4"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == CLASSES
    assert manifest["counts"] == {"train": 18, "test": 6, "skipped": 1}
    assert manifest["skipped"] == ["train/cat/corrupt.jpg"]
    assert manifest["size_policy"] == {"resize": "shorter_side_crop", "stored_size": STORED, "encoding": "png"}
    assert [s["count"] for s in manifest["splits"]["train"]["shards"]] == [4, 4, 4, 4, 2]
    assert all((out / s["file"]).is_file() for s in manifest["splits"]["test"]["shards"])

    from_folder = load(paper(folder, augment=False))
    for cfg in (paper(out, augment=False), DataConfig(dataset="cifar10", data_dir=str(out), recipe="paper",
                                                      stored_size=STORED, augment=False)):
        records = load_data(cfg, CROP, 8, verbose=False)
        assert records.class_names == CLASSES and records.counts == from_folder.counts
        np.testing.assert_array_equal(records.test_labels, from_folder.test_labels)
        for a, b in ((from_folder.val, records.val), (from_folder.test, records.test)):
            (xa, ya), (xb, yb) = collect(a), collect(b)
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(ya, yb)
        # Training reads shuffled, interleaved shards: the same images and labels, in another order.
        (xa, ya), (xb, yb) = collect(from_folder.train), collect(records.train)
        key = lambda x, y: sorted(zip(y.tolist(), [i.tobytes() for i in x.astype(np.uint8)]))  # noqa: E731
        assert key(xa, ya) == key(xb, yb)
        np.testing.assert_allclose(records.recipe_stats["covariance_rgb"],
                                   from_folder.recipe_stats["covariance_rgb"], rtol=1e-9)

    # The files' own bytes: the same arrays too (decoded and rescaled when read); JPEG: close.
    original = tmp_path / "original"
    tfrecord.prepare(folder, original, encoding="original", verbose=False)
    x_orig, _ = collect(load_data(paper(original, augment=False), CROP, 8, verbose=False).test)
    np.testing.assert_array_equal(x_orig, collect(from_folder.test)[0])
    jpeg = tmp_path / "jpeg"
    tfrecord.prepare(folder, jpeg, stored_size=STORED, verbose=False)
    x_jpeg, _ = collect(load_data(paper(jpeg, augment=False), CROP, 8, verbose=False).test)
    # (Noise is JPEG's worst case: ~8 grey levels off on average here; photographs lose far less.)
    assert np.abs(x_jpeg - collect(from_folder.test)[0]).mean() < 12

    capsys.readouterr()
    assert cli.main(["prepare", str(folder), str(out)]) == 2                 # not empty: refuse
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["prepare", str(folder), str(out), "--overwrite", "--stored-size", "12"]) == 0
    assert json.loads((out / "manifest.json").read_text())["size_policy"]["stored_size"] == 12


def test_carved_splits_of_shards_are_read_from_shards_of_their_own(folder, tmp_path):
    # Issue 13 item 6: a validation split carved from the training shards used to read every training
    # record each epoch. It is now copied once into the cache and read from there.
    out = tmp_path / "records"
    tfrecord.prepare(folder, out, stored_size=STORED, encoding="png", shard_size=4, verbose=False)
    cfg = paper(out, augment=False, val_fraction=0.2)
    data = load_data(cfg, CROP, 8, verbose=False)
    (subset,) = (tmp_path / "cache" / "records").iterdir()
    parts = sorted(subset.glob("part-*.tfrecord"))
    assert sum(1 for _ in tf.data.TFRecordDataset([str(p) for p in parts])) == data.counts["val"] == 4
    val = collect(data.val)

    manifest = json.loads((out / "manifest.json").read_text())
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    for shard in manifest["splits"]["train"]["shards"]:
        (out / shard["file"]).rename(hidden / shard["file"])
    again = collect(data.val)                      # no training shard is read for validation
    np.testing.assert_array_equal(again[0], val[0])
    np.testing.assert_array_equal(again[1], val[1])
    with pytest.raises(tf.errors.NotFoundError):
        collect(data.train)
    for shard in manifest["splits"]["train"]["shards"]:
        (hidden / shard["file"]).rename(out / shard["file"])

    # A second load (another process, another run of a study) reuses the copy.
    assert load_data(cfg, CROP, 8, verbose=False).digest == data.digest
    assert list((tmp_path / "cache" / "records").iterdir()) == [subset]


def test_raw_shards_hold_the_pixels_and_load_like_the_folder(folder, tmp_path):
    out = tmp_path / "raw"
    tfrecord.prepare(folder, out, stored_size=STORED, encoding="raw", verbose=False)
    assert json.loads((out / "manifest.json").read_text())["size_policy"]["encoding"] == "raw"
    from_folder = load(paper(folder, augment=False))
    records = load_data(paper(out, augment=False), CROP, 8, verbose=False)   # the corrupt file was left out
    for a, b in ((from_folder.val, records.val), (from_folder.test, records.test)):
        (xa, ya), (xb, yb) = collect(a), collect(b)
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


def test_prepare_refuses_a_stored_size_beyond_the_bound_of_training(folder, tmp_path):
    with pytest.raises(ConfigError, match="stored_size.*32768"):
        tfrecord.prepare(folder, tmp_path / "records", stored_size=40000)
    assert not (tmp_path / "records").exists()


@pytest.mark.parametrize("where", ["file", "file/records"])
def test_prepare_to_a_file_or_under_one_is_refused_before_any_work(folder, tmp_path, capsys, where):
    (tmp_path / "file").write_text("notes")
    assert cli.main(["prepare", str(folder), str(tmp_path / where)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert f"the output folder {str(tmp_path / where)!r} cannot be made: {str(tmp_path / 'file')!r} is a file" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] and (tmp_path / "file").read_text() == "notes"
