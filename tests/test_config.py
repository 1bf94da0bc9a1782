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


def test_digest_covers_what_changes_a_run():
    base = Config()
    # Tracking fields do not change what is trained: the same digest, so a rename or another
    # checkpoint folder still finds (and resumes or skips) the same run.
    assert base.override({"run_name": "x", "experiment": "e", "resume": False,
                          "checkpoint_dir": "/tmp/c"}).digest() == base.digest()
    assert base.override({"lrn": False}).digest() != base.digest()
    # train_eval_images at its default (0, off) is left out, so that digests from before it existed hold.
    flat = {k: v for k, v in base.flat().items() if k not in TOP_LEVEL and k != "train_eval_images"}
    import hashlib
    import json
    assert base.digest() == hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]
    assert base.override({"deterministic": True}).digest() != base.digest()
    assert base.override({"test_limit": 100}).digest() != base.digest()
    assert base.override({"train_eval_images": 100}).digest() != base.digest()


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


def test_other_options_parse_strings_the_config_way():
    """Flags outside the config tree (--max-trials, the benchmark's) parse as config values do."""
    from alexnet_keras import cli
    from alexnet_keras.training.benchmark import options_from_args

    def bench(*flags):
        return options_from_args(cli.build_parser().parse_args(["benchmark", *flags]))

    assert bench("--parts", "none").parts == () and bench("--parts", "").parts == ()
    assert bench("--steps", "3").steps == 3 and bench("--xla", "off").xla == (False,)
    with pytest.raises(ConfigError, match="`--steps` must be an integer; got .q."):
        bench("--steps", "q")


