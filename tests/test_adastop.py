"""Studies that add seeds in rounds (`rounds:` in a study file, AdaStop): the decision per round on fixed numbers,
the rounds `ablate` trains (a stand-in for training), and one tiny real study run twice (the second run trains
nothing and reaches the same decisions)."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import all_runs

from alexnet_keras import cli
from alexnet_keras.experiments import report
from alexnet_keras.experiments.study import StudyError, load_study
from alexnet_keras.tracking import CONFIG_DIGEST_TAG

ROOT = Path(__file__).resolve().parent.parent
# Seed-to-seed jitter of a test accuracy, fixed: 15 seeds = 5 per round for 3 rounds.
JITTER = [0.004, -0.007, 0.001, 0.009, -0.003, -0.006, 0.002, 0.008, -0.001, -0.009, 0.005, -0.004, 0.007, 0.0, -0.002]


def _arm(name, values, baseline=False):
    return report.VariantSummary(name, {}, baseline, {}, seeds=list(range(len(values))),
                                 values={"test_accuracy": list(values)})


ROUNDS = {"seeds_per_round": 5, "max_rounds": 3, "alpha": 0.05, "metric": "test_accuracy"}


def test_a_clear_difference_is_decided_in_the_first_round_and_no_difference_runs_to_the_last():
    baseline = _arm("baseline", [0.5 + j for j in JITTER], baseline=True)
    better = _arm("better", [0.8 + j for j in reversed(JITTER)])
    worse = _arm("worse", [0.2 + j for j in JITTER[3:] + JITTER[:3]])
    same = _arm("same", [0.5 + j for j in reversed(JITTER)])
    found = report.adastop_decisions({"rounds": ROUNDS}, [baseline, better, worse, same])
    assert [(r["variant"], r["decision"], r["rounds"], r["seeds"]) for r in found["comparisons"]] == [
        ("better", "larger", 1, 5), ("worse", "smaller", 1, 5), ("same", "equal", 3, 15)]
    assert found["rounds_done"] == 3 and found["stopped"] == "max_rounds 3 reached with 1 undecided (AdaStop: equal)"
    # Without the undecided arm, the study stops after round 1; the seeds the decided arms did not need are
    # not looked at (here: none were run).
    better.seeds, better.values["test_accuracy"] = better.seeds[:5], better.values["test_accuracy"][:5]
    assert report.adastop_decisions({"rounds": ROUNDS}, [baseline, better])["stopped"] == \
        "all comparisons decided at round 1"
    # An open arm whose round is incomplete (a failed or missing child): the replay stops before that round.
    same.seeds, same.values["test_accuracy"] = same.seeds[:12], same.values["test_accuracy"][:12]
    found = report.adastop_decisions({"rounds": ROUNDS}, [baseline, same])
    assert found["comparisons"][0]["decision"] == "not decided" and found["comparisons"][0]["rounds"] == 2
    assert found["stopped"] == "not finished: 2 of 3 rounds complete, 1 comparisons open"


def _study(tmp_path, **changes):
    spec = {"name": "rounds", "experiment": "rounds",
            "base": {"model": {"variant": "cifar", "width": 0.125, "init": "keras"},
                     "data": {"dataset": "synthetic", "synthetic_samples": 32, "synthetic_classes": 4},
                     "train": {"epochs": 1, "batch_size": 16, "schedule": "constant"}, "system_metrics": False},
            "axes": {"dropout": [0.5, 0.0]}, "rounds": {"seeds_per_round": 1, "max_rounds": 2}, **changes}
    path = tmp_path / "rounds.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in spec.items() if v is not None}, sort_keys=False))
    return path


def test_each_round_trains_the_baseline_and_the_open_arms_only(tmp_path, monkeypatch):
    """Round 1 decides `dropout=0.0` (far from the baseline); round 2 trains the baseline and the open arm. (Training
    and the store stand in: `_train_missing` records the children as runs, `child_runs` returns them.)"""
    from alexnet_keras.experiments import ablate

    study = load_study(_study(tmp_path, axes={"dropout": [0.5, 0.0, 0.25]},
                              rounds={"seeds_per_round": 5, "max_rounds": 2, "metric": "final_train_accuracy"}))
    finished, trained = [], []

    def train(study, children, result, uri, on_ray):
        for c in children:
            trained.append(c.label)
            accuracy = {0.5: 0.5, 0.0: 0.9, 0.25: 0.5}[c.config.model.dropout] + JITTER[c.seed]
            finished.append(SimpleNamespace(info=SimpleNamespace(run_id=c.label, status="FINISHED", end_time=1),
                                            data=SimpleNamespace(tags={CONFIG_DIGEST_TAG: c.digest},
                                                                 metrics={"final_train_accuracy": accuracy})))

    monkeypatch.setattr(ablate, "_train_missing", train)
    monkeypatch.setattr(ablate.tracking, "child_runs", lambda parent_run_id: finished)
    ablate._train_in_rounds(study, study.children(), ablate.StudyResult("parent"), "", None)
    assert trained == [f"{v} seed={s}" for s in range(5) for v in ("baseline", "dropout=0.0", "dropout=0.25")] + [
        f"{v} seed={s}" for s in range(5, 10) for v in ("baseline", "dropout=0.25")]
    assert ablate.child_tags(study, study.children()[-1])[ablate.ROUND_TAG] == "2"


def test_rounds_replace_seeds_and_are_validated(tmp_path, capsys):
    study = load_study(_study(tmp_path, rounds={"seeds_per_round": 2, "max_rounds": 3}))
    assert study.seeds == (0, 1, 2, 3, 4, 5) and study.runs == 12
    assert study.digest() != load_study(_study(tmp_path, rounds={"seeds_per_round": 2, "max_rounds": 3,
                                                                  "alpha": 0.01})).digest()
    for changes, fragment in [({"seeds": [0, 1]}, "`seeds`: cannot be listed with `rounds`"),
                              ({"rounds": {"seeds_per_round": 0, "max_rounds": 2}}, "`rounds.seeds_per_round`"),
                              ({"rounds": {"seeds_per_round": 2, "max_rounds": 2, "alpha": 1.5}}, "`rounds.alpha`"),
                              ({"rounds": {"seeds_per_round": 2, "max_rounds": 2, "metric": "val_loss"}},
                               "`rounds.metric` must be one of"),
                              ({"rounds": None}, "`seeds` is missing"),
                              ({"axes": {"dropout": [0.5]}}, "it needs a variant besides the baseline"),
                              ({"nuisance_grid": {"learning_rate": [0.01, 0.02]}}, "and no `nuisance_grid`")]:
        with pytest.raises(StudyError, match="rounds.yaml: .*" + fragment.replace(".", r"\.")):
            load_study(_study(tmp_path, **changes))


def test_a_real_study_in_two_rounds_resumes_without_training_again(tmp_path, mlflow_store, monkeypatch):
    path = _study(tmp_path)
    assert cli.main(["ablate", str(path)]) == 0
    children = [r for r in all_runs(mlflow_store) if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.info.run_name for r in children) == ["baseline seed=0", "baseline seed=1", "dropout=0.0 seed=0",
                                                         "dropout=0.0 seed=1"]
    assert {r.data.tags["alexnet_keras.study_round"] for r in children} == {"1", "2"}
    (parent_id,) = {r.data.tags["mlflow.parentRunId"] for r in children}
    (saved,) = (Path(mlflow_store[len("sqlite:///"):]).parent / "mlruns").glob(f"*/{parent_id}/artifacts/reports")
    first = json.loads((saved / "adastop.json").read_text())
    # One seed per round cannot reject (2 permutations): the comparison runs to max_rounds and reads "equal".
    assert first["rounds_done"] == 2 and first["comparisons"][0]["decision"] == "equal"
    assert "| dropout=0.0 | equal | 2 | 2 |" in (saved / "ablation.md").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished child was trained again")

    monkeypatch.setattr("alexnet_keras.training.train.train_and_evaluate", no_training)
    assert cli.main(["ablate", str(path)]) == 0
    assert len([r for r in all_runs(mlflow_store) if "mlflow.parentRunId" in r.data.tags]) == 4
    assert json.loads((saved / "adastop.json").read_text()) == first
    assert "stopped with **max_rounds 2 reached with 1 undecided (AdaStop: equal)**" in (saved / "ablation.md").read_text()
