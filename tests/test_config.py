"""The config tree: parsing from strings/YAML, validation messages, and the CLI flags built from it."""

import dataclasses

import pytest

from alexnet_keras.config import (ACTIVATIONS, DATASETS, POOLS, TOP_LEVEL, Config, ConfigError, ModelConfig,
                                  from_dict, leaf_fields, load_config)


def test_defaults_are_the_papers():
    model = ModelConfig()
    assert (model.variant, model.lrn, model.batchnorm, model.dropout, model.pool, model.activation) == (
        "paper", True, False, 0.5, "overlapping", "relu")
    assert (model.lrn_size, model.lrn_alpha, model.lrn_beta, model.lrn_k) == (5, 1e-4, 0.75, 2.0)
    assert model.input_size == 227 and ModelConfig(variant="cifar").input_size == 32
    train = Config().train
    assert (train.learning_rate, train.momentum, train.schedule) == (0.01, 0.9, "plateau")
    assert model.weight_decay == 5e-4


def test_leaf_names_are_unique_and_cover_every_field():
    leaves = leaf_fields()
    expected = sum(len(dataclasses.fields(c)) for c in (Config().model, Config().data, Config().train)) + len(
        TOP_LEVEL)
    assert len(leaves) == expected
    assert set(Config().flat()) == set(leaves)


def test_digest_covers_what_changes_a_run_and_survives_fields_added_later():
    base = Config()
    # Tracking fields do not change what is trained: the same digest, so a rename or another
    # checkpoint folder still finds (and resumes or skips) the same run.
    assert base.override({"run_name": "x", "experiment": "e", "resume": False,
                          "checkpoint_dir": "/tmp/c"}).digest() == base.digest()
    assert base.override({"lrn": False}).digest() != base.digest()
    # Fields added after runs were logged leave the digest alone at their default...
    later = [name for name, (_, f) in leaf_fields().items() if f.metadata.get("digest") == "omit_default"]
    assert {"deterministic", "test_limit"} <= set(later)
    flat = {k: v for k, v in base.flat().items() if k not in (*TOP_LEVEL, *later)}
    import hashlib
    import json
    assert base.digest() == hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]
    # ...and change it when set.
    assert base.override({"deterministic": True}).digest() != base.digest()
    assert base.override({"test_limit": 100}).digest() != base.digest()


@pytest.mark.parametrize("raw, expected", [("false", False), ("False", False), ("0", False), ("no", False),
                                           ("true", True), ("TRUE", True), ("1", True), (True, True)])
def test_booleans_accept_true_false_strings(raw, expected):
    assert load_config(overrides={"lrn": raw}).model.lrn is expected


def test_strings_are_parsed_to_field_types():
    config = load_config(overrides={"dropout": "0.25", "epochs": "3", "data_dir": "", "train_limit": "none",
                                    "jit_compile": False})
    assert config.model.dropout == 0.25 and config.train.epochs == 3
    assert config.data.data_dir is None and config.data.train_limit is None
    assert config.train.jit_compile == "false"


@pytest.mark.parametrize("overrides, fragment", [
    ({"dropout": 1.5}, "model.dropout must be in [0.0, 1.0); got 1.5"),
    ({"dropout": -0.1}, "model.dropout must be in"),
    ({"pool": "foo"}, "'overlapping', 'non_overlapping'; got 'foo'"),
    ({"activation": "gelu"}, "'relu', 'tanh', 'sigmoid'; got 'gelu'"),
    ({"dataset": "imagenet"}, "'cifar10', 'folder', 'synthetic'; got 'imagenet'"),
    ({"variant": "vgg"}, "'paper', 'cifar'; got 'vgg'"),
    ({"lrn": "maybe"}, "model.lrn must be true or false; got 'maybe'"),
    ({"epochs": "ten"}, "train.epochs must be an integer; got 'ten'"),
    ({"epochs": 0}, "train.epochs must be a positive integer"),
    ({"lrn_size": 4}, "positive odd integer"),
    ({"groups": 3}, "model.groups must be one of 1, 2"),
    ({"learning_rate": 0}, "train.learning_rate must be in (0.0, 10.0]"),
    ({"dataset": "folder"}, "needs a folder: pass --data-dir"),
    ({"lrnn": True}, "unknown option 'lrnn'. Did you mean lrn"),
    ({"model.epochs": 3}, "unknown option 'model.epochs'"),
])
def test_bad_values_name_the_field_and_the_allowed_values(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    assert fragment in str(err.value)


def test_choice_constants_are_the_validated_ones():
    for name, choices in (("pool", POOLS), ("activation", ACTIVATIONS), ("dataset", DATASETS)):
        for value in choices:
            load_config(overrides={name: value, "data_dir": "x"})


def test_yaml_nested_and_flat_keys_then_flags(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  lrn: false\n  variant: cifar\ntrain:\n  epochs: 3\nbatch_size: 64\n")
    config = load_config(path, {"epochs": "5"})
    assert (config.model.lrn, config.model.variant, config.train.batch_size) == (False, "cifar", 64)
    assert config.train.epochs == 5  # flags win over the file


@pytest.mark.parametrize("text, fragment", [
    ("model: [1, 2\n", "is not valid YAML"),
    ("- a\n- b\n", "must hold a mapping"),
    ("model: 3\n", "'model' must be a mapping"),
    ("model:\n  pool: round\n", "got 'round'"),
    ("data:\n  lrn: true\n", "unknown option 'data.lrn'"),
])
def test_bad_yaml_files(tmp_path, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert fragment in str(err.value)


def test_missing_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_digest_ignores_naming_but_not_settings():
    base = Config()
    assert base.digest() == base.override({"run_name": "x", "experiment": "y"}).digest()
    assert base.digest() != base.override({"lrn": False}).digest()
    assert from_dict({"model": {"lrn": False}}).digest() == base.override({"lrn": "false"}).digest()


def test_shipped_experiment_files_are_valid():
    from pathlib import Path

    files = sorted((Path(__file__).parent.parent / "experiments").glob("*.yaml"))
    assert files, "experiments/ should ship YAML configs"
    for path in files:
        text = path.read_text()
        if "axes:" in text or "search_space:" in text:   # study / sweep files have their own loaders
            continue
        load_config(path)


def test_digests_of_the_logged_studies_and_sweep_do_not_move():
    """The real runs in docs/ were logged under these digests: `ablate` skips finished children and
    `tune` accepts its tuner state only while they hold. A new config field must keep them (declare it
    `metadata={"digest": "omit_default"}` with a default that changes nothing)."""
    import hashlib

    from alexnet_keras.ablate import load_study
    from alexnet_keras.tune import load_sweep

    from pathlib import Path

    root = f"{Path(__file__).resolve().parent.parent}/experiments/"
    children = load_study(root + "ablation_cpu.yaml").children()   # docs/ablations.md, 33 runs
    combined = hashlib.sha256(",".join(sorted(c.digest for c in children)).encode()).hexdigest()[:16]
    assert combined == "41995232fac5608d"
    assert load_sweep(root + "sweep.yaml").digest() == "5c11feec7c703dac"   # docs/sweeps.md
    assert load_config(root + "cifar10.yaml").digest() == "d77d64afba55c9d6"
