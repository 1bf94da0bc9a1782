"""The files that wire the package to MLflow Projects and pip stay in step with the config."""

import re
import tomllib
from pathlib import Path

import yaml

from alexnet_keras.config import Config, leaf_fields, load_config

ROOT = Path(__file__).resolve().parent.parent
# The MLproject's `main` entry point is the main job: its defaults are this file's values.
MAIN_JOB = ROOT / "experiments" / "cifar10.yaml"


def _mlproject():
    return yaml.safe_load((ROOT / "MLproject").read_text())


def test_mlproject_main_params_are_config_leaves_with_the_main_job_defaults():
    main = _mlproject()["entry_points"]["main"]
    params = main["parameters"]
    leaves = leaf_fields()
    for required in ("lrn", "batchnorm", "dropout", "pool", "activation", "variant", "epochs", "batch_size",
                     "dataset", "data_dir", "seed"):
        assert required in params, required
    defaults = load_config(MAIN_JOB).flat()
    parsed = load_config(overrides={k: spec["default"] for k, spec in params.items()}).flat()
    for name in params:
        assert name in leaves, f"MLproject parameter {name!r} is not a config option"
        assert parsed[name] == defaults[name], f"MLproject default for {name!r} differs from {MAIN_JOB.name}"
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
