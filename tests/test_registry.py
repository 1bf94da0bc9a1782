"""The model registry wired into the commands, on a SQLite store: `train --register NAME` (then
`predict --model models:/NAME@champion`), `ablate --register` (the best variant, chosen on validation accuracy:
tests/test_ablate.py, on its smoke study's runs) and `tune --register` (the sweep's best model: tests/test_tune.py,
on its sweep); a bad name is refused before anything runs."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import COLOURS, TINY, cli_flags, colour_image, jpeg_bytes
from mlflow.tracking import MlflowClient

from alexnet_keras.experiments import ablate
from alexnet_keras import cli

ROOT = Path(__file__).resolve().parent.parent


def test_train_register_then_predict_by_alias(colour_model, tmp_path, monkeypatch, capsys):
    """`alexnet-keras train --register colours` (conftest's colour_model): version 1 of `colours`, alias
    champion, tagged with the run it came from; `predict` loads it by models:/colours@champion and tells
    the colours apart (test_serving serves the same registered model over HTTP)."""
    import mlflow
    import numpy as np

    uri, run, _ = colour_model
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    version = MlflowClient().get_model_version_by_alias("colours", "champion")
    assert int(version.version) == 1 and version.run_id == run.info.run_id
    assert version.tags["alexnet_keras.origin"] == "train"
    assert version.tags["alexnet_keras.run_name"] == run.info.run_name
    assert run.info.run_name.endswith("-" + run.data.tags["alexnet_keras.config_digest"][:6])
    # The run's description, its test accuracy and the run.
    assert version.description == (f"{run.data.tags['mlflow.note.content']}\n\ntest accuracy 1; run "
                                   f"{run.info.run_id} ({run.info.run_name}) in experiment {run.info.experiment_id}.")
    assert MlflowClient().get_registered_model("colours").aliases == {"champion": 1}

    rng = np.random.default_rng(7)
    files = {}
    for name, colour in COLOURS.items():
        files[name] = tmp_path / f"{name}.jpg"
        files[name].write_bytes(jpeg_bytes(colour_image(rng, colour, (40, 28))))
    names = sorted(COLOURS)
    assert cli.main(["predict", "--model", "models:/colours@champion", *[str(files[n]) for n in names],
                     "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert [r["predictions"][0]["class"] for r in results] == names


def test_bad_registered_model_name_is_refused_before_anything_runs(untouched_store, tmp_path, capsys):
    assert cli.main(["train", *cli_flags(TINY), "--register", "team/alexnet"]) == 2
    err = capsys.readouterr().err
    assert "registered model name 'team/alexnet'" in err and "Traceback" not in err
    study = tmp_path / "study.yaml"
    study.write_text((ROOT / "experiments" / "smoke.yaml").read_text())
    assert cli.main(["ablate", str(study), "--register", "a@b"]) == 2
    assert "registered model name 'a@b'" in capsys.readouterr().err
    sweep = yaml.safe_load((ROOT / "experiments" / "sweep_smoke.yaml").read_text())
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({**sweep, "final_model": "none"}))
    assert cli.main(["tune", str(tmp_path / "sweep.yaml"), "--register", "sweep-best"]) == 2
    assert "--register needs the sweep's model" in capsys.readouterr().err
    assert not untouched_store.exists()   # no run, and not even the store


def _variant(name, finals):
    """A report's VariantSummary-like record: one run per final validation accuracy."""
    return SimpleNamespace(name=name, run_ids=[f"{name}-{i}" for i in range(len(finals))],
                           seeds=list(range(len(finals))), val_histories=[[0.1, v] for v in finals])


def test_champion_is_the_best_mean_validation_variant_then_its_best_run():
    # b has the single best run (0.9), but a has the better mean (0.7 against 0.55): a wins, with its
    # own best run. Test accuracy plays no part (the record has none).
    report = SimpleNamespace(variants=[_variant("baseline", [0.5, 0.52]), _variant("a", [0.6, 0.8]),
                                       _variant("b", [0.9, 0.2]), _variant("never-finished", [])])
    variant, run_id, mean, value = ablate.champion(report)
    assert (variant.name, run_id, value) == ("a", "a-1", 0.8) and mean == pytest.approx(0.7)
    tie = SimpleNamespace(variants=[_variant("first", [0.5]), _variant("second", [0.5])])
    assert ablate.champion(tie)[0].name == "first"     # ties: the study's order
    assert ablate.champion(SimpleNamespace(variants=[_variant("x", [])])) is None


@pytest.mark.parametrize("name, char", [("bad\nname", "'\\n'"), ("best?run", "'?'"), ("tab\there", "'\\t'")])
def test_a_name_no_models_uri_can_load_is_refused_naming_the_character(untouched_store, capsys, name, char):
    assert cli.main(["train", *cli_flags(TINY), "--register", name]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert f"registered model name {name!r} contains {char}" in line and "e.g. alexnet-cifar10" in line
    assert not untouched_store.exists()
