"""Hyperparameter sweeps (alexnet_keras/tune.py): keras-tuner trials as nested MLflow runs.

Every sweep here is experiments/sweep_smoke.yaml or a variant of it: 1-epoch trials of the 1/8-width
network on 128 synthetic images, so a trial takes seconds.
"""

import contextlib
import io
import json
import math
import os
from pathlib import Path

import keras
import keras_tuner
import mlflow
import pytest
import yaml
from conftest import all_runs, copy_store, point_at
from mlflow.tracking import MlflowClient

from alexnet_keras import cli, tracking
from alexnet_keras.experiments import tune
from alexnet_keras.experiments.sweep import load_sweep
from alexnet_keras.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "experiments" / "sweep_smoke.yaml"
PNG = b"\x89PNG\r\n\x1a\n"


def _sweep_file(folder: Path, **changes) -> Path:
    """experiments/sweep_smoke.yaml with top-level keys replaced (None removes a key)."""
    data = yaml.safe_load(SMOKE.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _text(value):
    return "" if value is None else ("true" if value is True else "false" if value is False else str(value))


def _role(runs, role):
    return [r for r in runs if r.data.tags.get(tracking.SWEEP_ROLE_TAG) == role]


# --- the sweep files ---------------------------------------------------------------------------

def test_shipped_sweep_files_validate():
    smoke = load_sweep(SMOKE)
    assert smoke.max_trials == 2 and smoke.base.train.epochs == 1 and smoke.base.model.width == 0.125
    assert smoke.base.data.dataset == "synthetic" and smoke.base.data.synthetic_samples == 128

    real = load_sweep(ROOT / "experiments" / "sweep.yaml")
    main_job = load_config(ROOT / "experiments" / "cifar10.yaml")
    assert real.spec.tuner in ("random", "bayesian")
    assert (real.objective, real.direction) == ("val_accuracy", "max")
    assert (real.base.model.variant, real.base.model.init, real.base.train.schedule) == (
        "cifar", "keras", "cosine")
    assert real.base.data.dataset == "cifar10" and real.base.train.momentum == main_job.train.momentum
    assert (real.base.model.width, real.base.data.train_limit, real.base.train.epochs, real.max_trials) == (
        0.25, 10000, 3, 8)
    assert set(real.names) == {"learning_rate", "weight_decay", "dropout", "batch_size", "lrn", "batchnorm"}
    assert real.param("learning_rate").sampling == "log" and real.param("weight_decay").sampling == "log"
    assert "CPU-sized" in (ROOT / "experiments" / "sweep.yaml").read_text()
    # Bayesian with 8 trials: 4 random ones first, then the model chooses (keras-tuner's 18 would not).
    assert real.spec.tuner != "bayesian" or real.spec.budget.num_initial_points == 4


def test_digest_ignores_the_budget_but_not_the_space(tmp_path):
    a = load_sweep(SMOKE)
    assert load_sweep(SMOKE, max_trials=9).digest() == a.digest()
    space = yaml.safe_load(SMOKE.read_text())["search_space"]
    changed = load_sweep(_sweep_file(tmp_path, search_space={**space, "dropout": [0.0, 0.5]}))
    assert changed.digest() != a.digest()



def test_bayesian_sweep_starts_with_fewer_random_trials_than_its_budget(tmp_path):
    """keras-tuner's default num_initial_points (3 x 4 dimensions = 12 here) would make a search of 8
    trials all random: the default stays below max_trials, and a sweep that would be random is refused."""
    def bayesian(**budget):
        return load_sweep(_sweep_file(tmp_path, tuner="bayesian", budget={"epochs": 1, **budget}),
                               directory=str(tmp_path / "tuner"))

    sweep = bayesian(max_trials=8)
    assert sweep.spec.budget.num_initial_points == 4                       # max(2, min(3 * 4, 8 // 2))
    assert sweep.to_dict()["budget"]["num_initial_points"] == 4                 # logged as sweep/sweep.yaml
    assert tune.parent_params(sweep)["sweep_num_initial_points"] == 4          # and as the parent's param
    assert bayesian(max_trials=40).spec.budget.num_initial_points == 12    # 3 x dimensions when the budget allows
    assert bayesian(max_trials=8, num_initial_points=6).spec.budget.num_initial_points == 6
    assert bayesian(max_trials=8).digest() == bayesian(max_trials=9).digest()   # budget, not the search
    tuner = tune.make_tuner(sweep)
    assert tuner.oracle.num_initial_points == 4                # what keras-tuner runs with
    # The file's seed (0 here) makes the search repeatable: keras-tuner would take a seed of 0 for none
    # and draw a random one, so two tuners would propose different first trials.
    again = tune.make_tuner(sweep)
    assert sweep.spec.seed == 0 and tuner.oracle.seed == again.oracle.seed == 1
    first = [t.oracle.create_trial("probe").hyperparameters.values for t in (tuner, again)]
    assert first[0] == first[1]
    for budget, fragment in (({"max_trials": 8, "num_initial_points": 8}, "num_initial_points is 8, but "
                              "budget.max_trials is 8"),
                             ({"max_trials": 2}, "num_initial_points is 2, but budget.max_trials is 2")):
        with pytest.raises(ConfigError) as err:
            bayesian(**budget)
        assert fragment in str(err.value) and "tuner: random" in str(err.value)
    random = load_sweep(_sweep_file(tmp_path, tuner="random", budget={"max_trials": 2}))
    assert random.spec.budget.num_initial_points is None


def test_importance_is_scipys_spearman_with_tied_values_ranked_alike():
    from scipy import stats

    sweep = load_sweep(SMOKE)   # learning_rate (float), batch_size (choice of 16, 32), lrn, pool
    scores = [0.1, 0.2, 0.4, 0.3]
    rates = [0.01, 0.01, 0.02, 0.03]                            # a tie
    rows = [{"val_accuracy": score, "learning_rate": rate, "batch_size": batch, "lrn": lrn, "pool": pool}
            for score, rate, batch, lrn, pool in zip(scores, rates, [16, 32, 16, 32], [True, True, False, False],
                                                     ["overlapping"] * 4)]
    weights = tune.importance(rows, sweep)
    assert weights["learning_rate"] == pytest.approx(abs(stats.spearmanr(rates, scores).statistic), abs=1e-4)
    # Batch sizes 16, 32, 16, 32 against 0.1, 0.2, 0.4, 0.3: no monotone relation. Ranking the ties
    # arbitrarily (argsort of argsort) gave 0.4 here.
    assert weights["batch_size"] == 0.0
    # Booleans: the share of variance between the groups (0.15, 0.35 around 0.25).
    assert weights["lrn"] == pytest.approx(0.8)
    assert weights["pool"] == 0.0                               # never varied
    assert tune.importance(rows[:2], sweep) == {name: 0.0 for name in sweep.names}   # too few trials

BAD_SPACES = [
    # keras-tuner's own checks, with the YAML path in front.
    ({"pool": {"type": "choice", "values": []}}, "search_space.pool: `values` must be provided for `Choice`"),
    ({"learning_rate": {"type": "float", "min": 0.1, "max": 0.001}},
     "search_space.learning_rate: For HyperParameters.Float(name='learning_rate'), min_value 0.1 is greater "
     "than the max_value 0.001"),
    ({"learning_rate": {"type": "float", "min": 0.001, "max": 0.1, "sampling": "lag"}},
     "search_space.learning_rate: For HyperParameters.Float(name='learning_rate'), sampling must be one of"),
    ({"batch_size": {"type": "int", "min": 16, "max": 64, "step": 1, "sampling": "log"}},
     "search_space.batch_size: For HyperParameters.Int(name='batch_size'), expected step > 1 with sampling='log'"),
    ({"learning_rate": {"type": "float", "min": 0, "max": 0.1, "sampling": "log"}},
     "search_space.learning_rate: For HyperParameters.Float(name='learning_rate'), sampling='log' does not "
     "support negative values, found min_value: 0.0"),
    # The project's own: the option exists, fits the type, and every value makes a valid config.
    ({"lerning_rate": {"type": "float", "min": 0.001, "max": 0.1}}, "unknown option 'lerning_rate'"),
    ({"pool": ["overlapping", "foo"]}, "'foo' is not a valid value: model.pool must be one of"),
    ({"dropout": {"type": "float", "min": 0.0, "max": 1.5}}, "model.dropout must be in [0.0, 1.0)"),
    ({"lrn": {"type": "float", "min": 0, "max": 1}}, "does not fit model.lrn"),
    ({"batch_size": {"type": "choice", "values": [16, 0]}}, "train.batch_size must be a positive integer"),
    ({"run_name": ["a", "b"]}, "cannot be searched"),
    ({"dropout": {"type": "float", "min": 0.1, "max": 0.1}}, "search_space.dropout: min equals max (0.1)"),
    ({"dropout": {"type": "float", "min": 0.0, "max": 0.5, "step": 0}}, "`search_space.dropout.step` must be > 0"),
    ({"dropout": {"type": "float", "min": 0.0, "max": 0.5, "smapling": "log"}},
     "search_space.dropout: unknown key 'smapling'. Did you mean sampling?"),
    ({"pool": {"type": "choice", "values": ["overlapping"], "sampling": "log"}},
     "search_space.pool: unknown key 'sampling'. Known keys: type, values"),
    ({}, "`search_space` must not be empty"),
]


@pytest.mark.parametrize("space, fragment", BAD_SPACES)
def test_invalid_search_space_fails_before_anything_runs(untouched_store, tmp_path, capsys, space, fragment):
    path = _sweep_file(tmp_path, search_space=space)
    assert cli.main(["tune", str(path), "--tuner-dir", str(tmp_path / "tuner")]) == 2
    err = capsys.readouterr().err
    assert fragment in err and str(path) in err and "Traceback" not in err, err
    # Nothing was created: no tuner state, not even the store's database.
    assert not (tmp_path / "tuner").exists() and not untouched_store.exists()


@pytest.mark.parametrize("changes, fragment", [
    ({"tuner": "grid"}, "`tuner` must be one of 'random', 'bayesian', 'hyperband'; got 'grid'"),
    ({"objective": "val_acc"}, "`objective.name` must be one of"),
    ({"budget": {"max_trials": 0}}, "`budget.max_trials` must be an integer >= 1"),
    ({"serach_space": {}}, "unknown key 'serach_space'. Did you mean search_space?"),
    ({"budget": {"max_trails": 3}}, "budget: unknown key 'max_trails'. Did you mean max_trials?"),
    ({"objective": {"name": "val_accuracy", "goal": "max"}}, "objective: unknown key 'goal'"),
    ({"base_config": "nowhere.yaml"}, "base_config 'nowhere.yaml' not found (looked at"),
    ({"base": {"dropuot": 0.5}}, "unknown option 'dropuot'. Did you mean dropout?"),
    ({"base": {"dropout": 1.5}}, "base: model.dropout must be in [0.0, 1.0)"),
    ({"budget": {"max_trials": 2, "num_initial_points": 1}},
     "budget.num_initial_points applies to tuner: bayesian only"),
    # A finite space is counted (not enumerated): keras-tuner would stop once every point was tried.
    ({"budget": {"max_trials": 13}, "search_space": {"lrn": {"type": "boolean"}, "pool": ["overlapping",
     "non_overlapping"], "batch_size": {"type": "int", "min": 16, "max": 48, "step": 16}}},
     "the search space has 12 distinct points (3 x 2 x 2) but budget.max_trials is 13: keras-tuner would stop "
     "after 12 trials. Set max_trials (or --max-trials) to at most 12"),
])
def test_invalid_sweep_settings_are_clear_errors(tmp_path, changes, fragment):
    with pytest.raises(ConfigError) as err:
        load_sweep(_sweep_file(tmp_path, **changes))
    assert fragment in str(err.value)


def test_dry_run_creates_nothing(untouched_store, tmp_path, capsys):
    assert cli.main(["tune", str(SMOKE), "--dry-run", "--tuner-dir", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    assert '"learning_rate"' in out and "new sweep" in out
    assert not (tmp_path / "t").exists() and not untouched_store.exists()


# --- the HyperModel ------------------------------------------------------------------------------

def test_hypermodel_builds_the_project_alexnet_and_rebatches_per_trial(tmp_path):
    from alexnet_keras.model.alexnet import AlexNet

    sweep = load_sweep(SMOKE)
    hypermodel = tune.AlexNetHyperModel(sweep)
    hp = keras_tuner.HyperParameters()
    hypermodel.values(hp)                            # declares the space
    hp.values.update(batch_size=16, lrn=False)       # the base config says batch 32, lrn on
    model = hypermodel.build(hp)
    assert isinstance(model, AlexNet) and not [layer for layer in model.layers if "lrn" in layer.name]

    class CountBatches(keras.callbacks.Callback):
        batches = 0

        def on_train_batch_end(self, batch, logs=None):
            CountBatches.batches += 1

    history = hypermodel.fit(hp, model, callbacks=[CountBatches()])
    train_images = hypermodel.data_for(sweep.base).counts["train"]
    assert CountBatches.batches == math.ceil(train_images / 16) and len(history.history["loss"]) == 1


# --- a sweep, resumed: as `mlflow run . -e tune` first, then from the command line -------------------

@pytest.fixture(scope="module")
def swept(tmp_path_factory, store_template):
    """Three invocations of one sweep into one store, with snapshots of the runs after each:
    1. under `mlflow run` (MLFLOW_RUN_ID names the parent), 2 trials;
    2. from the command line, after making the tuner forget that trial 1 ended (as if stopped in
       between): the same parent, no new runs;
    3. under `mlflow run` again with max_trials 3 and `--register sweep-best`: a new parent (MLflow made it), one new
       trial, the parent's model registered."""
    root = tmp_path_factory.mktemp("sweep")
    uri = copy_store(store_template, root)
    client = MlflowClient(uri)
    snapshots, outputs = [], []
    with pytest.MonkeyPatch.context() as mp:
        point_at(mp, root, uri)
        # What `mlflow run . -e tune -P config=...` does before starting the program.
        project_run = client.create_run("0", run_name="mlflow-run")
        client.log_param(project_run.info.run_id, "config", str(SMOKE))
        mp.setenv("MLFLOW_RUN_ID", project_run.info.run_id)
        assert cli.main(["tune", str(SMOKE), "--max-trials", ""]) == 0   # as the MLproject passes it
        assert "MLFLOW_RUN_ID" not in os.environ
        snapshots.append(all_runs(uri))

        state = root / "tuner" / "sweep-smoke" / "oracle.json"
        oracle = json.loads(state.read_text())
        oracle["retry_queue"] = ["1"]
        state.write_text(json.dumps(oracle))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert cli.main(["tune", str(SMOKE)]) == 0
        outputs.append(out.getvalue())
        snapshots.append(all_runs(uri))

        second_project_run = client.create_run("0", run_name="mlflow-run-2")
        mp.setenv("MLFLOW_RUN_ID", second_project_run.info.run_id)
        assert cli.main(["tune", str(SMOKE), "--max-trials", "3", "--register", "sweep-best"]) == 0
        snapshots.append(all_runs(uri))
    return uri, (project_run.info.run_id, second_project_run.info.run_id), snapshots, outputs


def test_mlflow_run_id_becomes_the_parent_and_trials_nest_under_it(swept):
    _, (project_run_id, _), snapshots, _ = swept
    first = snapshots[0]
    (parent,) = _role(first, "parent")
    trials = _role(first, "trial")
    assert parent.info.run_id == project_run_id and len(first) == 3 and len(trials) == 2
    assert parent.info.run_name == "sweep-smoke" and parent.info.status == "FINISHED"
    assert parent.data.params["config"] == str(SMOKE) and parent.data.params["sweep_tuner"] == "random"
    for trial in trials:
        assert trial.info.run_id != project_run_id
        assert trial.data.tags["mlflow.parentRunId"] == project_run_id
        assert trial.info.experiment_id == parent.info.experiment_id
        assert trial.data.tags[tracking.SWEEP_UID_TAG] == parent.data.tags[tracking.SWEEP_UID_TAG]
    assert sorted(t.data.tags[tracking.TRIAL_TAG] for t in trials) == ["0", "1"]


def test_trial_runs_log_the_resolved_config_epoch_metrics_and_status(swept):
    uri, _, snapshots, _ = swept
    client = MlflowClient(uri)
    sweep = load_sweep(SMOKE)
    for trial in _role(snapshots[-1], "trial"):
        params = trial.data.params
        values = {"learning_rate": float(params["learning_rate"]), "batch_size": int(params["batch_size"]),
                  "lrn": params["lrn"] == "true", "pool": params["pool"]}
        assert 1e-3 <= values["learning_rate"] <= 1e-1 and values["batch_size"] in (16, 32)
        expected = sweep.trial_config(values, run_name=trial.info.run_name, experiment="Default").flat()
        assert {k: params[k] for k in expected} == {k: _text(v) for k, v in expected.items()}
        assert trial.info.status == "FINISHED"
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert [m.step for m in client.get_metric_history(trial.info.run_id, key)] == [0], key
        metrics = trial.data.metrics
        assert metrics["best_val_accuracy"] == pytest.approx(metrics["val_accuracy"])
        assert metrics["num_params"] > 0 and "train_time_s" in metrics
        assert trial.data.tags["alexnet_keras.keras_backend"] == "tensorflow"


def test_parent_logs_best_values_table_figure_and_model(swept):
    uri, (_, parent_id), snapshots, _ = swept
    client = MlflowClient(uri)
    trials = _role(snapshots[-1], "trial")
    parent = client.get_run(parent_id)
    # 13 validation images: ties are likely, so take the trial the parent names and check it is a best one.
    (best,) = [r for r in trials if r.info.run_id == parent.data.tags["alexnet_keras.best_run_id"]]
    top = max(r.data.metrics["best_val_accuracy"] for r in trials)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(top)
    assert best.data.metrics["best_val_accuracy"] == pytest.approx(top)
    for name in ("learning_rate", "batch_size", "lrn", "pool"):
        assert parent.data.tags[f"best.{name}"] == best.data.params[name], name
    assert parent.data.metrics["completed_trials"] == 3 and "test_accuracy" in parent.data.metrics

    folder = Path(mlflow.artifacts.download_artifacts(run_id=parent_id, artifact_path="sweep",
                                                      tracking_uri=uri))
    rows = (folder / "trials.csv").read_text().splitlines()
    assert rows[0].startswith("rank,trial,status,val_accuracy,best_epoch,learning_rate,batch_size,lrn,pool")
    scores = [float(line.split(",")[3]) for line in rows[1:]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    assert "| rank | trial |" in (folder / "trials.md").read_text()
    assert json.loads((folder / "best_hyperparameters.json").read_text())["run_id"] == best.info.run_id
    png = (folder / "objective.png").read_bytes()
    assert png[:8] == PNG and len(png) > 5000

    assert parent.data.tags["alexnet_keras.model_source"] == "checkpoint"
    info = mlflow.models.get_model_info(f"runs:/{parent_id}/alexnet")
    assert info.signature is not None


def test_resume_reuses_runs_and_more_trials_adds_only_the_new_ones(swept):
    _, (first_parent, second_parent), snapshots, outputs = swept
    first, second, third = ({r.info.run_id: r for r in snap} for snap in snapshots)
    # Re-running the finished sweep (trial 1 re-queued by the tuner) reuses the parent, logs nothing
    # new and re-trains nothing.
    assert second.keys() == first.keys()
    assert all(second[i].info.end_time == first[i].info.end_time for i in first if i != first_parent)
    assert "already finished as MLflow run" in outputs[0] and "no new trials" in outputs[0]
    # A bigger budget continues the same sweep: one new trial. `mlflow run` made a new parent: every
    # trial is nested under it now, and the first parent is marked superseded.
    new = [third[i] for i in third.keys() - second.keys() if i != second_parent]
    assert len(new) == 1 and new[0].data.tags[tracking.TRIAL_TAG] == "2"
    (parent,) = _role(snapshots[-1], "parent")
    assert parent.info.run_id == second_parent
    trials = _role(snapshots[-1], "trial")
    assert sorted(r.data.tags[tracking.TRIAL_TAG] for r in trials) == ["0", "1", "2"]
    assert all(r.data.tags["mlflow.parentRunId"] == second_parent for r in trials)
    assert third[first_parent].data.tags[tracking.SUPERSEDED_BY_TAG] == second_parent


# --- failures ----------------------------------------------------------------------------------

def test_changed_sweep_file_refuses_the_old_tuner_state(untouched_store, tmp_path, capsys):
    state = tmp_path / "tuner" / "sweep-smoke"
    state.mkdir(parents=True)
    (state / tune.STATE_FILE).write_text(json.dumps({"digest": "0" * 16, "uid": "x"}))
    assert cli.main(["tune", str(SMOKE), "--tuner-dir", str(tmp_path / "tuner")]) == 2
    assert "--overwrite" in capsys.readouterr().err and not untouched_store.exists()


def test_interrupted_trial_is_resumed_in_the_same_run(mlflow_store, tmp_path, monkeypatch):
    path = _sweep_file(tmp_path, budget={"max_trials": 1, "epochs": 1}, final_model="none")
    original_fit = tune.AlexNetHyperModel.fit

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tune.AlexNetHyperModel, "fit", interrupted)
    assert cli.main(["tune", str(path)]) == 130
    (killed,) = _role(all_runs(mlflow_store), "trial")
    assert killed.info.status == "KILLED"
    assert _role(all_runs(mlflow_store), "parent")[0].info.status == "KILLED"

    monkeypatch.setattr(tune.AlexNetHyperModel, "fit", original_fit)
    assert cli.main(["tune", str(path)]) == 0
    runs = all_runs(mlflow_store)
    (trial,) = _role(runs, "trial")
    (parent,) = _role(runs, "parent")
    assert len(runs) == 2 and trial.info.run_id == killed.info.run_id
    assert trial.info.status == "FINISHED" and trial.data.tags[tracking.ATTEMPT_TAG] == "2"
    assert parent.info.status == "FINISHED" and parent.data.tags["alexnet_keras.model_source"] == "none"


def test_diverged_trials_end_failed_and_the_sweep_says_so(mlflow_store, tmp_path, capsys):
    path = _sweep_file(tmp_path, budget={"max_trials": 1, "epochs": 2},
                       base={**yaml.safe_load(SMOKE.read_text())["base"], "weight_decay": 0.0},
                       search_space={"learning_rate": [10.0]})
    assert cli.main(["tune", str(path)]) == 1
    err = capsys.readouterr().err
    assert "no trial of sweep 'sweep-smoke' completed" in err
    (trial,) = _role(all_runs(mlflow_store), "trial")
    assert trial.info.status == "FAILED" and "diverged" in trial.data.tags["error"]
    # One line for the diverged trial, numbered as keras-tuner's console numbers it; no tracebacks.
    (line,) = [line for line in err.splitlines() if "diverged" in line]
    assert line.startswith("trial 1 failed: FloatingPointError: training diverged") and "Traceback" not in err, err


def test_tracking_errors_inside_a_trial_stop_the_sweep(mlflow_store, capsys, monkeypatch):
    def store_down(*args, **kwargs):
        raise mlflow.exceptions.MlflowException("store went away")

    monkeypatch.setattr(tracking, "log_metrics", store_down)
    assert cli.main(["tune", str(SMOKE)]) == 2       # keras-tuner alone would mark the trial failed, go on
    assert "store went away" in capsys.readouterr().err
    runs = all_runs(mlflow_store)
    (trial,) = _role(runs, "trial")                  # the second trial never started
    assert trial.info.status == "FAILED" and _role(runs, "parent")[0].info.status == "FAILED"


def test_tune_register_registers_the_sweeps_model(swept):
    """`tune --register` (moved from test_registry, on this module's sweep: its training is shared)."""
    uri, (_, parent_id), snapshots, _ = swept
    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    version = client.get_model_version_by_alias("sweep-best", "champion")
    assert version.run_id == parent.info.run_id          # the model the parent logged: the best trial's
    tags = version.tags
    assert tags["alexnet_keras.origin"] == "sweep" and tags[tracking.SWEEP_TAG] == "sweep-smoke"
    assert tags[tracking.PARENT_RUN_TAG] == parent.info.run_id
    assert tags[tracking.SELECTION_METRIC_TAG] == "val_accuracy"
    assert float(tags[tracking.SELECTION_VALUE_TAG]) == pytest.approx(parent.data.metrics["best_val_accuracy"],
                                                                      abs=1e-5)
    assert tags[tracking.BEST_RUN_ID_TAG] == parent.data.tags[tracking.BEST_RUN_ID_TAG]
    assert parent.info.run_name == "sweep-smoke"
    assert "Hyperparameter sweep 'sweep-smoke'" in parent.data.tags["mlflow.note.content"]
    for trial in _role(snapshots[-1], "trial"):
        assert "of hyperparameter sweep 'sweep-smoke'" in trial.data.tags["mlflow.note.content"]


def test_trials_are_numbered_from_1_everywhere_as_keras_tuners_console_does(swept):
    """keras-tuner prints "Running Trial #1" for trial id "0": run names, descriptions, the trial table,
    the best-trial tag and the messages count the same way."""
    uri, (_, parent_id), snapshots, outputs = swept
    trials = _role(snapshots[-1], "trial")
    assert sorted(t.info.run_name for t in trials) == [f"sweep-smoke-trial-{n}" for n in (1, 2, 3)]
    for trial in trials:
        assert trial.info.run_name.endswith(f"-{int(trial.data.tags[tracking.TRIAL_TAG]) + 1}")
        assert f"Trial {int(trial.data.tags[tracking.TRIAL_TAG]) + 1} of hyperparameter sweep" in \
            trial.data.tags["mlflow.note.content"]
    parent = MlflowClient(uri).get_run(parent_id)
    best_name = MlflowClient(uri).get_run(parent.data.tags["alexnet_keras.best_run_id"]).info.run_name
    assert best_name == f"sweep-smoke-trial-{parent.data.tags[tracking.BEST_TRIAL_TAG]}"
    folder = Path(mlflow.artifacts.download_artifacts(run_id=parent_id, artifact_path="sweep", tracking_uri=uri))
    rows = (folder / "trials.csv").read_text().splitlines()[1:]
    assert sorted(int(line.split(",")[1]) for line in rows) == [1, 2, 3]
    assert "Running Trial #2" in outputs[0] and "trial 2: already finished as MLflow run" in outputs[0]   # id "1"
