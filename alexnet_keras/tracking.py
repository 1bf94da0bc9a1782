"""Every MLflow call of the project lives here.

Store: `MLFLOW_TRACKING_URI` when set, else the embedded `sqlite:///mlflow.db` (artifacts under
`./mlruns`). MLflow >= 3.13 refuses a plain `./mlruns` *file* store unless told otherwise, which is
why the default is SQLite.

A run ends FINISHED, FAILED (error message kept in the `error` tag) or KILLED (Ctrl-C / SIGTERM),
never stuck RUNNING: every run records the host and process that owns it, so a run left RUNNING by a
process that died (SIGKILL, power loss) is found later and marked KILLED (`mark_dead_runs`), and a
KILLED training run can be continued in place (`find_resumable_run`, train.py).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import mlflow
from mlflow.tracking import MlflowClient

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
TAG_PREFIX = "alexnet_keras."


class TrackingError(RuntimeError):
    """The MLflow store cannot be used (unreachable, not writable, ...)."""


def configure(tracking_uri: str | None = None) -> str:
    """Point MLflow at `tracking_uri`, else $MLFLOW_TRACKING_URI, else the embedded SQLite store."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///"):
        parent = Path(uri[len("sqlite:///"):]).expanduser().resolve().parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise TrackingError(f"MLflow store {uri!r}: folder {str(parent)!r} does not exist or is not "
                                f"writable. Pass --tracking-uri sqlite:///WRITABLE/PATH/mlflow.db or set "
                                f"MLFLOW_TRACKING_URI.")
    mlflow.set_tracking_uri(uri)
    return uri


def _experiment_id(name: str) -> str:
    """Create-or-get the experiment up front (also surfaces store errors before any training)."""
    try:
        experiment = mlflow.set_experiment(name)
    except Exception as err:  # store unreachable, schema locked, permission denied ...
        raise TrackingError(f"could not open MLflow experiment {name!r} at {mlflow.get_tracking_uri()!r}: "
                            f"{err}") from err
    return experiment.experiment_id


def preflight(experiment: str) -> None:
    """Fail before any data is read or any run exists if the store or its artifact folder is unusable.

    The experiment is created if needed (not a run); a local artifact folder gets a probe file.
    Under `mlflow run` the run's experiment already exists and is the one checked.
    """
    if "MLFLOW_RUN_ID" in os.environ:
        try:
            run_info = MlflowClient().get_run(os.environ["MLFLOW_RUN_ID"]).info
        except Exception as err:
            raise TrackingError(f"cannot read the run {os.environ['MLFLOW_RUN_ID']!r} that `mlflow run` "
                                f"started, at {mlflow.get_tracking_uri()!r}: {err}") from err
        experiment_id = run_info.experiment_id
    else:
        experiment_id = _experiment_id(experiment)
    location = MlflowClient().get_experiment(experiment_id).artifact_location
    local = _local_path(location)
    if local is None:
        return  # a remote artifact store (s3://, mlflow-artifacts:/ ...) reports its own errors
    try:
        local.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=local, prefix=".write-probe-"):
            pass
    except OSError as err:
        raise TrackingError(f"MLflow artifact folder {str(local)!r} of experiment {experiment!r} is not "
                            f"writable ({err.strerror or err}). Free space or fix permissions there, or use "
                            f"another experiment (--experiment) or store (--tracking-uri).") from None


def _local_path(uri: str) -> Path | None:
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme else uri)
    return None


def environment_tags() -> dict[str, str]:
    """Backend, device and library versions: what is needed to reproduce a number."""
    import keras
    import numpy

    tags = {
        "keras_backend": keras.backend.backend(),
        "keras_version": keras.__version__,
        "mlflow_version": mlflow.__version__,
        "numpy_version": numpy.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "device": describe_device(),
    }
    try:
        import tensorflow as tf

        tags["tensorflow_version"] = tf.__version__
    except ImportError:
        pass
    if keras.backend.backend() == "jax":
        import jax

        tags["jax_version"] = jax.__version__
    elif keras.backend.backend() == "torch":
        import torch

        tags["torch_version"] = torch.__version__
    return {TAG_PREFIX + k: v for k, v in tags.items()}


def describe_device() -> str:
    """The accelerator Keras' backend will use, or the CPU."""
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "jax":
            import jax

            devices = jax.devices()
            return f"{devices[0].platform}:{devices[0].device_kind} x{len(devices)}"
        if backend == "torch":
            import torch

            if torch.cuda.is_available():
                return f"cuda:{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
        if backend == "tensorflow":
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
            if gpus:
                return f"gpu x{len(gpus)}"
    except Exception:  # a device query must never stop a run
        pass
    return f"cpu:{platform.processor() or platform.machine()} x{os.cpu_count()}"


