"""End-to-end training into a temporary MLflow store: what a run logs, and how runs end.

Bad input (options, files, data folders, the store) is tests/test_bad_input.py's."""

import json
import os
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import TINY, all_runs, cli_flags, copy_store, point_at
from mlflow.tracking import MlflowClient

from alexnet_keras import cli
from alexnet_keras.config import load_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, store_template):
    """One real two-epoch training run, shared by the assertions below (training is the slow part), started
    in a git checkout."""
    root = tmp_path_factory.mktemp("store")
    uri = copy_store(store_template, root)
    git_checkout(root)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        mlflow.set_tracking_uri(uri)
        code = cli.main(["train", *cli_flags(TINY), "--lrn", "false", "--tracking-uri", uri,
                         "--run-name", "tiny"])
    finally:
        os.chdir(cwd)
    assert code == 0
    runs = all_runs(uri)
    assert len(runs) == 1
    return uri, runs[0]


def test_run_logs_every_config_value_as_a_param(trained_run):
    _, run = trained_run
    params = run.data.params
    expected = load_config(overrides={**TINY, "lrn": "false", "run_name": "tiny"}).flat()
    for key, value in expected.items():
        text = "" if value is None else ("true" if value is True else "false" if value is False else str(value))
        assert params[key] == text, key
    assert run.info.status == "FINISHED"
    assert run.data.tags["alexnet_keras.keras_backend"] == "tensorflow"
    assert "alexnet_keras.keras_version" in run.data.tags and "alexnet_keras.device" in run.data.tags


def test_run_logs_per_epoch_and_test_metrics(trained_run):
    uri, run = trained_run
    client = MlflowClient(uri)
    for key in ("loss", "accuracy", "top5_accuracy", "val_loss", "val_accuracy", "val_top5_accuracy"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [0, 1], key
        assert all(np.isfinite(m.value) for m in history)
    metrics = run.data.metrics
    for key in ("test_loss", "test_accuracy", "test_top5_accuracy", "train_time_s", "num_params"):
        assert key in metrics, key
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    # 4 classes: top-k is capped at the number of classes, so it is always right.
    assert metrics["test_top5_accuracy"] == pytest.approx(1.0)


def test_run_logs_system_metrics_and_a_description(trained_run):
    """MLflow's system metrics (on by default, sampled every 2 s so that a short run gets some), and the
    run page's description: what was trained, on what, how."""
    uri, run = trained_run
    metrics = run.data.metrics
    assert metrics["system/cpu_utilization_percentage"] >= 0
    assert metrics["system/system_memory_usage_megabytes"] > 0
    history = MlflowClient(uri).get_metric_history(run.info.run_id, "system/system_memory_usage_megabytes")
    assert [m.step for m in history] == list(range(len(history))) and history
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith("AlexNet (cifar variant, 32 px input, width 0.125) trained on synthetic (")
    for fragment in ("for 2 epochs", "batch 32", "seed 0", "LRN off", "batch norm off", "dropout 0.5"):
        assert fragment in note, fragment


@pytest.fixture(scope="module")
def standardized_run(tmp_path_factory, store_template):
    """One epoch with LRN on standardized pixels and Glorot weights (the defaults), --system-metrics false, a
    dropout and seed of its own and no --run-name: (store URI, the run). The LRN test's standardized regime."""
    root = tmp_path_factory.mktemp("standardized")
    uri = copy_store(store_template, root)
    with pytest.MonkeyPatch.context() as patch:
        point_at(patch, root, uri)
        assert cli.main(["train", *cli_flags({**TINY, "epochs": 1}), "--system-metrics", "false", "--dropout",
                         "0.25", "--seed", "3"]) == 0
    (run,) = all_runs(uri)
    return uri, run


def test_system_metrics_switch_off_and_the_default_run_name(standardized_run):
    """--system-metrics false: no system/ metric at all. No --run-name: the run is named for what it is."""
    _, run = standardized_run
    assert run.info.status == "FINISHED"
    assert not [key for key in run.data.metrics if key.startswith("system/")]
    assert run.data.params["system_metrics"] == "false"
    digest = run.data.tags["alexnet_keras.config_digest"]
    assert run.info.run_name == f"width0.125-dropout0.25-synthetic-synthetic_samples128-{digest[:6]}"


def test_run_logs_reports_figures_model_and_dataset(trained_run):
    uri, run = trained_run
    client = MlflowClient(uri)
    run_id = run.info.run_id

    def listing(path=None):
        return {f.path for f in client.list_artifacts(run_id, path)}

    top = listing()
    assert {"config.yaml", "data.json", "figures", "reports", "summary"} <= top and "model" not in top
    assert listing("summary") == {"summary/model.txt"}
    assert {"figures/confusion_matrix.png", "figures/learning_curves.png"} <= listing("figures")
    assert {"reports/classification_report.txt", "reports/confusion_matrix.csv"} <= listing("reports")
    local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="figures",
                                                     tracking_uri=uri))
    for png in local.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    report = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="reports/classification_report.json", tracking_uri=uri)).read_text())
    assert report["accuracy"] == pytest.approx(run.data.metrics["test_accuracy"], abs=1e-6)
    assert {i.dataset.name for i in client.get_run(run_id).inputs.dataset_inputs} == {
        "synthetic-train", "synthetic-val", "synthetic-test"}


