"""Ablation studies end to end: experiments/smoke.yaml into temporary stores (trained for real, two at a
time on a local Ray cluster, under a simulated `mlflow run`, then resumed in-process; sequential, failing
and interrupted studies with a stand-in for training), the report against the children's metrics, bad study files,
and the Welch statistics."""

import csv
import importlib.util
import io
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import all_runs, copy_store, point_at
from mlflow.tracking import MlflowClient
from mlflow.utils.file_utils import local_file_uri_to_path

from alexnet_keras import cli, tracking
from alexnet_keras.experiments.study import StudyError, load_study
from alexnet_keras.experiments.report import METRICS
from alexnet_keras.experiments.stats import welch

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "experiments" / "smoke.yaml"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, store_template):
    """`mlflow run . -e ablate -P config=experiments/smoke.yaml -P parallel=2`, simulated in-process:
    MLflow has created a run, logged the entry point's parameters and exported MLFLOW_RUN_ID and
    MLFLOW_EXPERIMENT_ID. That run must become the parent, and the children, trained for real as jobs
    of a local Ray cluster, two at a time, must not resume it; `--register study-best` then registers the champion.
    Shared by the tests below (training is the slow part)."""
    folder = tmp_path_factory.mktemp("smoke")
    uri = copy_store(store_template, folder)
    with pytest.MonkeyPatch.context() as mp:
        point_at(mp, folder, uri)
        client = MlflowClient(uri)
        # As with `--experiment-name alexnet-keras-smoke`, the study's own experiment, so that a later
        # `alexnet-keras ablate experiments/smoke.yaml` finds this parent again.
        experiment_id = client.create_experiment("alexnet-keras-smoke")
        launched = client.create_run(experiment_id).info.run_id
        client.log_param(launched, "config", str(SMOKE))
        parallel = "1" if importlib.util.find_spec("ray") is None else "2"   # Ray: an optional extra
        client.log_param(launched, "parallel", parallel)
        mp.setenv("MLFLOW_RUN_ID", launched)
        mp.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
        assert cli.main(["ablate", str(SMOKE), "--parallel", parallel, "--register", "study-best"]) == 0
        assert "MLFLOW_RUN_ID" not in os.environ
    return folder, uri, launched


@pytest.fixture
def in_smoke_store(smoke, monkeypatch):
    folder, uri, _ = smoke
    point_at(monkeypatch, folder, uri)
    return uri