def _param_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"   # the form MLproject users type
    return "" if value is None else str(value)


def log_params(params: Mapping[str, Any]) -> None:
    """Log params, skipping keys already on the run.

    `mlflow run` logs every entry-point parameter (as the string the user typed) before the program
    starts, and MLflow refuses to change a param, so `-P lrn=False` must not be re-logged as "false".
    The config already parsed those strings into the same values.
    """
    run = mlflow.active_run()
    existing = MlflowClient().get_run(run.info.run_id).data.params
    fresh = {k: _param_text(v) for k, v in params.items() if k not in existing}
    if fresh:
        mlflow.log_params(fresh)


def _raise_keyboard_interrupt(signum, frame):  # SIGTERM → the same path as Ctrl-C
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def run(experiment: str, *, run_name: str | None = None, params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None, nested: bool = False,
        parent_run_id: str | None = None, run_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """Start (or, under `mlflow run`, resume) a run; end it FINISHED, FAILED or KILLED.

    `run_id` resumes that run (a study's parent on re-run). A child (`parent_run_id` or `nested`) never
    resumes $MLFLOW_RUN_ID, and is nested when its parent is the active run of this process.
    """
    if parent_run_id is not None or nested:
        # mlflow.start_run() without run_id resumes $MLFLOW_RUN_ID (the run `mlflow run` made, i.e.
        # the parent): a child needs a run of its own.
        os.environ.pop("MLFLOW_RUN_ID", None)
        current = mlflow.active_run()
        if parent_run_id is not None and current is not None and current.info.run_id == parent_run_id:
            nested = True   # MLflow refuses a second active run unless it is nested
    if run_id is not None:
        active = mlflow.start_run(run_id=run_id, nested=nested)   # nested: a retried sweep trial
        if TAG_PREFIX + "end_reason" in active.data.tags:   # why it ended last time; it runs again now
            MlflowClient().delete_tag(run_id, TAG_PREFIX + "end_reason")
    elif "MLFLOW_RUN_ID" in os.environ and not nested and parent_run_id is None:
        # Launched by `mlflow run`: the run already exists in the project's experiment.
        active = mlflow.start_run(run_id=os.environ["MLFLOW_RUN_ID"])
    else:
        experiment_id = _experiment_id(experiment)
        active = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, nested=nested,
                                  parent_run_id=parent_run_id)
    owner_tags = {TAG_PREFIX + "host": socket.gethostname(), TAG_PREFIX + "pid": str(os.getpid()),
                  TAG_PREFIX + "pid_start": _process_start(os.getpid())}
    previous_sigterm = None
    if not nested and parent_run_id is None and _is_main_thread():
        previous_sigterm = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        mlflow.set_tags({**owner_tags, **dict(tags or {})})
        if params:
            log_params(params)
        yield active
    except KeyboardInterrupt:
        mlflow.set_tag(TAG_PREFIX + "end_reason", "interrupted")
        mlflow.end_run("KILLED")
        raise
    except BaseException as err:
        with contextlib.suppress(Exception):
            mlflow.set_tag("error", f"{type(err).__name__}: {err}"[:5000])
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


