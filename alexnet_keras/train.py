"""Training as small functions, ending in `train_and_evaluate(config)`: the one training path.

`prepare` (seeds, data, model, compile), `fit` (the training loop: `train`, a study's children, a
sweep's trials and the benchmark's throughput all go through it), `log_inputs` and `log_trained_model`
(what a run logs before and after training: `train` and the sweep's best model alike).

Order matters for "never a half-written run": the config is validated when it is built, then the
data are loaded and the model is built, and only then is an MLflow run opened. A bad option, a
missing dataset or an impossible model fails before anything is written to the store.

Resuming. Every epoch ends with a checkpoint (Keras `BackupAndRestore`: weights, optimizer state and
epoch) in CHECKPOINT_DIR/<run id>/. A run killed by Ctrl-C or SIGTERM ends KILLED and keeps it; one
killed outright (SIGKILL, out of memory) stays RUNNING until the next `train` in its experiment marks
it KILLED (tracking.mark_dead_runs). Running the same command again (same config and data digests)
continues that run: same run id, training from its last completed epoch, no metric step logged twice,
the same number of epochs in the end. Under `mlflow run`, whose launcher creates a new run every time
(and marks a killed child FAILED), the new run takes over the interrupted one's metric history and
checkpoint and the old run is deleted, so the experiment still shows one run. `--resume false` starts
afresh. The checkpoint is deleted when the run ends FINISHED or FAILED. Runs of a study (`ablate`)
or sweep (`tune`) are restarted by those commands instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import keras
import numpy as np

from . import distribute, figures, tracking
from .config import Config, TrainConfig
from .data import Data, enable_op_determinism, load_data
from .model import build_alexnet, summary_text
from .inference import model_metadata, ten_crop_metrics   # the paper recipe's hooks (see below)


@dataclasses.dataclass
class TrainResult:
    run_id: str
    metrics: dict[str, float]          # final test metrics and timings
    history: dict[str, list[float]]    # per-epoch Keras history


def set_global_state(train: TrainConfig) -> None:
    """Seeds (Python, NumPy, backend) and the dtype policy must be set before the model is built."""
    if train.deterministic:
        enable_determinism()
    keras.utils.set_random_seed(train.seed)
    keras.mixed_precision.set_global_policy(train.precision)


def enable_determinism() -> None:
    """`--deterministic`: deterministic kernels in every framework involved (seeds are always set).

    Runs are seeded without it too, and two CPU runs here were already bit-identical; what this adds
    is the guarantee, chiefly on GPUs, where atomics make cuDNN/XLA reductions order-dependent. Its cost
    is measured in docs/reliability.md. A TensorFlow op with no deterministic kernel then raises.
    """
    enable_op_determinism()   # TensorFlow: tf.data on every backend, and the model's ops on TensorFlow
    backend = keras.backend.backend()
    if backend == "jax":
        # Read when JAX starts its backend, which is after this (prepare() calls this before any jax op).
        flag = "--xla_gpu_deterministic_ops=true"
        if flag not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    elif backend == "torch":
        import torch

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # required by deterministic cuBLAS
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def build_optimizer(train: TrainConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """SGD with momentum, as in the paper; weight decay is an L2 term in the model (see model.py)."""
    learning_rate: Any = train.learning_rate
    if train.schedule == "cosine":
        learning_rate = keras.optimizers.schedules.CosineDecay(
            train.learning_rate, decay_steps=max(1, train.epochs * steps_per_epoch))
    return keras.optimizers.SGD(learning_rate=learning_rate, momentum=train.momentum)


def compile_model(model: keras.Model, config: Config, steps_per_epoch: int) -> keras.Model:
    top_k = min(5, model.output_shape[-1])
    jit = {"auto": "auto", "true": True, "false": False}[config.train.jit_compile]
    model.compile(
        optimizer=build_optimizer(config.train, steps_per_epoch),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
                 keras.metrics.SparseTopKCategoricalAccuracy(k=top_k, name="top5_accuracy")],
        jit_compile=jit,
    )
    return model


def build_callbacks(config: Config, backup_dir: Path | None = None, *,
                    track: bool = True) -> list[keras.callbacks.Callback]:
    """NaN stop, per-epoch metrics to the active run (unless not `track`), checkpoints in `backup_dir`,
    and the plateau schedule."""
    callbacks: list[keras.callbacks.Callback] = [keras.callbacks.TerminateOnNaN()]
    if track:
        callbacks.append(tracking.epoch_metrics_callback(skip_logged_steps=backup_dir is not None))
    if backup_dir is not None:
        # After the metrics: a kill between the two re-trains that epoch, whose step is then not
        # logged again (skip_logged_steps), rather than skipping an epoch whose metrics were never logged.
        # double_checkpoint: a checkpoint torn by the kill falls back to the previous epoch's.
        callbacks.append(keras.callbacks.BackupAndRestore(str(backup_dir), double_checkpoint=True,
                                                          delete_checkpoint=False))
    if config.train.schedule == "plateau":
        # The paper divided the learning rate by 10 "when the validation error rate stopped improving".
        callbacks.append(keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=0.1, patience=config.train.plateau_patience,
            min_lr=config.train.learning_rate * 1e-3, verbose=1))
    return callbacks


def prepare(config: Config) -> tuple[Data, keras.Model]:
    """Everything that can fail on bad input, done before a run exists."""
    if config.train.deterministic:
        enable_determinism()   # before any framework starts its devices (XLA reads its flags then)
    # Data parallelism (distribute.py, --distribute): the engine is created first, because
    # MultiWorkerMirroredStrategy must exist before TensorFlow runs any op; the model is built and
    # compiled in its scope. batch_size stays the global batch and the learning rate is not scaled.
    dist = distribute.setup(config.train)
    set_global_state(config.train)
    data = load_data(config.data, image_size=config.model.input_size, batch_size=config.train.batch_size,
                     seed=config.train.seed)
    data = distribute.adapt_data(data, dist)   # JAX shards need batches that split evenly
    with dist.scope():
        model = build_alexnet(config.model, num_classes=data.num_classes, input_mean=data.mean,
                              input_std=data.std)
        return data, compile_model(model, config, data.steps_per_epoch)


def checkpoint_epoch(backup_dir: Path | None) -> int:
    """Epochs completed according to the checkpoint in `backup_dir` (0 when there is none)."""
    try:
        return int(json.loads((backup_dir / "training_metadata.json").read_text())["epoch"])
    except (TypeError, OSError, ValueError, KeyError):
        return 0


def fit(model: keras.Model, data: Data, config: Config, backup_dir: Path | None = None, *,
        callbacks: Sequence[keras.callbacks.Callback] = (), epochs: int | None = None, initial_epoch: int = 0,
        steps_per_epoch: int | None = None, verbose: int | None = None,
        track: bool = True) -> tuple[dict[str, list[float]], float, int]:
    """Train to `epochs` (default: the config's) from `initial_epoch`, or from the checkpoint in
    `backup_dir`: the one training loop of `train`, the study's children, the sweep's trials (which
    add keras-tuner's `callbacks` and, under hyperband, their own epochs) and the benchmark's throughput
    (`steps_per_epoch` of a repeated pipeline, no validation when `data.val` is None). A loss that
    turns NaN or infinite stops it with FloatingPointError. `track=False` logs no per-epoch metrics to
    the active run. Returns this call's Keras history, its seconds, and the epoch it started from."""
    epochs = epochs or config.train.epochs
    if verbose is None:
        verbose = 1 if sys.stdout.isatty() else 2   # a progress bar on a terminal, a line per epoch in logs
    resumed = min(checkpoint_epoch(backup_dir), epochs)
    if resumed:
        print(f"resuming from the checkpoint of epoch {resumed} of {epochs} in {backup_dir}", flush=True)
    start_epoch = max(initial_epoch, resumed)
    start = time.perf_counter()
    # shuffle=False: the tf.data pipeline already reshuffles every epoch (Keras would only warn).
    # BackupAndRestore moves a resumed fit to its checkpoint's epoch itself.
    history = model.fit(data.train, validation_data=data.val, epochs=epochs, initial_epoch=initial_epoch,
                        steps_per_epoch=steps_per_epoch, callbacks=[*build_callbacks(config, backup_dir, track=track),
                                                                    *callbacks],
                        verbose=verbose, shuffle=False)
    seconds = time.perf_counter() - start
    loss = history.history["loss"][-1] if history.epoch else 0.0
    if start_epoch + len(history.epoch) < epochs or not np.isfinite(loss):   # TerminateOnNaN
        raise FloatingPointError(f"training diverged (loss {loss}) at epoch {start_epoch + len(history.epoch)}; "
                                 f"try a smaller --learning-rate than {config.train.learning_rate}.")
    return {k: [float(v) for v in values] for k, values in history.history.items()}, seconds, start_epoch


def timing_metrics(history: dict[str, list[float]], seconds: float) -> dict[str, float]:
    """This process's training time, in all and per epoch trained."""
    return {"train_time_s": seconds, "epoch_time_s": seconds / max(1, len(history.get("loss", [])))}


def evaluate(model: keras.Model, data: Data) -> tuple[dict[str, float], np.ndarray]:
    """Test-set metrics (the only use of the test split) and the predicted class of each test image."""
    results = model.evaluate(data.test, return_dict=True, verbose=0)
    probabilities = model.predict(data.test, verbose=0)
    metrics = {f"test_{k}": float(v) for k, v in results.items()}
    return metrics, np.argmax(probabilities, axis=-1)


def log_evaluation(data: Data, predictions: np.ndarray, history: dict[str, list[float]], title: str) -> None:
    from sklearn.metrics import classification_report

    labels = data.test_labels
    names = list(data.class_names)
    indices = list(range(len(names)))
    report = classification_report(labels, predictions, labels=indices, target_names=names, digits=4,
                                   zero_division=0)
    tracking.log_text(report, "reports/classification_report.txt")
    tracking.log_dict(classification_report(labels, predictions, labels=indices, target_names=names,
                                            output_dict=True, zero_division=0),
                      "reports/classification_report.json")
    tracking.log_figure(figures.confusion_matrix(labels, predictions, names, title=title),
                        "figures/confusion_matrix.png")
    tracking.log_figure(figures.learning_curves(history, title=title), "figures/learning_curves.png")


def run_tags(config: Config, data: Data, model: keras.Model) -> dict[str, str]:
    return {
        **tracking.environment_tags(),
        tracking.CONFIG_DIGEST_TAG: config.digest(),
        tracking.DATA_DIGEST_TAG: data.digest,
        tracking.VARIANT_NAME_TAG: config.model.variant,
        tracking.NUM_PARAMS_TAG: str(model.count_params()),
    }


def checkpoint_dir_of(run) -> Path:
    """Where `run` keeps (or kept) its training checkpoint."""
    return Path(run.data.tags[tracking.CHECKPOINT_DIR_TAG])


def resumable_run(config: Config, tags: dict[str, str]):
    """The interrupted run this command continues (see "Resuming" above), or None; `tags` are this
    run's (run_tags), whose config and data digests the interrupted run must share."""
    for run_id in tracking.mark_dead_runs(config.experiment):
        print(f"marked run {run_id} KILLED: the process training it is gone", flush=True)
    if not config.resume:
        return None
    match = {k: tags[k] for k in (tracking.CONFIG_DIGEST_TAG, tracking.DATA_DIGEST_TAG)}
    # The digest leaves the name out; `--run-name b` does not continue run "a".
    found = tracking.find_resumable_run(config.experiment, match, run_name=config.run_name)
    if found is not None:
        print(f"continuing run {found.info.run_id} ({found.info.status} after "
              f"{checkpoint_epoch(checkpoint_dir_of(found))} of {config.train.epochs} epochs); pass --resume "
              f"false to start a new run instead", flush=True)
    return found


def train_and_evaluate(config: Config, *, tags: dict[str, str] | None = None,
                       parent_run_id: str | None = None) -> TrainResult:
    """Train one AlexNet as described by `config`, log everything to MLflow, return the test metrics."""
    tracking.preflight(config.experiment)   # an unusable store fails now, not after the training
    data, model = prepare(config)
    summary = summary_text(model)
    print(summary)
    title = config.run_name or f"{config.model.variant} lrn={config.model.lrn} bn={config.model.batchnorm}"
    all_tags = {**run_tags(config, data, model), **(tags or {})}
    # Top-level runs only: a study's children and a sweep's trials are restarted by ablate / tune.
    previous = resumable_run(config, all_tags) if parent_run_id is None else None
    # Under `mlflow run` the launcher has created this process's run already: the previous run's
    # history and checkpoint move into it (tracking.adopt_run). Otherwise the previous run itself resumes.
    launched = "MLFLOW_RUN_ID" in os.environ
    backup_dir = None
    try:
        with tracking.run(config.experiment, run_name=config.run_name, params=config.flat(),
                          tags=all_tags, parent_run_id=parent_run_id,
                          run_id=previous.info.run_id if previous is not None and not launched else None) as active:
            run_id = active.info.run_id
            if parent_run_id is None:
                backup_dir = Path(config.checkpoint_dir, run_id).resolve()
                if previous is not None and launched:
                    tracking.adopt_run(previous.info.run_id)
                    old = checkpoint_dir_of(previous)
                    if old.is_dir():
                        backup_dir.parent.mkdir(parents=True, exist_ok=True)
                        os.replace(old, backup_dir)
                tracking.set_tags({tracking.CHECKPOINT_DIR_TAG: str(backup_dir)})
            result = _train_in_run(config, data, model, summary, title, run_id, backup_dir)
    except KeyboardInterrupt:
        raise   # KILLED: the checkpoint stays for the next run of the same command
    except BaseException:
        _remove_checkpoint(backup_dir)
        raise
    _remove_checkpoint(backup_dir)
    return result


def _remove_checkpoint(backup_dir: Path | None) -> None:
    if backup_dir is not None:
        shutil.rmtree(backup_dir, ignore_errors=True)


def log_inputs(config: Config, data: Data, model: keras.Model, summary: str | None = None) -> None:
    """What a run trains on, logged on the active run before it trains: the model summary, the resolved
    config, the data description (class names and the preprocessing `predict` applies to a file), the
    paper recipe's statistics, the datasets, the parameter count and the unreadable files skipped."""
    tracking.log_text(summary if summary is not None else summary_text(model), "model/summary.txt")
    tracking.log_dict(config.to_dict(), "config.yaml")
    tracking.log_dict({"class_names": list(data.class_names), "mean": data.mean, "std": data.std,
                       "counts": data.counts, "image_size": data.image_size, "source": data.source,
                       "preprocessing": data.preprocessing},
                      "data.json")
    tracking.log_preprocessing(data)   # paper recipe: colour PCA / mean statistics, mean image
    for split, context in (("train", "training"), ("val", "validation"), ("test", "test")):
        tracking.log_dataset(f"{config.data.dataset}-{split}", data.source, data.digest, context,
                             data.counts[split])
    tracking.log_metrics_once({"num_params": model.count_params(), "skipped_files": data.counts["skipped"]})


def log_trained_model(model: keras.Model, data: Data, history: dict[str, list[float]], *, title: str,
                      metrics: dict[str, float] | None = None, step: int | None = None) -> dict[str, float]:
    """A trained model and its evaluation, logged on the active run: the test metrics (plus `metrics`,
    at `step`), the classification report, confusion matrix and learning curves, and the model itself
    with the class names and preprocessing `predict` needs. Shared by `train` and the sweep's best
    model. Returns the metrics logged."""
    test_metrics, predictions = evaluate(model, data)
    test_metrics.update(ten_crop_metrics(model, data))   # paper recipe: test_10crop_*; else nothing
    logged = {**test_metrics, **(metrics or {})}
    tracking.log_metrics(logged, step=step)
    log_evaluation(data, predictions, history, title)
    example = next(iter(data.val.take(1)))[0].numpy()[:4]
    # Class names and preprocessing travel with the logged model (its MLmodel metadata), for `predict`.
    tracking.log_keras_model(model, example, metadata=model_metadata(data))
    tracking.flush()
    return logged


def _train_in_run(config: Config, data: Data, model: keras.Model, summary: str, title: str, run_id: str,
                  backup_dir: Path | None) -> TrainResult:
    log_inputs(config, data, model, summary)
    history, train_seconds, initial_epoch = fit(model, data, config, backup_dir)
    timing = timing_metrics(history, train_seconds)   # this process's training
    if initial_epoch:   # the whole training, across the processes that trained this run
        history = tracking.epoch_history(run_id)
        tracking.set_tags({tracking.RESUMED_FROM_EPOCH_TAG: str(initial_epoch)})
    metrics = log_trained_model(model, data, history, title=title,
                                metrics={**timing, "final_train_accuracy": history["accuracy"][-1]})
    print(f"run {run_id}: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    return TrainResult(run_id=run_id, metrics=metrics, history=history)