@pytest.mark.parametrize("overrides, fragment", [
    ({"dropout": 1.5}, "model.dropout must be in [0.0, 1.0); got 1.5"),
    ({"dropout": -0.1}, "model.dropout must be in"),
    ({"pool": "foo"}, "'overlapping', 'non_overlapping'; got 'foo'"),
    ({"activation": "gelu"}, "'relu', 'tanh', 'sigmoid'; got 'gelu'"),
    ({"dataset": "imagenet"}, "'cifar10', 'folder', 'synthetic'; got 'imagenet'"),
    ({"variant": "vgg"}, "'paper', 'cifar', 'cifar_convnet4'; got 'vgg'"),
    ({"lrn": "maybe"}, "model.lrn must be true or false; got 'maybe'"),
    ({"epochs": "ten"}, "train.epochs must be an integer; got 'ten'"),
    ({"epochs": 0}, "train.epochs must be a positive integer"),
    ({"epochs": True}, "train.epochs must be an integer; got True"),   # YAML `epochs: yes`
    ({"lrn_size": 4}, "positive odd integer"),
    ({"groups": 3}, "model.groups must be a positive integer (at most 2); got 3"),
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
    """`ablate` skips finished children and `tune` accepts its tuner state only while these hold: a
    change of the config's leaves or of the digests' recipe moves them (and orphans logged runs)."""
    import hashlib

    from alexnet_keras.experiments.study import load_study
    from alexnet_keras.experiments.sweep import load_sweep

    from pathlib import Path

    root = f"{Path(__file__).resolve().parent.parent}/experiments/"
    children = load_study(root + "ablation_cpu.yaml").children()   # docs/ablations.md, 33 runs
    combined = hashlib.sha256(",".join(sorted(c.digest for c in children)).encode()).hexdigest()[:16]
    assert combined == "2d845bc38eeb3e80"
    assert load_study(root + "ablation_plateau_cpu.yaml").digest() == "67a2629c1f649d30"   # docs/ablations.md
    assert load_sweep(root + "sweep.yaml").digest() == "908932c3c29eb859"   # docs/sweeps.md
    assert load_config(root + "cifar10.yaml").digest() == "5f2b6eda63c67e0f"


# --- Every user-given number is range-checked, sizes are checked against memory, YAML is bounded
# and UTF-8. Each case through the CLI: exit 2, one line on stderr, no traceback, no run. ----------

def _refused(store, capsys, args, *fragments):
    from conftest import all_runs

    from alexnet_keras import cli

    code = cli.main(["train", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err               # one clear line
    assert err.startswith("alexnet-keras train: error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert all_runs(store) == [], "a refused config must not leave a run behind"
    return err


def _tiny_flags(**changes):
    from conftest import TINY, cli_flags

    return cli_flags({**TINY, **changes})


SEED_RANGE = "must be an integer >= 0 (at most 4294967295)"


@pytest.mark.parametrize("flags, fragments", [
    (["--seed", "-1"], ["train.seed", SEED_RANGE, "got -1"]),
    (["--seed", str(2 ** 32)], ["train.seed", SEED_RANGE, "got 4294967296"]),
    (["--split-seed", "-1"], ["data.split_seed", SEED_RANGE, "got -1"]),
    (["--split-seed", str(2 ** 40)], ["data.split_seed", SEED_RANGE]),
    (["--epochs", "1000000"], ["train.epochs must be a positive integer (at most 100000)"]),
    (["--batch-size", str(2 ** 21)], ["train.batch_size must be a positive integer (at most 1048576)"]),
    (["--plateau-patience", "0"], ["train.plateau_patience must be a positive integer"]),
    (["--train-limit", "1"], ["data.train_limit must be an integer >= 2 (at most 2147483647); got 1"]),
    (["--test-limit", str(2 ** 31)], ["data.test_limit must be an integer >= 2 (at most 2147483647)"]),
    (["--synthetic-classes", "1001"], ["data.synthetic_classes must be an integer >= 2 (at most 1000)"]),
    (["--synthetic-samples", "8"], ["data.synthetic_samples must be an integer >= 16"]),
    (["--stored-size", "40000"], ["data.stored_size must be an integer >= 8 (at most 32768)"]),
    (["--max-memory-mb", "-1"], ["data.max_memory_mb must be an integer >= 0"]),
    (["--image-size", "40000"], ["model.image_size must be an integer >= 8 for variant 'cifar' (at most 32768)"]),
    (["--lrn-k", "0"], ["model.lrn_k must be in (0.0, 1000000.0]"]),
    (["--lrn-k", "inf"], ["model.lrn_k must be a finite number", "got inf"]),
    (["--lrn-alpha", "nan"], ["model.lrn_alpha must be a finite number; got nan"]),
    (["--lrn-beta", "11"], ["model.lrn_beta must be in [0.0, 10.0]"]),
    (["--lrn-size", "1025"], ["model.lrn_size must be a positive integer (at most 1023)"]),
    (["--input-norm", "whiten"], ["model.input_norm must be one of 'standardize', 'center'; got 'whiten'"]),
])
def test_numbers_out_of_range_are_refused_before_anything_runs(mlflow_store, capsys, flags, fragments):
    _refused(mlflow_store, capsys, [*_tiny_flags(), *flags], *fragments)


def test_synthetic_samples_that_would_exhaust_memory(mlflow_store, capsys):
    err = _refused(mlflow_store, capsys, _tiny_flags(synthetic_samples=100_000_000),
                   "this run would need about", "TiB of memory", "this machine has", "--synthetic-samples")
    # The estimate names the count that fits, and that count is accepted.
    fits = int(err.split("--synthetic-samples ")[1].split()[0])
    config = load_config(overrides={"variant": "cifar", "width": 0.125, "dataset": "synthetic",
                                    "synthetic_samples": fits, "synthetic_classes": 4, "batch_size": 32})
    assert config.data.synthetic_samples == fits


def test_image_size_that_would_exhaust_memory_is_refused_by_the_dry_run(mlflow_store, capsys):
    _refused(mlflow_store, capsys, ["--image-size", "20000", "--dry-run"],
             "this run would need about", "TiB of memory", "parameters", "--image-size")


def test_batch_size_beyond_memory_names_the_largest_that_fits(mlflow_store, capsys, monkeypatch):
    from alexnet_keras import config as config_module

    monkeypatch.setattr(config_module, "memory_bound", lambda: 2 ** 30)   # a 1 GiB machine
    err = _refused(mlflow_store, capsys, _tiny_flags(batch_size=4096), "1.0 GiB this machine has", "--batch-size")
    fits = int(err.split("--batch-size ")[1].split()[0])
    base = {"variant": "cifar", "width": 0.125, "dataset": "synthetic", "synthetic_samples": 128,
            "synthetic_classes": 4}
    assert config_module.memory_estimate(load_config(overrides={**base, "batch_size": fits})).total <= 2 ** 30
    with pytest.raises(ConfigError, match="would need about"):
        load_config(overrides={**base, "batch_size": fits + 1})


def test_memory_estimate_adds_up_weights_activations_and_images():
    from alexnet_keras.config import check_memory, memory_estimate

    config = load_config(overrides={"variant": "cifar", "width": 0.125, "dataset": "synthetic",
                                    "synthetic_samples": 1000, "synthetic_classes": 4, "batch_size": 32})
    estimate = memory_estimate(config)
    model = config.model
    assert estimate.parameters == model.parameter_count(4)
    assert estimate.weights == 3 * 4 * estimate.parameters                  # weights, gradients, momentum
    assert estimate.activations == 2 * 4 * 32 * model.activation_count(4)
    assert estimate.images == 16 * 1000 * 32 * 32 * 3                        # generator's peak
    assert estimate.total == estimate.weights + estimate.activations + estimate.images
    check_memory(config, bound=estimate.total)                              # fits exactly
    with pytest.raises(ConfigError, match="images"):
        check_memory(config, bound=estimate.total - 1)
    # The defaults (the paper's 227-px net, batch 128, CIFAR-10) pass on any machine that can train them.
    assert memory_estimate(Config()).total < 8 * 2 ** 30


# --- YAML files: bounded, UTF-8, plain data ---------------------------------------------------------

def test_config_that_is_a_folder(mlflow_store, capsys, tmp_path):
    _refused(mlflow_store, capsys, ["--config", str(tmp_path)], str(tmp_path), "is a folder, not a file")


def test_config_that_is_not_utf8(mlflow_store, capsys, tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("run_name: caf\xe9\n".encode("latin-1"))
    _refused(mlflow_store, capsys, ["--config", str(path)], str(path), "is not UTF-8 text",
             "byte 0xe9 at offset 13", "Save it as UTF-8")


def test_config_with_a_utf8_bom_is_read(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes("\ufeffrun_name: café\n".encode("utf-8"))
    assert load_config(path).run_name == "café"


def test_config_over_the_size_bound(mlflow_store, capsys, tmp_path):
    from alexnet_keras.config import YAML_MAX_BYTES

    path = tmp_path / "huge.yaml"
    path.write_text("epochs: 3\n# " + "x" * YAML_MAX_BYTES + "\n")
    _refused(mlflow_store, capsys, ["--config", str(path)], str(path), "is larger than 1024 KiB")


def _laughs(levels):
    """A 'billion laughs' file: each level is a list of ten aliases of the one before."""
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_config_with_an_alias_expansion_bomb(mlflow_store, capsys, tmp_path):
    path = tmp_path / "laughs.yaml"
    path.write_text(_laughs(9))            # 10^9 values once expanded, from a file of 500 bytes
    assert path.stat().st_size < 1000
    _refused(mlflow_store, capsys, ["--config", str(path)], "more than 100,000 values once its aliases")


def test_config_with_a_self_referencing_alias(mlflow_store, capsys, tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("model: &m {lrn: false, again: *m}\n")
    _refused(mlflow_store, capsys, ["--config", str(path)], "inside the value it names")


def test_config_nested_too_deeply(mlflow_store, capsys, tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("model: " + "[" * 20000 + "]" * 20000 + "\n")
    _refused(mlflow_store, capsys, ["--config", str(path)], "nested too deeply")


def test_config_that_is_a_fifo_is_refused_without_blocking(mlflow_store, capsys, tmp_path):
    import os

    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this system")
    path = tmp_path / "pipe.yaml"
    os.mkfifo(path)
    _refused(mlflow_store, capsys, ["--config", str(path)], "is not a regular file")


def test_config_cannot_run_code(mlflow_store, capsys, tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.yaml"
    path.write_text(f"run_name: !!python/object/apply:os.system ['touch {marker}']\n")
    _refused(mlflow_store, capsys, ["--config", str(path)], "is not valid YAML")
    assert not marker.exists()


def test_small_aliases_still_work(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text("model: &m {lrn: false, variant: cifar}\ntrain: {epochs: 2}\n")
    config = load_config(path)
    assert (config.model.lrn, config.model.variant, config.train.epochs) == (False, "cifar", 2)


def test_study_and_sweep_files_are_read_through_the_same_bounds(tmp_path):
    """ablate and tune read their files with config.load_yaml, so they refuse the same inputs."""
    from alexnet_keras.experiments.study import StudyError, load_study
    from alexnet_keras.experiments.sweep import load_sweep

    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: caf\xe9\n".encode("latin-1"))
    laughs = tmp_path / "laughs.yaml"
    laughs.write_text(_laughs(7))
    repeated = tmp_path / "repeated.yaml"
    repeated.write_text("name: a\nseeds: [0]\nname: b\n")
    for path, fragment in ((latin1, "is not UTF-8 text"), (laughs, "once its aliases"), (tmp_path, "is a folder"),
                           (repeated, "key 'name' twice in one mapping .again at line 3")):
        with pytest.raises(StudyError, match=fragment) as err:
            load_study(path)
        assert str(err.value).startswith("study file")
        with pytest.raises(ConfigError, match=fragment):
            load_sweep(path)


def test_input_norm_changes_the_digest_when_set():
    base = Config()
    assert base.override({"input_norm": "center"}).digest() != base.digest()
    assert base.override({"input_norm": "standardize"}).digest() == base.digest()
    config = load_config(overrides={"input_norm": "center", "init": "paper"})
    assert (config.model.input_norm, config.model.init) == ("center", "paper")