def _process_start(pid: int) -> str:
    """When process `pid` started (clock ticks since boot, Linux), so a reused pid is not taken for the
    process that owned a run; "" where /proc is absent."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _process_alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # alive, owned by another user
        return True
    return not start or _process_start(pid) in (start, "")


def mark_dead_runs(experiment: str) -> list[str]:
    """Mark KILLED the runs of `experiment` still RUNNING although the process that owned them, on this
    host, is gone (SIGKILL, out-of-memory killer, a reboot). Runs of other hosts are left alone: from
    here a live process there cannot be told from a dead one. Returns the ids marked."""
    client = MlflowClient()
    host_tag = TAG_PREFIX + "host"
    runs = client.search_runs([experiment_id_for(experiment)], max_results=10000,
                              filter_string=f"attributes.status = 'RUNNING' and tags.`{host_tag}` = "
                                            f"'{socket.gethostname()}'")
    marked = []
    for found in runs:
        tags = found.data.tags
        pid = tags.get(TAG_PREFIX + "pid", "")
        if not pid.isdigit() or _process_alive(int(pid), tags.get(TAG_PREFIX + "pid_start", "")):
            continue
        client.set_tag(found.info.run_id, TAG_PREFIX + "end_reason",
                       f"process {pid} on {socket.gethostname()} died while the run was RUNNING")
        client.set_terminated(found.info.run_id, "KILLED")
        marked.append(found.info.run_id)
    return marked


def experiment_id_for(experiment: str) -> str:
    """The experiment this process logs to: the run's under `mlflow run`, else `experiment`'s."""
    if "MLFLOW_RUN_ID" in os.environ:
        return MlflowClient().get_run(os.environ["MLFLOW_RUN_ID"]).info.experiment_id
    return _experiment_id(experiment)


def find_resumable_run(experiment: str, match_tags: Mapping[str, str], run_name: str | None = None) -> Any | None:
    """The latest interrupted top-level run of `experiment` whose tags equal `match_tags` (the config
    and data digests: hex strings) and, if given, named `run_name`, or None. Interrupted: KILLED (Ctrl-C, SIGTERM, or found dead), or FAILED with
    its checkpoint folder still there. train.py deletes the checkpoint of a run that fails, so such a
    run died without cleaning up: the `mlflow run` launcher marks a killed child FAILED."""
    conditions = [f"tags.`{k}` = '{v}'" for k, v in match_tags.items()]
    runs = MlflowClient().search_runs([experiment_id_for(experiment)], " and ".join(conditions),
                                      order_by=["attributes.start_time DESC"], max_results=100)
    for found in runs:
        tags = found.data.tags
        checkpoint = tags.get(TAG_PREFIX + "checkpoint_dir")
        if found.info.run_id == os.environ.get("MLFLOW_RUN_ID") or "mlflow.parentRunId" in tags or not checkpoint:
            continue
        if run_name is not None and found.info.run_name != run_name:   # compared here: names may hold quotes
            continue
        if found.info.status == "KILLED" or (found.info.status == "FAILED" and Path(checkpoint).is_dir()):
            return found
    return None


def adopt_run(previous_run_id: str) -> None:
    """Continue `previous_run_id` in the active run: copy its metric history (steps and timestamps
    kept), link the two by tags, and delete the previous run (MLflow's soft delete: `mlflow runs
    restore` brings it back). For `mlflow run`, whose launcher always creates a new run, so that the
    experiment still shows one run with the whole training."""
    client = MlflowClient()
    run_id = mlflow.active_run().info.run_id
    previous = client.get_run(previous_run_id)
    history = [m for key in previous.data.metrics for m in client.get_metric_history(previous_run_id, key)]
    for start in range(0, len(history), 1000):   # MLflow's log_batch limit
        client.log_batch(run_id, metrics=history[start:start + 1000], synchronous=True)
    mlflow.set_tag(TAG_PREFIX + "resumed_from_run", previous_run_id)
    client.set_tag(previous_run_id, TAG_PREFIX + "continued_in", run_id)
    client.delete_run(previous_run_id)


def log_metrics_once(metrics: Mapping[str, float]) -> None:
    """Log the metrics the active run does not hold yet (a resumed run already has its run-level ones)."""
    existing = MlflowClient().get_run(mlflow.active_run().info.run_id).data.metrics
    fresh = {k: v for k, v in metrics.items() if k not in existing}
    if fresh:
        log_metrics(fresh)


@functools.cache
def _epoch_metrics_class():
    import keras   # here, not at the top: `report` and the other store-only commands need no Keras

    class EpochMetrics(keras.callbacks.Callback):
        """Per-epoch metrics (step = epoch) and the optimizer's settings, logged as each epoch ends.

        Used instead of `mlflow.keras.MlflowCallback`, which queues epoch metrics asynchronously (lost if
        the process is killed; failures only warned about) and logs every validation on step 0. Here
        logging is synchronous. With `skip_logged_steps` (a run resumed from a checkpoint), a step
        already in the run is not logged twice: an epoch logged just before the process was killed,
        then trained again from the previous epoch's checkpoint, keeps its first values.
        """

        def __init__(self, skip_logged_steps: bool = False):
            super().__init__()
            self.skip_logged_steps = skip_logged_steps
            self.logged_steps: set[int] = set()
            self.active = False

        def on_train_begin(self, logs=None):
            self.active = mlflow.active_run() is not None   # no run: a plain fit, nothing to log
            if not self.active:
                return
            if self.skip_logged_steps:
                self.logged_steps = {step for step, _ in metric_history(mlflow.active_run().info.run_id, "loss")}
            log_params({f"optimizer_{k}": v for k, v in self.model.optimizer.get_config().items()})

        def on_epoch_end(self, epoch, logs=None):
            if self.active and logs and epoch not in self.logged_steps:
                log_metrics(logs, step=epoch)
                self.logged_steps.add(epoch)

    return EpochMetrics


def epoch_metrics_callback(skip_logged_steps: bool = False):
    return _epoch_metrics_class()(skip_logged_steps)


def is_epoch_metrics_callback(callback) -> bool:
    """Whether `callback` logs to the active run (tune.py drops it where no trial run is active)."""
    return isinstance(callback, _epoch_metrics_class())


def epoch_history(run_id: str, keys) -> dict[str, list[float]]:
    """A run's per-epoch metrics as {key: [value at step 0, 1, ...]}: the whole training of a resumed
    run, across the processes that trained it."""
    history = {}
    for key in keys:
        by_step = dict(metric_history(run_id, key))
        if by_step:
            history[key] = [by_step[step] for step in sorted(by_step)]
    return history


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def set_tags(tags: Mapping[str, str]) -> None:
    mlflow.set_tags(dict(tags))


def log_text(text: str, artifact_file: str) -> None:
    mlflow.log_text(text, artifact_file)


def log_dict(data: Mapping[str, Any], artifact_file: str) -> None:
    mlflow.log_dict(dict(data), artifact_file)


def log_figure(figure, artifact_file: str) -> None:
    import matplotlib.pyplot as plt

    mlflow.log_figure(figure, artifact_file)
    plt.close(figure)


def log_dataset(name: str, source: str, digest: str, context: str, num_examples: int) -> None:
    """Record which data a run used, without walking a tf.data pipeline (mlflow#9600)."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    if os.path.exists(source):
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source

        with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are local files
            warnings.simplefilter("ignore", UserWarning)
            dataset_source = resolve_dataset_source(os.path.abspath(source))
    else:
        dataset_source = CodeDatasetSource(tags={"origin": source})
    dataset = MetaDataset(source=dataset_source, name=name, digest=digest)
    mlflow.log_input(dataset, context=context, tags={"num_examples": str(num_examples)})


def log_keras_model(model, example_batch, metadata: Mapping[str, Any] | None = None) -> None:
    """The trained model in `.keras` format, with a signature inferred from a real batch.

    `metadata` goes into the MLmodel file (predict.py reads class names and preprocessing from it)."""
    import keras
    from mlflow.models import infer_signature

    predictions = model.predict(example_batch, verbose=0)
    signature = infer_signature(example_batch, predictions)
    # Explicit requirements: MLflow would otherwise re-import the model in a subprocess to infer them.
    requirements = [f"keras=={keras.__version__}", "alexnet-keras"]
    try:
        import tensorflow as tf

        requirements.append(f"tensorflow=={tf.__version__}")
    except ImportError:
        pass
    mlflow.keras.log_model(model, name="model", signature=signature, pip_requirements=requirements,
                           metadata=dict(metadata) if metadata else None)


def log_preprocessing(data) -> None:
    """The paper recipe's training-set statistics (colour PCA, mean, std) and, with pixel_mean, the mean
    image, under `preprocessing/` next to data.json (predict.py reads the mean image back)."""
    if data.recipe_stats is not None:
        mlflow.log_dict(dict(data.recipe_stats), "preprocessing/statistics.json")
    if data.mean_image is not None:
        import numpy as np

        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "mean_image.npy")
            np.save(path, np.asarray(data.mean_image, np.float32))
            mlflow.log_artifact(path, "preprocessing")


def child_runs(parent_run_id: str) -> list:
    return MlflowClient().search_runs(
        [MlflowClient().get_run(parent_run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        max_results=10000,
    )


def get_run(run_id: str):
    try:
        return MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException as err:
        raise TrackingError(f"no MLflow run {run_id!r} in {mlflow.get_tracking_uri()!r}: {err.message}. "
                            f"List runs with `mlflow runs list --experiment-id ID` or open `mlflow ui`.") from None


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key)]


def download_artifact(run_id: str, path: str) -> Path:
    target = tempfile.mkdtemp(prefix="alexnet-keras-")
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=target))


def flush() -> None:
    """Wait for anything MLflow still queues asynchronously (the per-epoch metrics are synchronous)."""
    with contextlib.suppress(Exception):
        mlflow.flush_async_logging()


def dumps(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


def stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
