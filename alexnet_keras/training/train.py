"""Training as small functions, ending in `train_and_evaluate(config)`, the one training path; `fit` is
the loop of `train`, a study's children, a sweep's trials and the benchmark. Bad input fails before an
MLflow run opens; docs/reliability.md says what survives which failure."""

import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import keras
import numpy as np

from . import checkpoints, distribute
from .. import figures, tracking
from ..tables import confusion_rows, csv_text
from ..config import MAIN_JOB, Config, TrainConfig
from ..data import Data, enable_op_determinism, load_data
from ..model.alexnet import build_alexnet, lrn_diagnostics, summary_text
from ..model.inference import model_metadata, ten_crop_metrics


@dataclasses.dataclass
class TrainResult:
    run_id: str
    metrics: dict[str, float]          # test metrics and timings
    history: dict[str, list[float]]    # per-epoch metrics, across every process that trained the run


def set_global_state(train: TrainConfig) -> None:
    """Seeds (Python, NumPy, backend) and the dtype policy must be set before the model is built."""
    if train.deterministic:
        enable_determinism()
    keras.utils.set_random_seed(train.seed)
    keras.mixed_precision.set_global_policy(train.precision)


def enable_determinism() -> None:
    """`--deterministic`: deterministic kernels in every framework involved (docs/reliability.md)."""
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
    """The optimizer's learning rate: a float, or a Keras schedule (plateau: a callback, build_callbacks)."""
    total = max(1, train.epochs * steps_per_epoch)
    if train.schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(train.learning_rate, decay_steps=total)
    if train.schedule == "step":
        # Drops after E/2 and 3E/4 epochs' worth of steps (Keras keeps a value through its boundary step).
        return keras.optimizers.schedules.PiecewiseConstantDecay(
            boundaries=[total // 2, total * 3 // 4],
            values=[train.learning_rate, train.learning_rate / 10, train.learning_rate / 100])
    return train.learning_rate


def build_optimizer(train: TrainConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """SGD with momentum, as in the paper; weight decay is an L2 term in the model (see model.py)."""
    return keras.optimizers.SGD(learning_rate=learning_rate_schedule(train, steps_per_epoch),
                                momentum=train.momentum)


def compile_model(model: keras.Model, config: Config, steps_per_epoch: int) -> keras.Model:
    model.compile(optimizer=build_optimizer(config.train, steps_per_epoch),
                  loss=keras.losses.SparseCategoricalCrossentropy(),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
                           keras.metrics.SparseTopKCategoricalAccuracy(k=min(5, model.output_shape[-1]),
                                                                       name="top5_accuracy")],
                  jit_compile={"auto": "auto", "true": True, "false": False}[config.train.jit_compile])
    return model


def build_callbacks(config: Config, backup_dir: Path | None = None, *,
                    track: bool = True) -> list[keras.callbacks.Callback]:
    """NaN stop, per-epoch metrics (with `track`), the checkpoint in `backup_dir`, the plateau schedule."""
    callbacks: list[keras.callbacks.Callback] = [keras.callbacks.TerminateOnNaN()]
    unlogged: list = []   # metrics a store outage left unwritten: the checkpoint keeps them
    if track:
        callbacks.append(tracking.epoch_metrics_callback(skip_logged_steps=backup_dir is not None, unlogged=unlogged))
    if backup_dir is not None:
        # After the metrics: a kill between the two trains that epoch again, and its step, logged
        # already, is skipped; the other order would leave an epoch whose metrics were never logged.
        callbacks.append(checkpoints.Checkpoint(backup_dir, unlogged))
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
    dist = distribute.setup(config.train)   # before any TensorFlow op: MultiWorkerMirroredStrategy needs that
    set_global_state(config.train)
    data = load_data(config.data, image_size=config.model.input_size, batch_size=config.train.batch_size,
                     seed=config.train.seed, deterministic=config.train.deterministic)
    data = distribute.adapt_data(data, dist)   # JAX shards need batches that split evenly
    with dist.scope():
        model = build_alexnet(config.model, num_classes=data.num_classes, input_mean=data.mean,
                              input_std=data.std)
        return data, compile_model(model, config, data.steps_per_epoch)


def fit(model: keras.Model, data: Data, config: Config, backup_dir: Path | None = None, *,
        callbacks: Sequence[keras.callbacks.Callback] = (), epochs: int | None = None, initial_epoch: int = 0,
        steps_per_epoch: int | None = None, verbose: int | None = None,
        track: bool = True) -> tuple[dict[str, list[float]], float, int]:
    """Train to `epochs` (default: the config's) from `initial_epoch` or the checkpoint in `backup_dir`; a
    NaN loss raises FloatingPointError. With `track` (and an active run) it logs per-epoch metrics and the
    LRN diagnostics. Returns the history, seconds, and start epoch."""
    epochs = epochs or config.train.epochs
    if verbose is None:
        verbose = 1 if sys.stdout.isatty() else 2   # a progress bar on a terminal, a line per epoch in logs
    # --train-eval-images: fixed un-augmented training images in inference mode (no dropout), unlike Keras'
    # running `accuracy`; first, so that the metrics callback and History see its train_eval_* in the logs.
    scored = [keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: logs.update({
        f"train_eval_{k}": float(v) for k, v in model.evaluate(data.train_eval, return_dict=True, verbose=0).items()
    }))] if data.train_eval is not None else []
    callbacks = [*scored, *build_callbacks(config, backup_dir, track=track), *callbacks]
    probe = lrn_probe_images(data) if track and tracking.active_run_id() else None
    log_lrn_diagnostics(model, probe, 0)   # once: a resumed run keeps those of its first process
    start = time.perf_counter()
    # shuffle=False: the tf.data pipeline already reshuffles every epoch (Keras would only warn).
    history = model.fit(data.train, validation_data=data.val, epochs=epochs, initial_epoch=initial_epoch,
                        steps_per_epoch=steps_per_epoch, callbacks=callbacks, verbose=verbose, shuffle=False)
    seconds = time.perf_counter() - start
    start_epoch = max([initial_epoch] + [c.epoch for c in callbacks if isinstance(c, checkpoints.Checkpoint)])
    trained = len(history.epoch)
    loss = history.history["loss"][-1] if trained else 0.0
    if start_epoch + trained < epochs or not np.isfinite(loss):   # TerminateOnNaN
        raise FloatingPointError(f"training diverged (loss {loss}) at epoch {start_epoch + trained}; "
                                 f"try a smaller --learning-rate than {config.train.learning_rate}.")
    if not trained:   # trained to the end before: the caller only evaluates and logs
        print(f"the checkpoint in {backup_dir} holds all {epochs} epochs: nothing left to train", flush=True)
    log_lrn_diagnostics(model, probe, epochs)
    return {k: [float(v) for v in values] for k, values in history.history.items()}, seconds, start_epoch