def test_logged_model_loads_with_signature_and_without_lrn(trained_run):
    uri, run = trained_run
    mlflow.set_tracking_uri(uri)
    info = mlflow.models.get_model_info(f"runs:/{run.info.run_id}/alexnet")
    # A servable model (serving.py): raw images in; its Keras flavour is the 32-px network itself.
    assert info.signature is not None and info.signature.inputs.input_names() == ["image", "pixels"]
    model = mlflow.keras.load_model(f"runs:/{run.info.run_id}/alexnet")
    assert tuple(model.input_shape) == (None, 32, 32, 3)
    assert not [layer for layer in model.layers if "lrn" in layer.name]
    out = model.predict(np.zeros((2, 32, 32, 3), "float32"), verbose=0)
    assert out.shape == (2, 4) and np.allclose(out.sum(-1), 1, atol=1e-5)


def test_exception_ends_run_failed_with_error_tag(mlflow_store, monkeypatch):
    from alexnet_keras.training import train

    def broken_fit(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(train, "fit", broken_fit)
    with pytest.raises(RuntimeError):
        train.train_and_evaluate(load_config(overrides=TINY))
    (run,) = all_runs(mlflow_store)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "RuntimeError: disk on fire"


def test_interrupt_ends_run_killed(mlflow_store, monkeypatch):
    from alexnet_keras.training import train

    def interrupted_fit(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "fit", interrupted_fit)
    assert cli.main(["train", *cli_flags(TINY)]) == 130
    (run,) = all_runs(mlflow_store)
    assert run.info.status == "KILLED"


def test_divergence_ends_run_failed_with_reason(mlflow_store, capsys):
    # A learning rate of 10 with plain SGD blows the loss up to NaN within the first epoch.
    code = cli.main(["train", *cli_flags({**TINY, "epochs": 3}), "--learning-rate", "10", "--weight-decay", "0"])
    (run,) = all_runs(mlflow_store)
    assert code == 1 and run.info.status == "FAILED"
    assert "diverged" in run.data.tags["error"] and "diverged" in capsys.readouterr().err


def test_dry_run_prints_config_and_summary_without_a_run(untouched_store, capsys):
    assert cli.main(["train", "--variant", "paper", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert '"lrn": true' in out and "conv1" in out and "lrn1" in out and "fc8" in out
    assert not untouched_store.exists()   # no run, and not even the store


def test_sigterm_ends_the_run_killed(mlflow_store, monkeypatch):
    """A scheduler's SIGTERM mid-training (sent to this process as the second epoch begins): the training stops,
    the run is KILLED (not left RUNNING), the checkpoint is kept."""
    import signal
    import threading

    import keras

    from alexnet_keras.training import train

    # SIGTERM takes Ctrl-C's path in the main thread only: anywhere else it would end this process.
    assert threading.current_thread() is threading.main_thread()

    class Sigterm(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    real = train.build_callbacks
    monkeypatch.setattr(train, "build_callbacks", lambda *args, **kwargs: real(*args, **kwargs) + [Sigterm()])
    assert cli.main(["train", *cli_flags({**TINY, "epochs": 3})]) == 130
    (run,) = all_runs(mlflow_store)
    assert run.info.status == "KILLED"
    # The checkpoint of the last completed epoch stays, for the same command to continue from.
    checkpoint = Path(run.data.tags["alexnet_keras.checkpoint_dir"])
    assert json.loads((checkpoint / "training_metadata.json").read_text())["epoch"] >= 1


# --- how much LRN normalises, logged in every run with LRN layers ------------------------------------------

LRN_METRICS = {f"lrn/lrn{i}_{name}" for i in (1, 2)
               for name in ("ratio_mean", "ratio_p95", "scale_mean", "scale_min", "scale_max",
                            "relative_scale_mean", "relative_scale_min")}


def test_a_run_without_lrn_logs_no_lrn_diagnostics(trained_run):
    _, run = trained_run   # --lrn false
    assert not [key for key in run.data.metrics if key.startswith("lrn")]


def test_lrn_diagnostics_are_logged_at_start_and_end_and_differ_between_input_regimes(standardized_run, mlflow_store):
    """Under lrn/ (a chart section of their own, after the training metrics), at step 0 before training and
    at step `epochs` after it: a line per statistic over the training."""
    from alexnet_keras.model.alexnet import lrn_diagnostics
    from alexnet_keras.training.train import lrn_probe_images, prepare

    paper = {**TINY, "epochs": 1, "input_norm": "center", "init": "paper"}
    assert cli.main(["train", *cli_flags(paper), "--run-name", "paper"]) == 0
    metrics = {}
    runs = {"standardized": standardized_run, "paper": (mlflow_store, *all_runs(mlflow_store))}
    for name, (uri, run) in runs.items():
        assert LRN_METRICS <= set(run.data.metrics)
        assert not [key for key in run.data.metrics if key.startswith("lrn") and key not in LRN_METRICS]
        history = {key: {m.step: m.value for m in MlflowClient(uri).get_metric_history(run.info.run_id, key)}
                   for key in LRN_METRICS}
        assert all(sorted(steps) == [0, paper["epochs"]] for steps in history.values())
        metrics[name] = {f"{key}_{when}": steps[step] for key, steps in history.items()
                         for when, step in (("start", 0), ("end", paper["epochs"]))}
        assert all(np.isfinite(value) for value in metrics[name].values())
    # The start values are the diagnostic of the freshly built model on the first 64 validation images
    # (all 13 here).
    data, model = prepare(load_config(overrides=paper))
    images = lrn_probe_images(data)
    assert images.shape == (data.counts["val"], 32, 32, 3) == (13, 32, 32, 3)
    assert lrn_probe_images(data, count=5).shape[0] == 5
    expected = lrn_diagnostics(model, images)
    for layer in ("lrn1", "lrn2"):
        for stat in ("ratio_mean", "ratio_p95", "relative_scale_min"):
            assert metrics["paper"][f"lrn/{layer}_{stat}_start"] == pytest.approx(expected[layer][stat], rel=1e-4)
    # Pixels on the 0..255 scale with N(0, 0.01) weights feed LRN larger activations than standardised
    # pixels with Glorot weights: its normalising term is larger, its scale further below k^-beta.
    standardized, paper = metrics["standardized"], metrics["paper"]
    assert paper["lrn/lrn1_ratio_mean_start"] > 5 * standardized["lrn/lrn1_ratio_mean_start"]
    assert paper["lrn/lrn1_relative_scale_min_start"] < standardized["lrn/lrn1_relative_scale_min_start"] <= 1.0
    # Training moved the weights, and the diagnostic with them.
    assert paper["lrn/lrn1_ratio_mean_end"] != paper["lrn/lrn1_ratio_mean_start"]


@pytest.mark.parametrize("epochs, steps", [(10, 352), (3, 7)])
def test_step_schedule_divides_the_rate_by_ten_at_half_and_three_quarters(epochs, steps):
    from alexnet_keras.config import TrainConfig
    from alexnet_keras.training.train import learning_rate_schedule

    schedule = learning_rate_schedule(TrainConfig(epochs=epochs, schedule="step", learning_rate=0.02), steps)
    total = epochs * steps
    half, three_quarters = total // 2, total * 3 // 4
    # Keras' PiecewiseConstantDecay keeps a value up to and including its boundary step.
    at = {step: float(schedule(step)) for step in
          (0, half, half + 1, three_quarters, three_quarters + 1, total - 1)}
    assert at == pytest.approx({0: 0.02, half: 0.02, half + 1: 0.002, three_quarters: 0.002,
                                three_quarters + 1: 0.0002, total - 1: 0.0002})


# --- issue 26: names, checkpoints and tracking failures ----------------------------------------------------

def test_default_run_names_differ_with_every_option_and_say_what_differs_from_the_main_job_first():
    from alexnet_keras.training.train import default_run_name

    main = load_config(ROOT / "experiments" / "cifar10.yaml")
    assert default_run_name(main) == f"main-{main.digest()[:6]}"
    assert default_run_name(main.override({"lrn": "false"})).startswith("lrn0-")
    assert default_run_name(main.override({"batchnorm": "true", "activation": "tanh"})).startswith("batchnorm-tanh-")
    readme = main.override({"width": 0.25, "epochs": 2, "data_dir": "/data/cifar10.tar.gz"})
    assert default_run_name(readme).startswith("width0.25-epochs2-")
    variants = [{}, {"width": 0.25}, {"width": 0.5}, {"epochs": 3}, {"train_limit": 500}, {"train_limit": 600},
                {"seed": 1}, {"activation": "tanh"}, {"data_dir": "/data/other"}]
    configs = [load_config(overrides={**TINY, **v}) for v in variants]
    names = [default_run_name(c) for c in configs]
    assert len(set(names)) == len(names), names
    # What tells two runs apart shows in the UI's run-name column (about 18 characters) when a few
    # options differ from the main job.
    shown = [default_run_name(main.override(v))[:18] for v in variants[1:8]]
    assert len(set(shown)) == len(shown), shown


def test_a_finished_run_leaves_no_checkpoint_tag_and_no_empty_checkpoint_folder(trained_run):
    uri, run = trained_run
    assert "alexnet_keras.checkpoint_dir" not in run.data.tags
    assert not (Path(uri.removeprefix("sqlite:///")).parent / "checkpoints").exists()


def test_a_tracking_failure_keeps_the_checkpoint_and_the_same_command_resumes(mlflow_store, monkeypatch, capsys):
    """The store fails after epoch 1 was checkpointed: the run ends KILLED (not FAILED, its checkpoint not
    deleted), the error says so, and the same command continues the same run from epoch 1."""
    from mlflow.exceptions import MlflowException

    from alexnet_keras.training import checkpoints, train

    def store_gone_after_epoch_1(model, data, config, backup_dir, **kwargs):
        model.optimizer.build(model.trainable_variables)   # a checkpoint holds the optimizer state too
        checkpoints.save(model, backup_dir, 1)
        raise MlflowException("the tracking server went away")

    with monkeypatch.context() as patched:
        patched.setattr(train, "fit", store_gone_after_epoch_1)
        assert cli.main(["train", *cli_flags(TINY)]) == 2
    assert "the tracking server went away" in capsys.readouterr().err
    (run,) = all_runs(mlflow_store)
    assert run.info.status == "KILLED"
    checkpoint = Path(run.data.tags["alexnet_keras.checkpoint_dir"])
    assert checkpoints.saved_epoch(checkpoint) == 1
    assert cli.main(["train", *cli_flags(TINY)]) == 0
    assert "resuming from the checkpoint of epoch 1 of 2" in capsys.readouterr().out
    (resumed,) = all_runs(mlflow_store)
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert not checkpoint.exists()


# --- what a new user meets: the source commit, the experiment's kind, the logged model's page ---------------

def git_checkout(folder: Path) -> str:
    """Make `folder` a git checkout with one commit (and a remote); its commit id."""
    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=folder,
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q", "-b", "main")
    git("remote", "add", "origin", "https://example.com/alexnet.git")
    git("commit", "-q", "--allow-empty", "-m", "start")
    return git("rev-parse", "HEAD")


def test_a_cli_run_in_a_git_checkout_records_its_commit(trained_run):
    uri, run = trained_run
    folder = Path(MlflowClient(uri).get_experiment(run.info.experiment_id).artifact_location).parent
    tags = run.data.tags
    assert tags["mlflow.source.git.commit"] == subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder,
                                                              capture_output=True, text=True).stdout.strip()
    assert tags["mlflow.source.git.branch"] == "main"
    assert tags["mlflow.source.git.repoURL"] == "https://example.com/alexnet.git"


def test_git_tags_that_mlflow_run_set_stay(mlflow_store, tmp_path, monkeypatch):
    from alexnet_keras import tracking

    git_checkout(tmp_path)
    client = MlflowClient()
    launched = client.create_run(mlflow.set_experiment("launched").experiment_id,
                                 tags={"mlflow.source.git.commit": "f" * 40}).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", launched)
    with tracking.run("launched"):
        pass
    tags = client.get_run(launched).data.tags
    assert tags["mlflow.source.git.commit"] == "f" * 40 and tags["mlflow.source.git.branch"] == "main"


def test_experiments_open_as_model_training_unless_given_another_kind(trained_run, mlflow_store):
    from alexnet_keras import tracking

    uri, run = trained_run
    assert MlflowClient(uri).get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == (
        "custom_model_development")
    client = MlflowClient()
    chosen = client.create_experiment("genai", tags={"mlflow.experimentKind": "genai_development"})
    tracking.preflight("genai")
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"


def test_mlflow_run_in_another_experiment_says_how_to_choose_it(mlflow_store, monkeypatch, capsys):
    from alexnet_keras import tracking

    launched = MlflowClient().create_run("0").info.run_id   # `mlflow run` without --experiment-name
    monkeypatch.setenv("MLFLOW_RUN_ID", launched)
    tracking.preflight("alexnet-keras")
    tracking.preflight("alexnet-keras")
    out = capsys.readouterr().out
    assert out.count("note: ") == 1
    assert "experiment 'Default'" in out and "--experiment-name alexnet-keras" in out
    assert MlflowClient().get_experiment("0").tags["mlflow.experimentKind"] == "custom_model_development"


def test_logged_model_has_a_description_datasets_and_linked_test_metrics(trained_run):
    uri, run = trained_run
    client = MlflowClient(uri)
    (output,) = client.get_run(run.info.run_id).outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert model.tags["mlflow.note.content"] == run.data.tags["mlflow.note.content"]
    linked = {m.key: m for m in model.metrics}
    for key in ("test_accuracy", "test_loss", "test_top5_accuracy"):
        assert linked[key].dataset_name == "synthetic-test" and linked[key].value == run.data.metrics[key], key
        assert linked[key].model_id == model.model_id and linked[key].step == 2
    assert linked["final_train_accuracy"].dataset_name == "synthetic-train"
    test_dataset = next(i.dataset for i in client.get_run(run.info.run_id).inputs.dataset_inputs
                        if i.dataset.name == "synthetic-test")
    assert linked["test_accuracy"].dataset_digest == test_dataset.digest
    for key in ("test_accuracy", "final_train_accuracy"):   # linking logs no second value on the run
        assert len(client.get_metric_history(run.info.run_id, key)) == 1, key
