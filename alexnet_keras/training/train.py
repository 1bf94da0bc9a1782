"""Training as small functions, ending in `train_and_evaluate(config)`: the one training path.

`prepare` (seeds, data, model, compile), `fit` (the training loop: `train`, a study's children, a
sweep's trials and the benchmark's throughput all go through it), `log_inputs` and `log_trained_model`
(what a run logs before and after training: `train` and the sweep's best model alike).

Order matters for "never a half-written run": the config is validated when it is built, then the
data are loaded and the model is built, and only then is an MLflow run opened. A bad option, a
missing dataset or an impossible model fails before anything is written to the store.

Resuming. Every epoch ends with a checkpoint (checkpoints.py: weights, optimizer state and epoch,
written so that no failure leaves a damaged one) in CHECKPOINT_DIR/<run id>/, a folder probed before
the run opens. A run killed by Ctrl-C or SIGTERM ends KILLED and keeps it; one
killed outright (SIGKILL, out of memory) stays RUNNING until the next `train` in its experiment marks
it KILLED (tracking.mark_dead_runs). Running the same command again (same config and data digests)
continues that run: same run id, training from its last completed epoch, no metric step logged twice,
the same number of epochs in the end. Under `mlflow run`, whose launcher creates a new run every time
(and marks a killed child FAILED), the new run takes over the interrupted one's metric history and
checkpoint and the old run is deleted, so the experiment still shows one run. `--resume false` starts
afresh. The checkpoint is deleted when the run ends FINISHED or FAILED, with two exceptions that keep
it and end the run FAILED, resumable by the same command: a checkpoint that could not be written (a
full disk: the previous epoch's stays) and a training that finished but whose results could not be
logged (ResultsNotLogged: the re-run finds every epoch done and only evaluates and logs). A study's
child or a sweep's trial has no checkpoint; its trained model is then saved as a .keras file instead.
Runs of a study (`ablate`) or sweep (`tune`) are restarted by those commands.

Readable runs: a `train` run without --run-name is named for what it is (`default_run_name`:
`cifar-lrn-bn0-pool3s2-do0.5-s0`), every training run carries a one-paragraph description
(`run_description`, the run page's "Description") and MLflow's system metrics (`--system-metrics`,
tracking.py). `--register NAME` registers the finished run's model (serving.register_model, alias
champion); the name is checked before any data is read.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import keras
import numpy as np

from . import checkpoints, distribute
from .. import figures, tracking
from ..config import POOL_SIZES, Config, TrainConfig
from ..data import Data, enable_op_determinism, load_data
from ..model.alexnet import build_alexnet, lrn_diagnostics, summary_text
from ..model.inference import model_metadata, ten_crop_metrics   # the paper recipe's hooks (see below)


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


def learning_rate_schedule(train: TrainConfig, steps_per_epoch: int) -> Any:
    """The optimizer's learning rate: a float, or a Keras schedule of the optimizer step. The plateau
    schedule is a callback instead (build_callbacks): it reacts to the validation loss."""
    total = max(1, train.epochs * steps_per_epoch)
    if train.schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(train.learning_rate, decay_steps=total)
    if train.schedule == "step":
        # Drops after E/2 and 3E/4 epochs' worth of optimizer steps (rounded down; Keras keeps a value
        # through its boundary step). docs/ablations.md asks whether the last fifth, at lr/100, still moves.
        return keras.optimizers.schedules.PiecewiseConstantDecay(
            boundaries=[total // 2, total * 3 // 4],
            values=[train.learning_rate, train.learning_rate / 10, train.learning_rate / 100])
    return train.learning_rate


def build_optimizer(train: TrainConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """SGD with momentum, as in the paper; weight decay is an L2 term in the model (see model.py)."""
    return keras.optimizers.SGD(learning_rate=learning_rate_schedule(train, steps_per_epoch),
                                momentum=train.momentum)


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
        callbacks.append(checkpoints.EpochCheckpoint(backup_dir))
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
    # tf.data may hand batches over out of order (faster) unless --deterministic asks for bit-identical runs.
    data = load_data(config.data, image_size=config.model.input_size, batch_size=config.train.batch_size,
                     seed=config.train.seed, deterministic=config.train.deterministic)
    data = distribute.adapt_data(data, dist)   # JAX shards need batches that split evenly
    with dist.scope():
        model = build_alexnet(config.model, num_classes=data.num_classes, input_mean=data.mean,
                              input_std=data.std)
        return data, compile_model(model, config, data.steps_per_epoch)


def checkpoint_epoch(backup_dir: Path | None) -> int:
    """Epochs completed according to the checkpoint in `backup_dir` (0 when there is none)."""
    return checkpoints.saved_epoch(backup_dir)


def fit(model: keras.Model, data: Data, config: Config, backup_dir: Path | None = None, *,
        callbacks: Sequence[keras.callbacks.Callback] = (), epochs: int | None = None, initial_epoch: int = 0,
        steps_per_epoch: int | None = None, verbose: int | None = None,
        track: bool = True) -> tuple[dict[str, list[float]], float, int]:
    """Train to `epochs` (default: the config's) from `initial_epoch`, or from the checkpoint in
    `backup_dir`: the one training loop of `train`, the study's children, the sweep's trials (which
    add keras-tuner's `callbacks` and, under hyperband, their own epochs) and the benchmark's throughput
    (`steps_per_epoch` of a repeated pipeline, no validation when `data.val` is None). A loss that
    turns NaN or infinite stops it with FloatingPointError. With `track` (an active run and a validation
    split) a model with LRN layers also logs how much they normalise, before the first step and after the last
    (log_lrn_diagnostics). `track=False` logs no per-epoch metrics to the active run. Returns this
    call's Keras history, its seconds, and the epoch it started from."""
    epochs = epochs or config.train.epochs
    if verbose is None:
        verbose = 1 if sys.stdout.isatty() else 2   # a progress bar on a terminal, a line per epoch in logs
    resumed = min(checkpoints.restore(model, backup_dir), epochs)   # weights and optimizer state
    if resumed == epochs:
        # Trained to the end before (then interrupted, or its results not logged): nothing to train,
        # time or diagnose again; the caller evaluates and logs.
        print(f"the checkpoint in {backup_dir} holds all {epochs} epochs: nothing left to train", flush=True)
        return {}, 0.0, resumed
    if resumed:
        print(f"resuming from the checkpoint of epoch {resumed} of {epochs} in {backup_dir}", flush=True)
    start_epoch = max(initial_epoch, resumed)
    # How much each LRN layer normalises, before the first step and after the last, on one fixed batch
    # (a resumed run logged its start values before its first step, in the process it began in).
    probe = lrn_probe_images(data) if track and tracking.active_run_id() else None
    if not resumed:
        log_lrn_diagnostics(model, probe, "start")
    start = time.perf_counter()
    # shuffle=False: the tf.data pipeline already reshuffles every epoch (Keras would only warn).
    history = model.fit(data.train, validation_data=data.val, epochs=epochs, initial_epoch=start_epoch,
                        steps_per_epoch=steps_per_epoch, callbacks=[*build_callbacks(config, backup_dir, track=track),
                                                                    *callbacks],
                        verbose=verbose, shuffle=False)
    seconds = time.perf_counter() - start
    loss = history.history["loss"][-1] if history.epoch else 0.0
    if start_epoch + len(history.epoch) < epochs or not np.isfinite(loss):   # TerminateOnNaN
        raise FloatingPointError(f"training diverged (loss {loss}) at epoch {start_epoch + len(history.epoch)}; "
                                 f"try a smaller --learning-rate than {config.train.learning_rate}.")
    log_lrn_diagnostics(model, probe, "end")
    return {k: [float(v) for v in values] for k, values in history.history.items()}, seconds, start_epoch


LRN_PROBE_IMAGES = 64   # the fixed batch of the LRN diagnostic
# Logged per LRN layer as `<layer>_<statistic>_<start|end>` (lrn1_ratio_mean_start ...); model.lrn_diagnostics
# says what each is. Its constant_scale (k ** -beta) is a config value, so it is left out.
LRN_STATISTICS = ("ratio_mean", "ratio_p95", "scale_mean", "scale_min", "scale_max", "relative_scale_mean",
                  "relative_scale_min")


def lrn_probe_images(data: Data, count: int = LRN_PROBE_IMAGES) -> np.ndarray | None:
    """The first `count` images of the validation split (in its fixed order, never augmented): the
    batch the LRN diagnostic reads at the start and at the end of training. None without a validation
    split."""
    if data.val is None:
        return None
    batches = [np.asarray(images) for images, *_ in data.val.take(-(-count // data.batch_size))]
    return np.concatenate(batches)[:count] if batches else None


def log_lrn_diagnostics(model: keras.Model, images: np.ndarray | None, when: str) -> dict[str, float]:
    """model.lrn_diagnostics on `images`, logged on the active run as `<layer>_<statistic>_<when>` for
    each LRN layer (when: "start" or "end"), once: a resumed run keeps the values it logged first (its
    weights are restored only inside Keras' fit, so its "start" would not be the start). Nothing for a
    model without LRN, or without `images`. Returns the values computed."""
    if images is None:
        return {}
    metrics = {f"{layer}_{name}_{when}": value for layer, values in lrn_diagnostics(model, images).items()
               for name, value in values.items() if name in LRN_STATISTICS}
    if metrics:
        tracking.log_metrics_once(metrics)
    return metrics


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


def run_tags(config: Config, data: Data, model: keras.Model,
             context: Mapping[str, str] | None = None) -> dict[str, str]:
    """The tags of a training run: environment, digests, and its description (`run_description`, for
    which `context` holds the run's study or sweep tags, if any)."""
    return {
        **tracking.environment_tags(),
        tracking.CONFIG_DIGEST_TAG: config.digest(),
        tracking.DATA_DIGEST_TAG: data.digest,
        tracking.VARIANT_NAME_TAG: config.model.variant,
        tracking.NUM_PARAMS_TAG: str(model.count_params()),
        tracking.NOTE_TAG: run_description(config, data, context),
    }


def default_run_name(config: Config) -> str:
    """The name of a `train` run given no --run-name: what it is at a glance, in the order variant,
    normalisation (a toggle's name when on, with 0 when off), pooling (window s stride), dropout,
    activation (only when not relu), seed: `cifar-lrn-bn0-pool3s2-do0.5-s0`; BN without LRN and tanh:
    `paper-lrn0-bn-pool2s2-do0-tanh-s1`. Everything else is in the params and the description."""
    m = config.model
    parts = [m.variant, "lrn" if m.lrn else "lrn0", "bn" if m.batchnorm else "bn0",
             f"pool{POOL_SIZES[m.pool]}s2", f"do{m.dropout:g}"]
    if m.activation != "relu":
        parts.append(m.activation)
    return "-".join([*parts, f"s{config.train.seed}"])


def run_description(config: Config, data: Data, context: Mapping[str, str] | None = None) -> str:
    """One paragraph for the run page's description (mlflow.note.content): the network and its
    toggles, the data, the training, and, for a study's child or a sweep's trial (`context`: its tags),
    which study, variant and seed or which sweep and trial."""
    m, d, t = config.model, config.data, config.train
    context = context or {}
    size = f"{m.input_size} px input" + (f", width {m.width:g}" if m.width != 1 else "") + (
        ", two-GPU groups" if m.groups == 2 else "")
    pool = "overlapping 3x3/2" if m.pool == "overlapping" else "non-overlapping 2x2/2"
    on = {True: "on", False: "off"}
    augment = "augmented" if d.augment else "no augmentation"
    source = f"{data.source}; " if data.source != d.dataset else ""
    text = (f"AlexNet ({m.variant} variant, {size}) trained on {d.dataset} ({source}"
            f"{data.counts['train']} training, {data.counts['val']} validation, {data.counts['test']} test "
            f"images; {d.recipe} recipe, {augment}) for {t.epochs} epochs: SGD, learning rate "
            f"{t.learning_rate:g} ({t.schedule}), momentum {t.momentum:g}, batch {t.batch_size}, seed {t.seed}. "
            f"Toggles: LRN {on[m.lrn]}, batch norm {on[m.batchnorm]}, {pool} max-pooling, dropout "
            f"{m.dropout:g}, {m.activation}, {m.init} init, weight decay {m.weight_decay:g}.")
    if tracking.STUDY_TAG in context:
        text += (f" Child run of ablation study {context[tracking.STUDY_TAG]!r}: variant "
                 f"{context.get(tracking.VARIANT_TAG, '?')!r}, seed {context.get(tracking.SEED_TAG, t.seed)}.")
    elif tracking.SWEEP_TAG in context:
        text += (f" Trial {context.get(tracking.TRIAL_TAG, '?')} of hyperparameter sweep "
                 f"{context[tracking.SWEEP_TAG]!r}.")
    return text


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
    register = config.register if parent_run_id is None else None   # children: ablate registers the best
    if register:
        from ..serving import check_model_name

        check_model_name(register)   # a bad name fails now, not after the training
    tracking.preflight(config.experiment)   # an unusable store fails now, not after the training
    if parent_run_id is None:
        checkpoints.probe(Path(config.checkpoint_dir))   # so does a checkpoint folder that cannot be written
    data, model = prepare(config)
    summary = summary_text(model)
    print(summary)
    title = config.run_name or f"{config.model.variant} lrn={config.model.lrn} bn={config.model.batchnorm}"
    all_tags = {**run_tags(config, data, model, context=tags), **(tags or {})}
    name = config.run_name
    if parent_run_id is None:   # under `mlflow run` the launcher named the run: the tag renames it
        name = name or default_run_name(config)
        all_tags[tracking.RUN_NAME_TAG] = name
    # Top-level runs only: a study's children and a sweep's trials are restarted by ablate / tune.
    previous = resumable_run(config, all_tags) if parent_run_id is None else None
    if previous is not None:   # a damaged checkpoint fails now, leaving the interrupted run as it is
        checkpoints.restore(model, checkpoint_dir_of(previous))
    # Under `mlflow run` the launcher has created this process's run already: the previous run's
    # history and checkpoint move into it (tracking.adopt_run). Otherwise the previous run itself resumes.
    launched = "MLFLOW_RUN_ID" in os.environ
    backup_dir = None
    try:
        with tracking.run(config.experiment, run_name=name, params=config.flat(),
                          tags=all_tags, parent_run_id=parent_run_id, system_metrics=config.system_metrics,
                          run_id=previous.info.run_id if previous is not None and not launched else None) as active:
            run_id = active.info.run_id
            if parent_run_id is None:
                backup_dir = Path(config.checkpoint_dir, run_id).resolve()
                if previous is not None and launched:
                    tracking.adopt_run(previous.info.run_id)
                old = checkpoint_dir_of(previous) if previous is not None else None
                if old is not None and old.is_dir() and old.resolve() != backup_dir:
                    # The checkpoint goes along: into the run `mlflow run` made, or into another
                    # --checkpoint-dir (say the first one's disk is full).
                    backup_dir.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(old, backup_dir)
                tracking.set_tags({tracking.CHECKPOINT_DIR_TAG: str(backup_dir)})
            result = _train_in_run(config, data, model, summary, title, run_id, backup_dir)
    except KeyboardInterrupt:
        raise   # KILLED: the checkpoint stays for the next run of the same command
    except (ResultsNotLogged, checkpoints.CheckpointError) as err:
        # FAILED, and what was trained stays for the same command to continue from (see "Resuming").
        if isinstance(err, checkpoints.CheckpointError) and not checkpoint_epoch(backup_dir):
            _remove_checkpoint(backup_dir)   # no epoch was saved: nothing to continue from
        raise
    except BaseException:
        _remove_checkpoint(backup_dir)
        raise
    _remove_checkpoint(backup_dir)
    if register:
        register_trained_model(result.run_id, register, description=all_tags[tracking.NOTE_TAG])
    return result


def register_trained_model(run_id: str, name: str, description: str | None = None) -> None:
    """`train --register NAME`: the FINISHED run's model as a new version of NAME, alias champion, with
    the run's `description`. A failure here (the store) leaves the run as it is: FINISHED, model logged."""
    from ..serving import DEFAULT_ALIAS, register_model

    version = register_model(run_id, name, origin="train", description=description)
    print(f"registered the model of run {run_id} as {name!r} version {version.version}: "
          f"models:/{name}@{DEFAULT_ALIAS}", flush=True)


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
                      metrics: dict[str, float] | None = None, step: int | None = None,
                      once: bool = False) -> dict[str, float]:
    """A trained model and its evaluation, logged on the active run: the test metrics (plus `metrics`,
    at `step`), the classification report, confusion matrix and learning curves, and the model itself
    with the class names and preprocessing `predict` needs. Shared by `train` and the sweep's best
    model. `once`: metrics the run holds already are not logged again (a resumed run whose first
    process was stopped after logging them). Returns the metrics computed."""
    test_metrics, predictions = evaluate(model, data)
    test_metrics.update(ten_crop_metrics(model, data))   # paper recipe: test_10crop_*; else nothing
    logged = {**test_metrics, **(metrics or {})}
    if once:
        tracking.log_metrics_once(logged)
    else:
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
    try:
        # This process's training time, logged before the evaluation so that stopping that keeps it; a
        # resumed run with no epoch left trained none, and logs none.
        timing = timing_metrics(history, train_seconds) if history else {}
        if timing:
            tracking.log_metrics(timing)
        if initial_epoch:   # the whole training, across the processes that trained this run
            history = tracking.epoch_history(run_id)
            tracking.set_tags({tracking.RESUMED_FROM_EPOCH_TAG: str(initial_epoch)})
        metrics = log_trained_model(model, data, history, title=title, once=bool(initial_epoch),
                                    metrics={"final_train_accuracy": history["accuracy"][-1]})
    except Exception as err:   # the weights are trained: keep them (Ctrl-C keeps the checkpoint anyway)
        raise results_not_logged(err, model, data, config, run_id, backup_dir) from err
    metrics = {**timing, **metrics}
    print(f"run {run_id}: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    return TrainResult(run_id=run_id, metrics=metrics, history=history)


class ResultsNotLogged(RuntimeError):
    """Training finished, but what follows it (evaluation, reports, figures, the model) failed. The
    trained weights are kept; the message says where, and how to log them."""


def results_not_logged(err: Exception, model: keras.Model, data: Data, config: Config, run_id: str,
                       backup_dir: Path | None) -> ResultsNotLogged:
    """The error for `err`, raised after training, once the trained weights are safe: the run's
    checkpoint, which the same command finds and then only evaluates and logs, else (a study's child,
    a sweep's trial) the model saved as a .keras file in the checkpoint folder or a temporary one."""
    cause = f"{type(err).__name__}: {checkpoints.one_line(err)}"
    if checkpoint_epoch(backup_dir) >= config.train.epochs:
        kept = (f"The trained weights are kept in {backup_dir}: once that is fixed, run the same command again; "
                f"it continues run {run_id} from them and only evaluates and logs it.")
    else:
        path = checkpoints.keep_model(model, model_metadata(data), [Path(config.checkpoint_dir, run_id).resolve()])
        kept = (f"The trained model is kept as {path} (`alexnet-keras predict --model {path}` uses it)." if path
                else "The trained weights could not be kept anywhere either.")
    return ResultsNotLogged(f"training finished, but logging its results failed ({cause}). {kept}")