LRN_PROBE_IMAGES = 64   # the fixed batch of the LRN diagnostic


def lrn_probe_images(data: Data, count: int = LRN_PROBE_IMAGES) -> np.ndarray | None:
    """The first `count` validation images (fixed order, never augmented), which the LRN diagnostic reads."""
    if data.val is None:
        return None
    batches = [np.asarray(images) for images, *_ in data.val.take(-(-count // data.batch_size))]
    return np.concatenate(batches)[:count] if batches else None


def log_lrn_diagnostics(model: keras.Model, images: np.ndarray | None, step: int) -> dict[str, float]:
    """model.lrn_diagnostics on `images` as `lrn/<layer>_<statistic>` at `step` (0 before training, the
    epoch count after it): under "lrn/" MLflow charts them in a section of their own, after the training
    metrics, each as a line over the training. Step 0 is logged once (a resumed run keeps its first)."""
    metrics = {f"lrn/{layer}_{name}": value for layer, values in
               (lrn_diagnostics(model, images) if images is not None else {}).items()
               for name, value in values.items() if name != "constant_scale"}   # a config value
    if metrics and step:
        tracking.log_metrics(metrics, step=step)
    elif metrics:
        tracking.log_metrics_once(metrics)
    return metrics


def timing_metrics(history: dict[str, list[float]], seconds: float) -> dict[str, float]:
    return {"train_time_s": seconds, "epoch_time_s": seconds / max(1, len(history.get("loss", [])))}


def evaluate(model: keras.Model, data: Data) -> tuple[dict[str, float], np.ndarray]:
    """Test-set metrics (the only use of the test split) and the predicted classes."""
    results = model.evaluate(data.test, return_dict=True, verbose=0)
    probabilities = model.predict(data.test, verbose=0)
    metrics = {f"test_{k}": float(v) for k, v in results.items()}
    return metrics, np.argmax(probabilities, axis=-1)


def log_evaluation(data: Data, predictions: np.ndarray, history: dict[str, list[float]], title: str) -> None:
    from sklearn.metrics import classification_report

    labels, names = data.test_labels, list(data.class_names)
    report = dict(y_true=labels, y_pred=predictions, labels=list(range(len(names))), target_names=names,
                  zero_division=0)
    tracking.log_text(classification_report(**report, digits=4), "reports/classification_report.txt")
    tracking.log_dict(classification_report(**report, output_dict=True), "reports/classification_report.json")
    tracking.log_figure(figures.confusion_matrix(labels, predictions, names, title=title),
                        "figures/confusion_matrix.png")
    # The whole matrix as its non-zero cells: at 1,000 classes the figure shows only the worst pairs.
    tracking.log_text(csv_text(confusion_rows(labels, predictions, names)), "reports/confusion_matrix.csv")
    tracking.log_figure(figures.learning_curves(history, title=title), "figures/learning_curves.png")


def run_tags(config: Config, data: Data, model: keras.Model,
             context: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment, digests, and the description (`context`: the run's study or sweep tags, if any)."""
    return {**tracking.environment_tags(), tracking.CONFIG_DIGEST_TAG: config.digest(),
            tracking.DATA_DIGEST_TAG: data.digest, tracking.VARIANT_NAME_TAG: config.model.variant,
            tracking.NUM_PARAMS_TAG: str(model.count_params()),
            tracking.NOTE_TAG: run_description(config, data, context)}


def default_run_name(config: Config) -> str:
    """The name of a `train` run given no --run-name: the first four options that differ from the main
    job's (`lrn0`, `batchnorm`, `width0.25`, `epochs2`, `tanh`; not the data folder), then the config
    digest's first 6 digits, so that runs of different configs never share a name: `width0.25-epochs2-3f09a1`."""
    main = MAIN_JOB.outcome_values()
    parts = []
    for key, value in config.outcome_values().items():
        if value == main.get(key) or key == "data_dir":
            continue
        if isinstance(value, bool):
            parts.append(key if value else f"{key}0")
        elif isinstance(value, str):
            parts.append(value)
        else:
            parts.append(f"{key}{'none' if value is None else f'{value:g}'}")
    return "-".join([*(parts[:4] or ["main"]), config.digest()[:6]])


def run_description(config: Config, data: Data, context: Mapping[str, str] | None = None) -> str:
    """The run page's description: network, data, training, and which study or sweep it belongs to."""
    m, d, t = config.model, config.data, config.train
    context = context or {}
    size = f"{m.input_size} px input" + (f", width {m.width:g}" if m.width != 1 else "") + (
        ", two-GPU groups" if m.groups == 2 else "")
    pool = "overlapping 3x3/2" if m.pool == "overlapping" else "non-overlapping 2x2/2"
    on = {True: "on", False: "off"}
    source = f"{data.source}; " if data.source != d.dataset else ""
    text = (f"AlexNet ({m.variant} variant, {size}) trained on {d.dataset} ({source}"
            f"{data.counts['train']} training, {data.counts['val']} validation, {data.counts['test']} test "
            f"images; {d.recipe} recipe, {'augmented' if d.augment else 'no augmentation'}) for {t.epochs} epochs: "
            f"SGD, learning rate "
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


@contextlib.contextmanager
def training_run(config: Config, model: keras.Model, name: str | None, tags: Mapping[str, str],
                 parent_run_id: str | None = None) -> Iterator[tuple[str, Path | None]]:
    """The one resume path: yields the run id and checkpoint folder of a training (none for a study's
    child or a sweep's trial, which ablate / tune restart). A top-level run continues, once it holds its lease, the
    latest KILLED or RUNNING run of the experiment with the same config and data digests (and name, if given), or a
    FAILED one whose checkpoint is still there: its checkpoint is restored into `model` before any run opens (a
    damaged one fails there), then moved into this run's folder (docs/reliability.md)."""
    previous = old = None
    if parent_run_id is None:
        for run_id in tracking.mark_dead_runs(config.experiment):
            print(f"marked run {run_id} KILLED: the process training it is gone", flush=True)
        match = {k: tags[k] for k in (tracking.CONFIG_DIGEST_TAG, tracking.DATA_DIGEST_TAG)}
        if config.resume:
            previous = tracking.find_resumable_run(config.experiment, match, run_name=config.run_name)
    if previous is not None:
        tracking.lease(previous.info.run_id)   # before its checkpoint is read: a live process may own the run
        old = Path(previous.data.tags[tracking.CHECKPOINT_DIR_TAG])
        epoch = checkpoints.restore(model, old)
        print(f"continuing run {previous.info.run_id} ({previous.info.status} after {epoch} of "
              f"{config.train.epochs} epochs); pass --resume false to start a new run instead", flush=True)
    reopen = previous.info.run_id if previous is not None and "MLFLOW_RUN_ID" not in os.environ else None
    folder, keep, lost = None, False, None
    try:
        with tracking.run(config.experiment, run_name=name, params=config.flat(), tags=tags, run_id=reopen,
                          parent_run_id=parent_run_id, system_metrics=config.system_metrics) as active:
            run_id = active.info.run_id
            try:
                if parent_run_id is None:
                    folder = Path(config.checkpoint_dir, run_id).resolve()
                    if previous is not None and previous.info.run_id != run_id:
                        tracking.adopt_run(previous.info.run_id)
                    if old is not None and old.is_dir() and old.resolve() != folder:   # or another --checkpoint-dir
                        folder.parent.mkdir(parents=True, exist_ok=True)
                        shutil.move(old, folder)
                    tracking.set_tags({tracking.CHECKPOINT_DIR_TAG: str(folder)})
                yield run_id, folder
            except Exception as err:
                if folder is None or not tracking.is_tracking_error(err):
                    raise
                # The store failed, not the training: KILLED, with the checkpoint that the same command continues.
                reason = f"the tracking store failed ({type(err).__name__}: {checkpoints.one_line(err)})"
                lost = tracking.TrackingError(f"{reason}; run {run_id} ends KILLED with its checkpoint in {folder}: "
                                              "run the same command again once the store answers.")
                try:   # as this process's active run too: `tracking.run` then adds nothing
                    tracking.end_run(run_id, "KILLED", reason)
                except Exception:   # still active: `tracking.run` ends it FAILED, if the store answers (resumable)
                    raise lost from err
                lost.__cause__ = err
        if lost is not None:
            raise lost
    except BaseException as err:   # a stop or a store failure (as the run ends too) keeps the checkpoint
        keep = isinstance(err, KeyboardInterrupt) or tracking.is_tracking_error(err) or isinstance(
            err, (ResultsNotLogged, checkpoints.CheckpointError)) and checkpoints.saved_epoch(folder) > 0
        raise
    finally:
        if folder is not None and not keep:
            shutil.rmtree(folder, ignore_errors=True)
            with contextlib.suppress(Exception):   # the tag says where a checkpoint is, only while there is one
                tracking.delete_tag(run_id, tracking.CHECKPOINT_DIR_TAG)
            with contextlib.suppress(OSError):   # no empty checkpoint folder left behind
                folder.parent.rmdir()


def train_and_evaluate(config: Config, *, tags: dict[str, str] | None = None,
                       parent_run_id: str | None = None) -> TrainResult:
    """Train one AlexNet as `config` says, log everything to MLflow, return the test metrics."""
    register = config.register if parent_run_id is None else None   # children: ablate registers the best
    if register:
        from ..serving import check_model_name

        check_model_name(register)   # a bad name fails now, not after the training
    tracking.preflight(config.experiment)   # so does an unusable store
    if parent_run_id is None:
        checkpoints.probe(Path(config.checkpoint_dir))   # and a checkpoint folder that cannot be written
    data, model = prepare(config)
    summary = summary_text(model)
    print(summary)
    title = config.run_name or f"{config.model.variant} lrn={config.model.lrn} bn={config.model.batchnorm}"
    all_tags = {**run_tags(config, data, model, context=tags), **(tags or {})}
    name = config.run_name
    if parent_run_id is None:   # under `mlflow run` the launcher named the run: the tag renames it
        name = all_tags[tracking.RUN_NAME_TAG] = name or default_run_name(config)
    with training_run(config, model, name, all_tags, parent_run_id) as (run_id, folder):
        log_inputs(config, data, model, summary)
        history, seconds, initial_epoch = fit(model, data, config, folder)
        try:
            # Before the evaluation, so that a stop there keeps it; a process that trained nothing logs none.
            timing = timing_metrics(history, seconds) if history else {}
            tracking.log_metrics(timing)   # none: MLflow does nothing
            if initial_epoch:   # the whole training, across the processes that trained this run
                history = tracking.epoch_history(run_id)
                tracking.set_tags({tracking.RESUMED_FROM_EPOCH_TAG: str(initial_epoch)})
            metrics = {**timing, **log_trained_model(model, data, history, title=title, once=bool(initial_epoch),
                                                     metrics={"final_train_accuracy": history["accuracy"][-1]})}
        except Exception as err:   # the weights are trained: keep them (Ctrl-C keeps the checkpoint anyway)
            raise results_not_logged(err, model, data, config, run_id, folder) from err
    print(f"run {run_id}: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    if register:   # a failure here leaves the run FINISHED with its model logged
        from ..serving import DEFAULT_ALIAS, register_model

        version = register_model(run_id, register, origin="train", description=all_tags[tracking.NOTE_TAG])
        print(f"registered the model of run {run_id} as {register!r} version {version.version}: "
              f"models:/{register}@{DEFAULT_ALIAS}", flush=True)
    return TrainResult(run_id=run_id, metrics=metrics, history=history)


def log_inputs(config: Config, data: Data, model: keras.Model, summary: str | None = None) -> None:
    """What a run trains on, logged before it trains: model summary, resolved config, the data (class
    names, preprocessing, the paper recipe's statistics, datasets), parameter count, files skipped."""
    # Not under model/: that name reads as the logged model, which MLflow keeps outside the run's artifacts.
    tracking.log_text(summary if summary is not None else summary_text(model), "summary/model.txt")
    tracking.log_dict(config.to_dict(), "config.yaml")
    tracking.log_dict({"class_names": list(data.class_names), "mean": data.mean, "std": data.std,
                       "counts": data.counts, "image_size": data.image_size, "source": data.source,
                       "preprocessing": data.preprocessing}, "data.json")
    tracking.log_preprocessing(data)   # paper recipe: colour PCA / mean statistics, mean image
    for split, context in (("train", "training"), ("val", "validation"), ("test", "test")):
        tracking.log_dataset(f"{config.data.dataset}-{split}", data.source, data.digest, context,
                             data.counts[split])
    tracking.log_metrics_once({"num_params": model.count_params(), "skipped_files": data.counts["skipped"]})


def log_trained_model(model: keras.Model, data: Data, history: dict[str, list[float]], *, title: str,
                      metrics: dict[str, float] | None = None, step: int | None = None,
                      once: bool = False) -> dict[str, float]:
    """A trained model and its evaluation, logged on the active run (`train`, and the sweep's best model):
    test metrics (plus `metrics`, training ones, at `step`, default the epochs; with `once`, only those the run
    lacks), reports, figures, and the model with what `predict` needs, linked to those metrics. Returns them."""
    test_metrics, predictions = evaluate(model, data)
    test_metrics.update(ten_crop_metrics(model, data))   # paper recipe: test_10crop_*; else nothing
    logged = {**test_metrics, **(metrics or {})}
    # Not step 0 by default: MLflow links the run's step-0 metrics to the model itself, without their dataset.
    step = len(history.get("loss", ())) if step is None else step
    (tracking.log_metrics_once if once else tracking.log_metrics)(logged, step=step)
    log_evaluation(data, predictions, history, title)
    example = next(iter(data.val.take(1)))[0].numpy()[:4]
    tracking.log_keras_model(model, example, metadata=model_metadata(data),
                             evaluated_on={"test": list(test_metrics), "training": list(metrics or {})})
    tracking.flush()
    return logged


class ResultsNotLogged(RuntimeError):
    """Training finished, but evaluating or logging it failed; the message says where the weights are."""


def results_not_logged(err: Exception, model: keras.Model, data: Data, config: Config, run_id: str,
                       backup_dir: Path | None) -> ResultsNotLogged:
    """The error for `err`, once the trained weights are safe: in the run's checkpoint, or (a study's child,
    a sweep's trial) as a .keras file."""
    cause = f"{type(err).__name__}: {checkpoints.one_line(err)}"
    if backup_dir is not None:
        kept = (f"The trained weights are kept in {backup_dir}: once that is fixed, run the same command again; "
                f"it continues run {run_id} from them and only evaluates and logs it.")
    else:
        path = keep_model(model, data, Path(config.checkpoint_dir, run_id).resolve())
        kept = (f"The trained model is kept as {path} (`alexnet-keras predict --model {path}` uses it)." if path
                else "The trained weights could not be kept anywhere either.")
    return ResultsNotLogged(f"training finished, but logging its results failed ({cause}). {kept}")


def keep_model(model: keras.Model, data: Data, folder: Path) -> Path | None:
    """`model` as model.keras for `predict` in `folder`, else a new temporary folder (None: nowhere)."""
    from ..model.inference import save_model

    meta = model_metadata(data)
    for folder in (folder, None):
        with contextlib.suppress(Exception):   # that place does not work either: try the next
            folder = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="alexnet-keras-kept-"))
            return save_model(model, folder / "model.keras", meta.class_names, meta.preprocessing, meta.mean_image)
    return None