def _split(runs):
    parents = [r for r in runs if r.data.tags.get("alexnet_keras.study_role") == "parent"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def _child_key(run):
    tags = run.data.tags
    return tags["alexnet_keras.variant_name"], int(run.data.params["seed"]), tags["alexnet_keras.config_digest"]


def _expected_children():
    study = load_study(SMOKE)
    return {(c.variant.name, c.seed, c.digest) for c in study.children()}


def _artifact_dir(run):
    return Path(local_file_uri_to_path(run.info.artifact_uri))


# --- one study, in two processes under `mlflow run` ----------------------------------------------------

def test_one_parent_with_a_child_per_variant_and_seed(smoke):
    _, uri, launched = smoke
    parents, children = _split(all_runs(uri))
    assert len(parents) == 1 and len(all_runs(uri)) == 1 + len(children)
    parent = parents[0]
    assert parent.info.run_id == launched                       # the run `mlflow run` made
    assert parent.info.status == "FINISHED" and parent.info.run_name == "smoke"
    assert parent.data.tags["alexnet_keras.study"] == "smoke"
    assert parent.data.params["axes"] == "normalization,dropout"
    study = load_study(SMOKE)
    assert len(children) == len(study.variants) * len(study.seeds) == 6
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert {_child_key(r) for r in children} == _expected_children()
    assert {r.data.tags["alexnet_keras.variant_name"] for r in children} == {
        "baseline", "normalization=none", "dropout=0.0"}
    for run in children:
        tags = run.data.tags
        assert run.info.status == "FINISHED"
        assert tags["alexnet_keras.study"] == "smoke" and tags["alexnet_keras.study_role"] == "child"
        assert tags["alexnet_keras.study_digest"] == parent.data.tags["alexnet_keras.study_digest"]
        assert run.info.experiment_id == parent.info.experiment_id
        assert run.info.run_name == f"{tags['alexnet_keras.variant_name']} seed={run.data.params['seed']}"
        # Each child is a full training run: same params, metrics and artifacts as `train`.
        assert {"test_accuracy", "test_top5_accuracy", "final_train_accuracy", "train_time_s",
                "num_params"} <= set(run.data.metrics)
        factors = {"normalization": tags["alexnet_keras.factor.normalization"],
                   "dropout": tags["alexnet_keras.factor.dropout"]}
        expected_lrn = "false" if factors["normalization"] == "none" else "true"
        assert run.data.params["lrn"] == expected_lrn and run.data.params["batchnorm"] == "false"
        assert float(run.data.params["dropout"]) == float(factors["dropout"])
        assert tags["alexnet_keras.is_baseline"] == str(factors == {"normalization": "lrn",
                                                                    "dropout": "0.5"}).lower()
        # Only the named factors and the seed differ: the data split, epochs and budget are shared.
        assert run.data.params["split_seed"] == "0" and run.data.params["epochs"] == "1"
        assert run.data.params["synthetic_samples"] == "128"
    assert len({r.data.tags["alexnet_keras.data_digest"] for r in children}) == 1


def test_table_numbers_are_the_childrens_metrics(smoke):
    from scipy import stats

    _, uri, _ = smoke
    parents, children = _split(all_runs(uri))
    table = (_artifact_dir(parents[0]) / "reports" / "ablation.csv").read_text()
    rows = {row["variant"]: row for row in csv.DictReader(io.StringIO(table))}
    assert set(rows) == {"baseline", "normalization=none", "dropout=0.0"}
    values = {}
    for name in rows:
        mine = [r for r in children if r.data.tags["alexnet_keras.variant_name"] == name]
        values[name] = {m: [r.data.metrics[m] for r in mine] for m, _, _ in METRICS}
        assert int(rows[name]["n_seeds"]) == len(mine) == 2
        assert int(rows[name]["num_params"]) == int(mine[0].data.metrics["num_params"])
        for metric, _, _ in METRICS:
            assert float(rows[name][f"{metric}_mean"]) == pytest.approx(np.mean(values[name][metric]))
            assert float(rows[name][f"{metric}_std"]) == pytest.approx(np.std(values[name][metric], ddof=1))
    base = values["baseline"]["test_accuracy"]
    for name in ("normalization=none", "dropout=0.0"):
        other = values[name]["test_accuracy"]
        assert float(rows[name]["delta_test_accuracy"]) == pytest.approx(np.mean(other) - np.mean(base))
        expected = stats.ttest_ind(other, base, equal_var=False)
        if np.isfinite(expected.pvalue):
            assert float(rows[name]["p_value"]) == pytest.approx(expected.pvalue)
            ci = expected.confidence_interval(0.95)
            assert float(rows[name]["delta_ci_low"]) == pytest.approx(ci.low)
            assert float(rows[name]["delta_ci_high"]) == pytest.approx(ci.high)
    markdown = (_artifact_dir(parents[0]) / "reports" / "ablation.md").read_text()
    assert "| **baseline** | 2 |" in markdown and "95% CI" in markdown
    note = parents[0].data.tags["mlflow.note.content"]   # the run page's description: the outcome, where the report is
    assert "6/6 runs finished" in note and "Full report: Artifacts → reports/ablation.md" in note and "|" not in note
    per_run = list(csv.DictReader(io.StringIO((_artifact_dir(parents[0]) / "reports" /
                                               "ablation_runs.csv").read_text())))
    assert {r["run_id"] for r in per_run} == {r.info.run_id for r in children}


def test_figures_are_pngs_on_the_parent(smoke):
    _, uri, _ = smoke
    (parent,), _ = _split(all_runs(uri))
    listing = {f.path for f in MlflowClient(uri).list_artifacts(parent.info.run_id, "figures")}
    assert listing == {"figures/ablation_test_accuracy.png", "figures/ablation_val_accuracy.png"}
    for path in listing:
        data = (_artifact_dir(parent) / path).read_bytes()
        assert data[:8] == PNG and len(data) > 5000
    assert {"study/study.json", "study/smoke.yaml"} <= {
        f.path for f in MlflowClient(uri).list_artifacts(parent.info.run_id, "study")}


def test_ablate_register_registers_the_best_variant_on_validation(in_smoke_store):
    """`ablate --register` (moved from test_registry, on this module's smoke study: its training is shared): the
    variant with the best mean validation accuracy, in the study's order on ties, and that variant's best run."""
    runs = all_runs(in_smoke_store)
    (parent,) = [r for r in runs if r.data.tags.get(tracking.ROLE_TAG) == "parent"]
    children = [r for r in runs if r.data.tags.get(tracking.ROLE_TAG) == "child"]
    assert len(children) == 6
    by_variant = {}
    for child in children:
        by_variant.setdefault(child.data.tags[tracking.VARIANT_TAG], []).append(child)
    means = {name: sum(c.data.metrics["val_accuracy"] for c in group) / len(group)
             for name, group in by_variant.items()}
    order = [v.name for v in load_study(SMOKE).variants]
    assert set(means) == set(order) == {"baseline", "normalization=none", "dropout=0.0"}
    best = max(order, key=lambda name: means[name])   # the study's order on ties
    best_run = max(by_variant[best], key=lambda c: c.data.metrics["val_accuracy"])

    version = MlflowClient().get_model_version_by_alias("study-best", "champion")
    assert version.run_id in {c.info.run_id for c in by_variant[best]}
    assert MlflowClient().get_run(version.run_id).data.metrics["val_accuracy"] == \
        best_run.data.metrics["val_accuracy"]
    tags = version.tags
    assert tags["alexnet_keras.origin"] == "study" and tags[tracking.STUDY_TAG] == "smoke"
    assert tags[tracking.PARENT_RUN_TAG] == parent.info.run_id and tags[tracking.VARIANT_TAG] == best
    assert tags[tracking.SELECTION_METRIC_TAG] == "mean val_accuracy of the variant"
    assert float(tags[tracking.SELECTION_VALUE_TAG]) == pytest.approx(means[best], abs=1e-5)
    # Parents and children are named and described.
    assert parent.info.run_name == "smoke"
    for child in children:
        note = child.data.tags["mlflow.note.content"]
        assert "ablation study 'smoke'" in note and f"variant {child.data.tags[tracking.VARIANT_TAG]!r}" in note


def test_report_command_rebuilds_the_report_from_the_store(in_smoke_store, capsys):
    (parent,), _ = _split(all_runs(in_smoke_store))
    before = (_artifact_dir(parent) / "reports" / "ablation.csv").read_text()
    for folder in ("reports", "figures"):
        shutil.rmtree(_artifact_dir(parent) / folder)
    capsys.readouterr()
    assert cli.main(["report", parent.info.run_id]) == 0
    assert "| **baseline** |" in capsys.readouterr().out
    assert (_artifact_dir(parent) / "reports" / "ablation.csv").read_text() == before
    assert (_artifact_dir(parent) / "figures" / "ablation_test_accuracy.png").read_bytes()[:8] == PNG


def test_report_of_a_run_that_is_not_a_study_is_a_clear_error(in_smoke_store, capsys):
    _, children = _split(all_runs(in_smoke_store))
    assert cli.main(["report", children[0].info.run_id]) == 2
    assert "not the parent run of an ablation study" in capsys.readouterr().err


def test_rerun_resumes_the_same_parent_skipping_finished_children(in_smoke_store):
    # `alexnet-keras ablate` (no `mlflow run`) finds the parent by its study name and digest tags.
    (parent,), children = _split(all_runs(in_smoke_store))
    assert cli.main(["ablate", str(SMOKE)]) == 0                     # all finished: nothing to train
    parents, again = _split(all_runs(in_smoke_store))
    assert [p.info.run_id for p in parents] == [parent.info.run_id]
    assert {r.info.run_id for r in again} == {r.info.run_id for r in children}

    # A child that failed (or was killed) is trained again, under the same parent; nothing else is.
    # This one trains for real in this process, nested under the parent that is active here.
    failed = next(r for r in children if r.data.tags["alexnet_keras.variant_name"] == "normalization=none")
    MlflowClient().set_terminated(failed.info.run_id, "FAILED")
    assert cli.main(["ablate", str(SMOKE)]) == 0
    parents, after = _split(all_runs(in_smoke_store))
    assert [p.info.run_id for p in parents] == [parent.info.run_id]
    assert parents[0].info.status == "FINISHED"
    new = [r for r in after if r.info.run_id not in {c.info.run_id for c in children}]
    assert len(new) == 1 and _child_key(new[0]) == _child_key(failed)
    assert new[0].info.status == "FINISHED"
    finished = [r for r in after if r.info.status == "FINISHED"]
    assert {_child_key(r) for r in finished} == _expected_children() and len(finished) == 6
    # The report uses the finished re-run, not the failed one.
    per_run = (_artifact_dir(parents[0]) / "reports" / "ablation_runs.csv").read_text()
    assert new[0].info.run_id in per_run and failed.info.run_id not in per_run


# --- failures and interruptions (a stand-in for training: real runs, no Keras) --------------------------

def _fake_training(monkeypatch, accuracy=None, *, fail=(), diverge=(), interrupt=()):
    """Replace train_and_evaluate by real runs that log made-up metrics. `accuracy(config)` gives the
    (validation, test, final training) accuracy, by default `lrn_accuracy`; validation climbs to its value
    over two epochs (the last one counts). `interrupt` / `diverge` / `fail` name children (by run name) that
    raise KeyboardInterrupt / FloatingPointError (a divergence) / RuntimeError."""
    from types import SimpleNamespace

    from alexnet_keras import tracking

    calls = []

    def fake(config, *, tags=None, parent_run_id=None):
        name = config.run_name
        calls.append(name)
        val, test, train_accuracy = (accuracy or lrn_accuracy)(config)
        with tracking.run(config.experiment, run_name=name, params=config.flat(),
                          tags={**tags, "alexnet_keras.config_digest": config.digest()},
                          parent_run_id=parent_run_id) as active:
            if name in interrupt:
                raise KeyboardInterrupt
            if name in diverge:
                raise FloatingPointError(f"training diverged (loss nan) at epoch 1 ({name})")
            if name in fail:
                raise RuntimeError(f"out of disk ({name})")
            tracking.log_metrics({"test_accuracy": test, "test_top5_accuracy": 1.0,
                                  "final_train_accuracy": train_accuracy, "train_time_s": 1.0, "num_params": 100})
            for epoch in range(2):
                tracking.log_metrics({"val_accuracy": val * (epoch + 1) / 2}, step=epoch)
        return SimpleNamespace(run_id=active.info.run_id, metrics={}, history={})

    monkeypatch.setattr("alexnet_keras.training.train.train_and_evaluate", fake)
    return calls


def lrn_accuracy(config):
    """0.5, plus 0.01 per seed, plus 0.1 with LRN: validation, test and training accuracy alike."""
    acc = 0.5 + 0.01 * config.train.seed + 0.1 * config.model.lrn
    return acc, acc, acc


def test_sequential_makes_the_same_children_as_parallel(mlflow_store, monkeypatch, smoke):
    uri = mlflow_store
    calls = _fake_training(monkeypatch)
    assert cli.main(["ablate", str(SMOKE)]) == 0
    # One after another, whole replicates (seeds) first.
    assert calls == [f"{v} seed={s}" for s in (0, 1) for v in ("baseline", "normalization=none", "dropout=0.0")]
    (parent,), children = _split(all_runs(uri))
    assert parent.info.status == "FINISHED" and parent.data.tags["alexnet_keras.study"] == "smoke"
    _, in_parallel = _split(all_runs(smoke[1]))
    assert {_child_key(r) for r in children} == {_child_key(r) for r in in_parallel
                                                 if r.info.status == "FINISHED"} == _expected_children()


def test_failed_children_leave_the_parent_failed_and_are_retried(mlflow_store, monkeypatch, capsys):
    uri = mlflow_store
    calls = _fake_training(monkeypatch, diverge={"dropout=0.0 seed=0", "dropout=0.0 seed=1"})
    assert cli.main(["ablate", str(SMOKE)]) == 1          # the others still ran
    assert "2 of 6 children failed" in capsys.readouterr().err and len(calls) == 6
    (parent,), children = _split(all_runs(uri))
    assert parent.info.status == "FAILED" and "dropout=0.0 seed=1" in parent.data.tags["error"]
    assert sorted(r.info.status for r in children) == ["FAILED"] * 2 + ["FINISHED"] * 4
    rows = {r["variant"]: r for r in csv.DictReader(io.StringIO(
        (_artifact_dir(parent) / "reports" / "ablation.csv").read_text()))}
    assert (rows["dropout=0.0"]["n_seeds"], rows["dropout=0.0"]["n_failed"]) == ("0", "2")
    assert "(2 failed)" in (_artifact_dir(parent) / "reports" / "ablation.md").read_text()

    calls = _fake_training(monkeypatch)
    assert cli.main(["ablate", str(SMOKE)]) == 0
    assert sorted(calls) == ["dropout=0.0 seed=0", "dropout=0.0 seed=1"]
    (again,), children = _split(all_runs(uri))
    assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED"
    assert sorted(r.info.status for r in children) == ["FAILED"] * 2 + ["FINISHED"] * 6


def test_interrupt_loses_only_the_child_in_flight(mlflow_store, monkeypatch):
    uri = mlflow_store
    calls = _fake_training(monkeypatch, interrupt={"normalization=none seed=0"})   # the second child
    assert cli.main(["ablate", str(SMOKE)]) == 130
    (parent,), children = _split(all_runs(uri))
    assert parent.info.status == "KILLED" and len(calls) == 2
    assert {r.info.run_name: r.info.status for r in children} == {
        "baseline seed=0": "FINISHED", "normalization=none seed=0": "KILLED"}
    # A child left RUNNING by a hard kill (SIGKILL, power cut) is marked KILLED and trained again.
    client = MlflowClient(uri)
    stale_child = next(c for c in load_study(SMOKE).children() if c.label == "dropout=0.0 seed=0")
    stale = client.create_run(parent.info.experiment_id, run_name="dropout=0.0 seed=0", tags={
        "mlflow.parentRunId": parent.info.run_id, "alexnet_keras.config_digest": stale_child.digest}).info.run_id

    calls = _fake_training(monkeypatch)
    assert cli.main(["ablate", str(SMOKE)]) == 0
    assert "baseline seed=0" not in calls and len(calls) == 5
    (again,), children = _split(all_runs(uri))
    assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED"
    assert client.get_run(stale).info.status == "KILLED"
    assert {_child_key(r) for r in children if r.info.status == "FINISHED"} == _expected_children()


# --- bad study files fail before any run ------------------------------------------------------------------

GOOD = yaml.safe_load(SMOKE.read_text())


def _bad(**changes):
    study = {**GOOD, **changes}
    return {k: v for k, v in study.items() if v is not None}


@pytest.mark.parametrize("study, fragment", [
    (_bad(axes={"lrnn": [True, False]}), "unknown option 'lrnn'. Did you mean lrn"),
    (_bad(axes={"pool": ["overlapping", "foo"]}), "must be one of 'overlapping', 'non_overlapping'; got 'foo'"),
    (_bad(axes={"dropout": [0.5, 1.5]}), "axis 'dropout'"),
    (_bad(axes={"normalization": {"none": {"lrn": False, "batchnorm": "maybe"}}}), "batchnorm must be true or false"),
    (_bad(axes={"normalization": {"none": {"lrn": False}, "bn": {"lrn": False, "batchnorm": True}}}),
     "every value must set the same options"),
    (_bad(axes={"lrn": [True, False], "normalization": {"none": {"lrn": False, "batchnorm": False}}}),
     "both set 'lrn'"),
    (_bad(axes={"seed": [0, 1]}), "use `seeds:`"),
    (_bad(axes={}), "`axes` must not be empty"),
    (_bad(seeds=None), "`seeds` is missing"),
    (_bad(seeds=[]), "`seeds` must not be empty"),
    (_bad(seeds=["zero"]), "`seeds.0` must be an integer; got 'zero'"),
    (_bad(design="random"), "`design` must be one of"),
    (_bad(base={"dropuot": 0.5}), "unknown option 'dropuot'"),
    (_bad(baseline={"dropout": 0.3}), "baseline dropout='0.3' is not one of its values"),
    (_bad(axis={"lrn": [True]}), "unknown key 'axis'. Did you mean axes?"),
    (_bad(base_config="nowhere.yaml"), "base_config 'nowhere.yaml' not found (looked at"),
    (_bad(base={"dropout": 1.5}), "base: model.dropout must be in [0.0, 1.0)"),
    (_bad(description=["a", "list"]), "`description` must be a string"),
    (_bad(axes={"dropout": [0.5, 0.0, 0]}), "are the same configuration"),
])
def test_bad_study_fails_before_any_run(tmp_path, untouched_store, capsys, study, fragment):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    assert cli.main(["ablate", str(path)]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err and str(path) in err
    assert not untouched_store.exists()   # not even the store was opened


@pytest.mark.parametrize("text, fragment", [
    ("axes: [lrn\nseeds: {", "is not valid YAML"),
    ("- just\n- a list\n", "must hold a mapping"),
])
def test_malformed_study_file(tmp_path, untouched_store, capsys, text, fragment):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    assert cli.main(["ablate", str(path)]) == 2
    err = capsys.readouterr().err
    assert fragment in err and f"study file {str(path)!r}" in err
    assert not untouched_store.exists()


def test_missing_study_file(tmp_path, untouched_store, capsys):
    assert cli.main(["ablate", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not untouched_store.exists()


def test_dry_run_lists_variants_without_a_store(tmp_path, untouched_store, capsys):
    assert cli.main(["ablate", str(ROOT / "experiments" / "ablation.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "11 variants x 3 seeds = 33 runs" in out and "normalization=batchnorm" in out
    assert not untouched_store.exists()


# --- the study file format ----------------------------------------------------------------------------

def test_shipped_ablation_study_asks_the_papers_questions():
    study = load_study(ROOT / "experiments" / "ablation.yaml")
    assert study.seeds == (0, 1, 2) and study.design == "one_factor_at_a_time"
    names = [v.name for v in study.variants]
    assert names[0] == "baseline" and {"normalization=none", "normalization=batchnorm", "normalization=both",
                                       "pool=non_overlapping", "dropout=0.0", "dropout=0.25", "dropout=0.7",
                                       "activation=tanh", "activation=sigmoid", "augment=false"} <= set(names)
    base = study.baseline.config
    from alexnet_keras.config import load_config

    assert base == load_config(ROOT / "experiments" / "cifar10.yaml")   # the main job is the baseline
    assert (base.model.variant, base.model.init, base.train.schedule, base.train.learning_rate) == (
        "cifar", "keras", "cosine", 0.02)
    for v in study.variants:   # one factor at a time
        differing = [axis for axis, value in v.factors.items() if value != study.baseline.factors[axis]]
        assert len(differing) == (0 if v.is_baseline else 1)
        changed = {k for k, x in v.config.flat().items() if x != base.flat()[k]}
        assert changed <= {"lrn", "batchnorm", "pool", "dropout", "activation", "augment"}


def test_grid_design_and_baseline_from_the_base_config(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({
        "name": "g", "design": "grid", "seeds": 2, "base": {"dropout": 0.25, "model": {"pool": "non_overlapping"}},
        "axes": {"dropout": [0.0, 0.25], "pool": ["overlapping", "non_overlapping"]}}))
    study = load_study(path)
    assert study.seeds == (0, 1)
    assert [v.name for v in study.variants] == [
        "dropout=0.0,pool=overlapping", "dropout=0.0", "pool=overlapping", "baseline"]
    assert study.baseline.config.model.dropout == 0.25 and study.baseline.config.model.pool == "non_overlapping"
    assert len(study.children()) == 8 and len({c.digest for c in study.children()}) == 8
    assert load_study(path).digest() == study.digest()   # stable: the key to resuming


def test_study_errors_are_config_errors():
    from alexnet_keras.config import ConfigError

    assert issubclass(StudyError, ConfigError)   # the CLI turns them into exit status 2


def test_mlproject_has_an_ablate_entry_point():
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    entry = project["entry_points"]["ablate"]
    assert entry["parameters"]["config"]["default"] == "experiments/ablation.yaml"
    assert "alexnet_keras ablate {config}" in entry["command"] and "--parallel {parallel}" in entry["command"]


# --- statistics ------------------------------------------------------------------------------------

def test_welch_by_hand():
    # a = 1, 2, 3 and b = 4, 5, 6: both variances 1, n 3 -> se = sqrt(2/3), df = 4, t = -3 / se.
    w = welch([1, 2, 3], [4, 5, 6])
    se = math.sqrt(2 / 3)
    assert w.diff == pytest.approx(-3.0) and w.df == pytest.approx(4.0)
    assert w.t == pytest.approx(-3 / se)
    assert w.p_value == pytest.approx(0.021311641, rel=1e-6)   # 2 * P(T_4 > 3.674)
    assert (w.ci_low, w.ci_high) == pytest.approx((-3 - 2.776445105 * se, -3 + 2.776445105 * se))


def test_welch_matches_scipy_on_unequal_groups():
    from scipy import stats

    a, b = [0.812, 0.805, 0.821], [0.774, 0.781, 0.769, 0.790]
    w = welch(a, b)
    expected = stats.ttest_ind(a, b, equal_var=False)
    ci = expected.confidence_interval(0.95)
    assert w.p_value == pytest.approx(expected.pvalue)
    assert w.t == pytest.approx(expected.statistic) and w.df == pytest.approx(expected.df)
    assert (w.ci_low, w.ci_high) == pytest.approx((ci.low, ci.high))


def test_welch_is_undefined_without_replicates_or_variance():
    assert math.isnan(welch([0.5], [0.4, 0.6]).p_value)
    assert welch([0.5], [0.4, 0.6]).diff == pytest.approx(0.0)
    w = welch([0.25, 0.25], [0.25, 0.25])
    assert w.diff == 0.0 and math.isnan(w.p_value) and math.isnan(w.ci_low)


# --- nuisance hyperparameters tuned per arm (`nuisance_grid`) -----------------------------------------------

GRID_STUDY = {
    "name": "tuned", "experiment": "alexnet-keras-tuned",
    "base": {"model": {"variant": "cifar", "width": 0.125, "init": "keras"},
             "data": {"dataset": "synthetic", "synthetic_samples": 128, "synthetic_classes": 4},
             "train": {"epochs": 1, "batch_size": 32}},
    "seeds": [0, 1, 2],
    "axes": {"activation": ["relu", "tanh"]},
    "nuisance_grid": {"learning_rate": [0.01, 0.05, 0.1]},
}
# Final validation / test accuracy per (activation, learning rate): validation picks 0.05 for ReLU and
# 0.01 for tanh, while test would pick 0.01 for ReLU and 0.1 for tanh.
VAL = {("relu", 0.01): 0.60, ("relu", 0.05): 0.70, ("relu", 0.1): 0.65,
       ("tanh", 0.01): 0.55, ("tanh", 0.05): 0.50, ("tanh", 0.1): 0.45}
TEST = {("relu", 0.01): 0.90, ("relu", 0.05): 0.50, ("relu", 0.1): 0.60,
        ("tanh", 0.01): 0.40, ("tanh", 0.05): 0.45, ("tanh", 0.1): 0.95}


def _grid_study(tmp_path, **changes):
    path = tmp_path / "tuned.yaml"
    path.write_text(yaml.safe_dump({**GRID_STUDY, **changes}, sort_keys=False))
    return path


def tuned_accuracy(config):
    """Validation and test accuracy by (activation, learning rate) as VAL and TEST say, plus 0.001 per seed."""
    key, bump = (config.model.activation, config.train.learning_rate), 0.001 * config.train.seed
    return VAL[key] + bump, TEST[key] + bump, 0.8


TUNING_CALLS = [f"{v} learning_rate={lr} seed=0" for v in ("baseline", "activation=tanh") for lr in (0.01, 0.05, 0.1)]


def test_each_arm_is_tuned_on_validation_and_its_other_seeds_run_at_its_value(tmp_path, mlflow_store, monkeypatch):
    path = _grid_study(tmp_path)
    calls = _fake_training(monkeypatch, tuned_accuracy)
    assert cli.main(["ablate", str(path)]) == 0
    # Tuning first (every arm at every value, seed 0), then the other seeds at the value validation chose:
    # 0.05 for ReLU, 0.01 for tanh (test accuracy would have chosen 0.01 and 0.1).
    assert calls == TUNING_CALLS + ["baseline learning_rate=0.05 seed=1", "activation=tanh learning_rate=0.01 seed=1",
                                    "baseline learning_rate=0.05 seed=2", "activation=tanh learning_rate=0.01 seed=2"]
    (parent,), children = _split(all_runs(mlflow_store))
    assert parent.info.status == "FINISHED" and len(children) == 10
    assert parent.data.params["num_children"] == "10"
    lr_of = {r.info.run_name: float(r.data.params["learning_rate"]) for r in children}
    assert lr_of["activation=tanh learning_rate=0.01 seed=2"] == 0.01

    spec = json.loads((_artifact_dir(parent) / "study" / "study.json").read_text())
    assert spec["nuisance_grid"] == {"learning_rate": [0.01, 0.05, 0.1]}
    assert "learning_rate" in spec["hyperparameters"]["nuisance"]
    study = load_study(path)
    by_digest = {r.data.tags["alexnet_keras.config_digest"]: r for r in children}
    for v in spec["variants"]:
        assert "config_digests" not in v and list(v["grid_digests"]) == ["0.01", "0.05", "0.1"]
        for label, digests in v["grid_digests"].items():
            assert list(digests) == ["0", "1", "2"]
            for seed, digest in digests.items():   # the digest of that arm, value and seed
                child = next(c for c in study.children() if c.digest == digest)
                assert (child.variant.name, child.grid_point.label, str(child.seed)) == (v["name"], label, seed)
        # The first seed's run at the chosen value is the tuning run itself: trained once.
        chosen = "0.05" if v["name"] == "baseline" else "0.01"
        assert all(d in by_digest for d in v["grid_digests"][chosen].values())

    # The report: each arm's value, the runs used (the chosen value's only), the tuning table.
    rows = {r["variant"]: r for r in csv.DictReader(io.StringIO(
        (_artifact_dir(parent) / "reports" / "ablation.csv").read_text()))}
    assert rows["baseline"]["nuisance_value"] == "0.05" and rows["activation=tanh"]["nuisance_value"] == "0.01"
    assert float(rows["baseline"]["test_accuracy_mean"]) == pytest.approx(0.501)   # 0.50 + 0.001 * mean seed
    assert float(rows["activation=tanh"]["test_accuracy_mean"]) == pytest.approx(0.401)
    md = (_artifact_dir(parent) / "reports" / "ablation.md").read_text()
    table = md[md.index("| variant"):]
    assert table.splitlines()[0].startswith("| variant | n | learning_rate | test acc |")
    assert "| **baseline** | 3 | 0.05 |" in md and "| activation=tanh | 3 | 0.01 |" in md
    assert "### Nuisance tuning per arm (learning_rate)" in md
    assert "| activation=tanh | 0.01 | **0.5500** | 0.5000 | 0.4500 |" in md


def test_a_tuned_study_resumes_with_the_choice_recomputed_from_the_store(tmp_path, mlflow_store, monkeypatch):
    path = _grid_study(tmp_path)
    # Interrupted during tuning: the tuning runs finished before are kept.
    calls = _fake_training(monkeypatch, tuned_accuracy, interrupt={"activation=tanh learning_rate=0.05 seed=0"})
    assert cli.main(["ablate", str(path)]) == 130
    assert calls == TUNING_CALLS[:5]
    # Re-run: the rest of the tuning, then the final runs; one of them fails (not a divergence).
    calls = _fake_training(monkeypatch, tuned_accuracy, fail={"baseline learning_rate=0.05 seed=2"})
    assert cli.main(["ablate", str(path)]) == 1
    assert calls == TUNING_CALLS[4:] + ["baseline learning_rate=0.05 seed=1", "activation=tanh learning_rate=0.01 seed=1",
                                        "baseline learning_rate=0.05 seed=2", "activation=tanh learning_rate=0.01 seed=2"]
    # Again: only the failed child runs; the choice comes from the finished tuning runs in the store.
    calls = _fake_training(monkeypatch, tuned_accuracy)
    assert cli.main(["ablate", str(path)]) == 0
    assert calls == ["baseline learning_rate=0.05 seed=2"]
    parents, children = _split(all_runs(mlflow_store))
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sum(r.info.status == "FINISHED" for r in children) == 10


def test_a_grid_value_that_diverges_is_out_for_that_arm_not_a_failure(tmp_path, mlflow_store, monkeypatch):
    path = _grid_study(tmp_path)
    # ReLU's best value on validation (0.05) diverges: ReLU then runs at 0.1, its best finished value.
    calls = _fake_training(monkeypatch, tuned_accuracy, diverge={"baseline learning_rate=0.05 seed=0"})
    assert cli.main(["ablate", str(path)]) == 0
    assert "baseline learning_rate=0.1 seed=1" in calls and len(calls) == 10
    calls = _fake_training(monkeypatch, tuned_accuracy)
    assert cli.main(["ablate", str(path)]) == 0
    assert calls == []   # the diverged value is not tried again
    (parent,), _ = _split(all_runs(mlflow_store))
    md = (_artifact_dir(parent) / "reports" / "ablation.md").read_text()
    assert "| baseline | 0.1 | 0.6000 | failed | **0.6500** |" in md


def test_dry_run_lists_the_tuning_runs_then_the_final_runs(tmp_path, untouched_store, capsys):
    assert cli.main(["ablate", str(_grid_study(tmp_path)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 variants x 3 seeds, 3 nuisance values tuned per arm = 6 tuning + 4 final = 10 runs" in out
    assert "nuisance grid: learning_rate in {0.01, 0.05, 0.1}" in out
    tuning, final = out.index("1. tuning runs (6)"), out.index("2. final runs (4)")
    assert tuning < out.index("activation=tanh learning_rate=0.1 seed=0") < final < out.index("baseline seed=2")
    assert not untouched_store.exists()


def test_a_grid_of_several_keys_is_their_product_and_no_grid_leaves_the_study_as_it_was(tmp_path):
    path = _grid_study(tmp_path, nuisance_grid={"learning_rate": [0.01, 0.02], "batch_size": [32, 64]})
    study = load_study(path)
    assert [p.label for p in study.grid] == ["learning_rate=0.01,batch_size=32", "learning_rate=0.01,batch_size=64",
                                             "learning_rate=0.02,batch_size=32", "learning_rate=0.02,batch_size=64"]
    assert len(study.tuning_children()) == 8 and len(study.children()) == 2 * 4 * 3
    assert len({c.digest for c in study.children()}) == 24
    plain = load_study(_grid_study(tmp_path, nuisance_grid=None))
    assert plain.grid == () and "nuisance_grid" not in plain.spec()
    assert all("config_digests" in v and "grid_digests" not in v for v in plain.spec()["variants"])
    assert plain.digest() != load_study(_grid_study(tmp_path)).digest()


@pytest.mark.parametrize("grid, fragment", [
    ({"learning_rat": [0.01]}, "nuisance_grid 'learning_rat': unknown option. Did you mean learning_rate"),
    ({"activation": ["relu"]}, "is set by the axis 'activation' (scientific)"),
    ({"seed": [0, 1]}, "cannot be tuned: use `seeds:`"),
    ({"learning_rate": []}, "`nuisance_grid.learning_rate` must not be empty"),
    ({"learning_rate": 0.01}, "`nuisance_grid.learning_rate` must be a list; got 0.01"),
    ({"learning_rate": [0.01, 0.01]}, "value '0.01' is listed twice"),
    ({"learning_rate": [0.01, -1]}, "learning_rate"),
    ({"dropout": [0.5, 0.50]}, "listed twice"),
    ({"dropout": [0, 0.0]}, "are the same configuration"),
    ([0.01, 0.02], "`nuisance_grid` must be a mapping"),
])
def test_a_bad_nuisance_grid_fails_before_any_run(tmp_path, untouched_store, capsys, grid, fragment):
    path = _grid_study(tmp_path, nuisance_grid=grid)
    assert cli.main(["ablate", str(path)]) == 2
    err = capsys.readouterr().err
    assert fragment in err and str(path) in err and "Traceback" not in err
    assert not untouched_store.exists()


# --- the plan's size, and what a study leaves behind ---------------------------------------------------------

SIX_AXES = {"dropout": [i / 10 for i in range(10)], "learning_rate": [(i + 1) / 100 for i in range(10)],
            "momentum": [i / 10 for i in range(10)], "weight_decay": [i / 1000 for i in range(10)],
            "lrn_alpha": [(i + 1) / 1e4 for i in range(10)], "pca_std": [i / 10 for i in range(10)]}


@pytest.mark.parametrize("changes, runs", [
    ({"seeds": 1000000}, "1,000,000"),                                             # the count alone
    ({"design": "grid", "axes": SIX_AXES}, "2,000,000"),                           # 10^6 variants x 2 seeds
    ({"nuisance_grid": {"learning_rate": [0.01, 0.02, 0.05, 0.1], "momentum": [0.0, 0.5, 0.9],
                        "weight_decay": [0.0, 0.0005, 0.001], "batch_size": [16, 32, 64], "lrn_beta": [0.5, 0.75, 1]},
      "seeds": 11}, "1,002"),                                                      # 3 arms x (324 + 10)
])
def test_a_plan_over_the_limit_is_refused_before_any_config_is_built(tmp_path, untouched_store, capsys, changes, runs):
    import time

    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(_bad(**changes)))
    start = time.perf_counter()
    for argv in (["ablate", str(path), "--dry-run"], ["ablate", str(path)]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(path) in err and "Traceback" not in err
        assert f"plans {runs} runs" in err and "more than max_runs (1,000)" in err
        assert f"`max_runs: {runs.replace(',', '')}`" in err           # the override, with the count it needs
    assert time.perf_counter() - start < 20                              # counted, not built
    assert not untouched_store.exists()


def test_max_runs_sets_the_limit(tmp_path, untouched_store, capsys):
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(_bad(max_runs=5)))                   # 3 variants x 2 seeds = 6 runs
    assert cli.main(["ablate", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "plans 6 runs, more than max_runs (5)" in err and "`max_runs: 6`" in err
    path.write_text(yaml.safe_dump(_bad(max_runs=6)))
    assert cli.main(["ablate", str(path), "--dry-run"]) == 0
    assert "3 variants x 2 seeds = 6 runs" in capsys.readouterr().out
    assert not untouched_store.exists()


def test_a_study_leaves_no_temporary_folder(mlflow_store, monkeypatch, tmp_path):
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(_bad(seeds=[0], axes={"dropout": [0.5, 0.0]})))   # two children
    _fake_training(monkeypatch)
    assert cli.main(["ablate", str(path)]) == 0
    assert [(p.name, sorted(f.name for f in p.iterdir())) for p in scratch.iterdir()] == []
