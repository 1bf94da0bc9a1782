"""The files that wire the package to MLflow Projects and pip stay in step with the config."""

import re
import tomllib
from pathlib import Path

import yaml

from alexnet_keras.config import MAIN_JOB, Config, leaf_fields, load_config

ROOT = Path(__file__).resolve().parent.parent


def _mlproject():
    return yaml.safe_load((ROOT / "MLproject").read_text())


def test_mlproject_main_params_are_config_leaves_with_the_main_job_defaults():
    main = _mlproject()["entry_points"]["main"]
    params = main["parameters"]
    leaves = leaf_fields()
    for required in ("lrn", "batchnorm", "dropout", "pool", "activation", "variant", "epochs", "batch_size",
                     "dataset", "data_dir", "seed"):
        assert required in params, required
    defaults = MAIN_JOB.flat()
    parsed = load_config(overrides={k: spec["default"] for k, spec in params.items()}).flat()
    for name in params:
        assert name in leaves, f"MLproject parameter {name!r} is not a config option"
        assert parsed[name] == defaults[name], f"MLproject default for {name!r} differs from the main job"
        assert f"--{name.replace('_', '-')} {{{name}}}" in main["command"], name


def test_mlproject_booleans_are_strings():
    # MLflow Projects have no boolean type (mlflow#1945): they are strings parsed by the program.
    bools = [name for name, (_, f) in leaf_fields().items() if f.annotation is bool]
    for name, spec in _mlproject()["entry_points"]["main"]["parameters"].items():
        if name in bools:
            assert spec["type"] == "string" and spec["default"] in ("true", "false"), name


def test_python_env_lists_the_package_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "python_env.yaml").read_text())
    assert sorted(env["dependencies"]) == sorted(re.sub(r"\s*#.*", "", d) for d in project["dependencies"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", env["python"]), "pyenv needs an exact version to work offline"


def test_config_defaults_are_documented_in_cli_help(capsys):
    import pytest

    from alexnet_keras import cli

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    for name in Config().flat():
        assert f"--{name.replace('_', '-')}" in out


def test_the_main_job_is_experiments_cifar10_yaml():
    assert load_config(ROOT / "experiments" / "cifar10.yaml") == MAIN_JOB


def test_mlflow_logs_every_mlproject_default_as_written():
    """MLflow logs parameters shell-quoted (mlflow/projects/utils.py): an empty default would be logged as ''."""
    from mlflow.utils.string_utils import quote

    for name, entry in _mlproject()["entry_points"].items():
        for param, spec in entry["parameters"].items():
            assert quote(str(spec["default"])) == str(spec["default"]), (name, param)


def test_train_help_shows_each_option_with_its_description_choices_and_the_main_job_default(capsys):
    import pytest

    from alexnet_keras import cli

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for group in ("model options:", "data options:", "train options:", "tracking options:"):
        assert group in out
    assert ("--variant {paper,cifar,cifar_convnet4} paper: the 227-px ImageNet net; cifar: for 32 px; cifar_convnet4: "
            "the paper's four-layer CIFAR-10 net, 24 px (default: cifar)") in out
    assert "--lrn [{true,false}] local response normalization after conv1 and conv2 (default: true)" in out
    assert "--schedule {plateau,cosine,step,constant}" in out and "(default: cosine)" in out
    assert "--data-dir DATA_DIR" in out and "--epochs N passes over the training set (default: 30)" in out


def test_train_without_config_is_the_main_job(capsys):
    import json

    from alexnet_keras import cli

    assert cli.main(["train", "--dry-run", "--width", "0.125"]) == 0
    text = capsys.readouterr().out
    printed = json.loads(text[: text.index("\n}\n") + 2])
    assert printed == MAIN_JOB.override({"width": 0.125}).to_dict()
    assert printed["model"]["variant"] == "cifar" and printed["train"]["schedule"] == "cosine"
    assert text.count("Total params") == 1   # Keras' summary, once


def test_a_typod_mlflow_run_parameter_is_refused_in_one_line(mlflow_store, monkeypatch, capfd):
    """`mlflow run . -P lrm=false`: MLflow makes a run, logs the -P values and appends `--lrm false` to the
    command, which refuses it in one line. The run stays FAILED: MLflow sets that status after any exit
    status but 0 (and crashes on a run the command deleted), whatever status the command gave it."""
    import os
    import sys

    import mlflow
    import pytest
    from conftest import all_runs

    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    with pytest.raises(mlflow.exceptions.ExecutionException):
        mlflow.projects.run(str(ROOT), parameters={"lrm": "false"}, env_manager="local", experiment_name="typo")
    err = capfd.readouterr().err
    assert "alexnet-keras train: error: unrecognized arguments: --lrm false. Did you mean --lrn?" in err
    assert "Traceback" not in err, err[-3000:]
    (run,) = all_runs(mlflow_store)
    assert run.info.status == "FAILED" and not run.data.metrics
    assert run.data.params["data_dir"] == run.data.params["train_limit"] == "none"
