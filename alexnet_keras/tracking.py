"""Every MLflow call of training, studies and sweeps, and every tag name the project writes, live here
(the MLflow model itself — logging it as a pyfunc, loading, serving, registering — is serving.py's).

Store: `MLFLOW_TRACKING_URI` when set, else the embedded `sqlite:///mlflow.db` (artifacts under
`./mlruns`). MLflow >= 3.13 refuses a plain `./mlruns` *file* store unless told otherwise, which is
why the default is SQLite.

A run ends FINISHED, FAILED (error message kept in the `error` tag) or KILLED (Ctrl-C / SIGTERM),
never stuck RUNNING: every run records the host and process that owns it, so a run left RUNNING by a
process that died (SIGKILL, power loss) is found later and marked KILLED (`mark_dead_runs`).

Runs are found by their tags (`find_runs`); a study's or sweep's parent run is `parent_run` (the one
place that takes `mlflow run`'s run for a parent), an interrupted training run is found again by
`find_resumable_run`. The functions that log accept `run_id=` to write to another than the active run.
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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Iterable, Iterator, Mapping, Sequence

import mlflow
from mlflow.tracking import MlflowClient

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"

# --- tag and artifact names: typed here only ---------------------------------------------------------
TAG_PREFIX = "alexnet_keras."
PARENT_TAG = "mlflow.parentRunId"            # MLflow's own: nests a run under its parent in the UI
RUN_NAME_TAG = "mlflow.runName"
NOTE_TAG = "mlflow.note.content"             # the run page's description
ERROR_TAG = "error"                          # why a run ended FAILED
# Every training run (train.py).
CONFIG_DIGEST_TAG = TAG_PREFIX + "config_digest"
DATA_DIGEST_TAG = TAG_PREFIX + "data_digest"
VARIANT_NAME_TAG = TAG_PREFIX + "variant"
NUM_PARAMS_TAG = TAG_PREFIX + "num_params"
CHECKPOINT_DIR_TAG = TAG_PREFIX + "checkpoint_dir"
RESUMED_FROM_EPOCH_TAG = TAG_PREFIX + "resumed_from_epoch"
RESUMED_FROM_RUN_TAG = TAG_PREFIX + "resumed_from_run"
CONTINUED_IN_TAG = TAG_PREFIX + "continued_in"
JOB_TAG = TAG_PREFIX + "job"
# Where a study's child or a sweep's worker ran (cluster.py): its GPU, its Ray task (the same id for
# every retry of it) and node.
VISIBLE_DEVICES_TAG = TAG_PREFIX + "cuda_visible_devices"
RAY_TASK_TAG = TAG_PREFIX + "ray_task_id"
RAY_NODE_TAG = TAG_PREFIX + "ray_node_id"
# Who owns a run, why it ended, and which parent took over a child.
HOST_TAG = TAG_PREFIX + "host"
PID_TAG = TAG_PREFIX + "pid"
PID_START_TAG = TAG_PREFIX + "pid_start"
END_REASON_TAG = TAG_PREFIX + "end_reason"
ADOPTED_FROM_TAG = TAG_PREFIX + "adopted_from"
SUPERSEDED_BY_TAG = TAG_PREFIX + "superseded_by"
# Ablation studies (ablate.py writes them, report.py reads them).
STUDY_TAG = TAG_PREFIX + "study"
STUDY_DIGEST_TAG = TAG_PREFIX + "study_digest"
ROLE_TAG = TAG_PREFIX + "study_role"             # "parent" or "child"
VARIANT_TAG = TAG_PREFIX + "variant_name"
FACTOR_TAG = TAG_PREFIX + "factor."              # + axis name
BASELINE_TAG = TAG_PREFIX + "is_baseline"
SEED_TAG = TAG_PREFIX + "seed"
SPEC_ARTIFACT = "study/study.json"
# Sweeps (tune.py).
SWEEP_TAG = TAG_PREFIX + "sweep"
SWEEP_DIGEST_TAG = TAG_PREFIX + "sweep_digest"
SWEEP_UID_TAG = TAG_PREFIX + "sweep_uid"
SWEEP_ROLE_TAG = TAG_PREFIX + "sweep_role"       # "parent", "trial" or "superseded"
SWEEP_SUMMARY_TAG = TAG_PREFIX + "sweep_summary"  # what the parent's summary was computed from
TRIAL_TAG = TAG_PREFIX + "trial_id"
TUNER_ID_TAG = TAG_PREFIX + "tuner_id"
ATTEMPT_TAG = TAG_PREFIX + "attempt"
SWEEP_MAX_TRIALS_TAG = TAG_PREFIX + "max_trials"
BEST_TAG = "best."                               # + hyperparameter name, on the sweep's parent
BEST_TRIAL_TAG = TAG_PREFIX + "best_trial"
BEST_RUN_ID_TAG = TAG_PREFIX + "best_run_id"
MODEL_SOURCE_TAG = TAG_PREFIX + "model_source"   # the sweep's model: "checkpoint", "retrained" or "none"
# On a registered model version that `ablate --register` / `tune --register` chose (serving.register_model
# adds where it came from: origin, run id and name, digests, test accuracy): the study's or sweep's
# parent run, and the metric the choice was made on with its value.
PARENT_RUN_TAG = TAG_PREFIX + "parent_run_id"
SELECTION_METRIC_TAG = TAG_PREFIX + "selection_metric"
SELECTION_VALUE_TAG = TAG_PREFIX + "selection_value"
# The per-epoch metrics Keras logs (step = epoch).
EPOCH_KEYS = ("loss", "accuracy", "top5_accuracy", "val_loss", "val_accuracy", "val_top5_accuracy")
# Most runs one search returns (the SQL stores' limit).
MAX_RESULTS = 50000


class TrackingError(RuntimeError):
    """The MLflow store cannot be used (unreachable, not writable, ...)."""


def configure(tracking_uri: str | None = None) -> str:
    """Point MLflow at `tracking_uri`, else $MLFLOW_TRACKING_URI, else the embedded SQLite store."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri in ("sqlite://", "sqlite:///") or uri.startswith("sqlite:///:memory:"):
        raise TrackingError(f"MLflow store {uri!r} is an in-memory database: every run would be lost when the "
                            f"process ends. Pass --tracking-uri sqlite:///PATH/mlflow.db (or set "
                            f"MLFLOW_TRACKING_URI) to a file.")
    if uri.startswith("sqlite:///"):
        parent = Path(uri[len("sqlite:///"):]).expanduser().resolve().parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise TrackingError(f"MLflow store {uri!r}: folder {str(parent)!r} does not exist or is not "
                                f"writable. Pass --tracking-uri sqlite:///WRITABLE/PATH/mlflow.db or set "
                                f"MLFLOW_TRACKING_URI.")
    mlflow.set_tracking_uri(uri)
    return uri


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


def open_experiment(name: str) -> str:
    """Create-or-get the experiment `name` and make it the current one; its id. Surfaces store errors
    before any training (and creates the experiment before a fan-out of processes, mlflow#4123)."""
    try:
        experiment = mlflow.set_experiment(name)
    except Exception as err:  # store unreachable, schema locked, permission denied ...
        raise TrackingError(f"could not open MLflow experiment {name!r} at {mlflow.get_tracking_uri()!r}: "
                            f"{err}") from err
    return experiment.experiment_id


def experiment_name(experiment_id: str) -> str:
    return MlflowClient().get_experiment(experiment_id).name


def artifact_location(experiment_id: str) -> str:
    """Where the runs of an experiment keep their artifacts (fixed when the experiment was created)."""
    return MlflowClient().get_experiment(experiment_id).artifact_location


def experiment_id_for(experiment: str) -> str:
    """The experiment this process logs to: the run's under `mlflow run`, else `experiment`'s."""
    launched = os.environ.get("MLFLOW_RUN_ID")
    if not launched:
        return open_experiment(experiment)
    try:
        return MlflowClient().get_run(launched).info.experiment_id
    except Exception as err:
        raise TrackingError(f"cannot read the run {launched!r} that `mlflow run` started, at "
                            f"{mlflow.get_tracking_uri()!r}: {err}") from err


def preflight(experiment: str) -> None:
    """Fail before any data is read or any run exists if the store or its artifact folder is unusable.

    The experiment is created if needed (not a run); a local artifact folder gets a probe file.
    Under `mlflow run` the run's experiment already exists and is the one checked. A tracking server
    is reached or refused within seconds (`quick_requests`), not after MLflow's minutes of retries.
    """
    with quick_requests():
        try:
            experiment_id = experiment_id_for(experiment)
            location = MlflowClient().get_experiment(experiment_id).artifact_location
        except Exception as err:
            uri = mlflow.get_tracking_uri()
            if not uri.startswith(("http://", "https://")):
                raise
            raise TrackingError(f"the MLflow tracking server {uri!r} cannot be reached or refused the request "
                                f"({_short(err)}). Start it (e.g. `mlflow server --host 127.0.0.1 --port 5000`), "
                                f"or pass --tracking-uri (or set MLFLOW_TRACKING_URI) to a store that "
                                f"works.") from None
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


# MLflow retries a failed HTTP request 7 times with exponential backoff and waits up to 120 s for each:
# minutes before a server that is down is reported (about 250 s for http://127.0.0.1:9). Within
# `quick_requests`: two retries, the second after about 2 s (a server just starting gets that long),
# and 10 s per request; a value the user set stays.
QUICK_REQUESTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@contextlib.contextmanager
def quick_requests() -> Iterator[None]:
    """Within: MLflow's HTTP requests give up within seconds (QUICK_REQUESTS). MLflow reads these
    variables on every request."""
    added = [key for key in QUICK_REQUESTS if key not in os.environ]
    os.environ.update({key: QUICK_REQUESTS[key] for key in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def store_answers() -> bool:
    """Whether the configured store answers now (within seconds: quick_requests). A study on a cluster
    asks when a child fails, since the child's own error may not say that the store was the cause."""
    with quick_requests():
        try:
            MlflowClient().search_experiments(max_results=1)
        except Exception:
            return False
    return True


def _short(err: BaseException) -> str:
    """The reason in an MLflow request error (e.g. "[Errno 111] Connection refused"), else its message."""
    import re

    text = " ".join(str(getattr(err, "message", None) or err).split())
    reason = re.search(r"\[Errno -?\d+\][^\"')]*|Failed to resolve '[^']*'|Read timed out[^\"')]*", text)
    if reason:
        return reason.group(0).strip(" .")
    return text if len(text) <= 300 else text[:297] + "..."


def _local_path(uri: str) -> Path | None:
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme else uri)
    return None


def is_tracking_error(err: BaseException) -> bool:
    """Whether `err` (or what caused it) comes from MLflow or its store, rather than from training."""
    for e in (err, err.__cause__, err.__context__):
        if e is None:
            continue
        module = type(e).__module__ or ""
        if isinstance(e, TrackingError) or module.split(".")[0] in ("mlflow", "sqlalchemy", "sqlite3"):
            return True
    return False


def environment_tags() -> dict[str, str]:
    """Backend, device and library versions: what is needed to reproduce a number."""
    import importlib.metadata

    import keras

    tags = {"keras_backend": keras.backend.backend(), "python_version": platform.python_version(),
            "platform": platform.platform(), "device": describe_device()}
    for package in ("keras", "mlflow", "numpy", "tensorflow", "jax", "torch"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            tags[f"{package}_version"] = importlib.metadata.version(package)
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


def log_params(params: Mapping[str, Any]) -> None:
    """Log params on the active run, skipping keys already on it.

    `mlflow run` logs every entry-point parameter (as the string the user typed) before the program
    starts, and MLflow refuses to change a param, so `-P lrn=False` must not be re-logged as "false".
    The config already parsed those strings into the same values.
    """
    from .tables import value_text

    run = mlflow.active_run()
    existing = MlflowClient().get_run(run.info.run_id).data.params
    fresh = {k: value_text(v) for k, v in params.items() if k not in existing}
    if fresh:
        mlflow.log_params(fresh)


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within: SIGTERM (a scheduler stopping the job) takes the path of Ctrl-C, so runs end KILLED.
    Only the main thread can install signal handlers; elsewhere this does nothing."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def run(experiment: str, *, run_name: str | None = None, params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None, nested: bool = False,
        parent_run_id: str | None = None, run_id: str | None = None,
        system_metrics: bool | None = None) -> Iterator[mlflow.ActiveRun]:
    """Start (or, under `mlflow run`, resume) a run; end it FINISHED, FAILED or KILLED.

    `run_id` resumes that run (a study's or sweep's parent on re-run, an interrupted training run or
    trial); a top-level run without it takes $MLFLOW_RUN_ID when set (`parent_run` has taken it out of
    the environment for the children of a study or sweep). A child is nested when its parent is the
    active run of this process. A top-level run turns SIGTERM into Ctrl-C.
    `system_metrics`: log MLflow's system metrics for this run (True for training runs, see
    `system_metrics_setting`); None leaves it to MLflow's own switch (MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING).
    """
    system_metrics = system_metrics_setting(system_metrics)
    current = mlflow.active_run()
    if parent_run_id is not None and current is not None and current.info.run_id == parent_run_id:
        nested = True   # MLflow refuses a second active run unless it is nested
    if run_id is not None:
        # start_run(run_id=...) refuses a run of another experiment than the last set_experiment().
        mlflow.set_experiment(experiment_id=MlflowClient().get_run(run_id).info.experiment_id)
        active = mlflow.start_run(run_id=run_id, nested=nested,   # nested: a retried sweep trial
                                  log_system_metrics=system_metrics)
        for key in (END_REASON_TAG, ERROR_TAG):   # why it ended last time; it runs again now
            if key in active.data.tags:
                MlflowClient().delete_tag(run_id, key)
    elif "MLFLOW_RUN_ID" in os.environ and not nested and parent_run_id is None:
        # Launched by `mlflow run`: the run already exists in the project's experiment.
        active = mlflow.start_run(run_id=os.environ["MLFLOW_RUN_ID"], log_system_metrics=system_metrics)
    else:
        experiment_id = open_experiment(experiment)
        active = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, nested=nested,
                                  parent_run_id=parent_run_id, log_system_metrics=system_metrics)
    owner_tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()),
                  PID_START_TAG: process_start(os.getpid())}
    top_level = not nested and parent_run_id is None
    with sigterm_as_interrupt() if top_level else contextlib.nullcontext():
        try:
            mlflow.set_tags({**owner_tags, **dict(tags or {})})
            if params:
                log_params(params)
            yield active
        except KeyboardInterrupt:
            # The store may be what failed (a server gone): the interrupt or error goes up, not the
            # store's complaint about ending the run (mlflow.end_run leaves no active run either way).
            with contextlib.suppress(Exception):
                mlflow.set_tag(END_REASON_TAG, "interrupted")
            with contextlib.suppress(Exception):
                mlflow.end_run("KILLED")
            raise
        except BaseException as err:
            with contextlib.suppress(Exception):
                mlflow.set_tag(ERROR_TAG, f"{type(err).__name__}: {err}"[:5000])
            with contextlib.suppress(Exception):
                mlflow.end_run("FAILED")
            raise
        else:
            mlflow.end_run("FINISHED")


# --- system metrics ------------------------------------------------------------------------------------
# MLflow's monitor logs the mean of every SAMPLES samples taken INTERVAL_S apart as `system/...` metrics,
# and drops a sample not yet logged when the run ends: its own 10 s would leave short runs empty. 2 s x 1
# gives any run longer than 2 s a point. MLflow's own variables, when set, win.
SYSTEM_METRICS_INTERVAL_S = 2.0
SYSTEM_METRICS_SAMPLES = 1


def system_metrics_setting(enabled: bool | None) -> bool | None:
    """What `mlflow.start_run(log_system_metrics=...)` gets: `enabled` as it is, after setting the
    sampling (above) where the environment does not. Without psutil, MLflow's monitor cannot run: a
    warning, and the run goes on without system metrics."""
    if not enabled:
        return enabled
    import importlib.util

    if importlib.util.find_spec("psutil") is None:
        stderr("note: no system metrics for this run: psutil is not installed (pip install psutil)")
        return False
    if not os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"):
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
    if not os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING"):
        mlflow.set_system_metrics_samples_before_logging(SYSTEM_METRICS_SAMPLES)
    return True


def active_run_id() -> str | None:
    active = mlflow.active_run()
    return active.info.run_id if active is not None else None


# --- who owns a run ----------------------------------------------------------------------------------

def process_start(pid: int) -> str:
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
    return not start or process_start(pid) in (start, "")


def mark_dead_runs(experiment: str) -> list[str]:
    """Mark KILLED the runs of `experiment` still RUNNING although the process that owned them, on this
    host, is gone (SIGKILL, out-of-memory killer, a reboot). Runs of other hosts are left alone: from
    here a live process there cannot be told from a dead one. Returns the ids marked."""
    host = socket.gethostname()
    marked = []
    for found in find_runs({HOST_TAG: host}, experiment_ids=[experiment_id_for(experiment)], status="RUNNING"):
        tags = found.data.tags
        pid = tags.get(PID_TAG, "")
        if not pid.isdigit() or _process_alive(int(pid), tags.get(PID_START_TAG, "")):
            continue
        end_run(found.info.run_id, "KILLED", f"process {pid} on {host} died while the run was RUNNING")
        marked.append(found.info.run_id)
    return marked


def end_run(run_id: str, status: str, reason: str) -> None:
    """End `run_id` (not this process's active run) with `status`, saying why in its end_reason tag."""
    client = MlflowClient()
    client.set_tag(run_id, END_REASON_TAG, reason)
    client.set_terminated(run_id, status)


# --- finding runs, parents and children ------------------------------------------------------------------

def _quotable(value: str) -> bool:
    return "'" not in value and "\\" not in value


def find_runs(tags: Mapping[str, str], *, experiment_ids: Sequence[str] | None = None,
              status: str | None = None) -> list:
    """The runs whose tags equal `tags` (and whose status is `status`), newest first, in
    `experiment_ids` (default: every experiment of the store). Deleted runs are left out. Values
    that SQL filters cannot quote safely (quotes, backslashes) are compared here instead."""
    client = MlflowClient()
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    if not experiment_ids:
        return []
    conditions = [f"tags.`{k}` = '{v}'" for k, v in tags.items() if _quotable(v)]
    if status is not None:
        conditions.append(f"attributes.status = '{status}'")
    runs = client.search_runs(list(experiment_ids), " and ".join(conditions), max_results=MAX_RESULTS,
                              order_by=["attributes.start_time DESC"])
    return [r for r in runs if all(r.data.tags.get(k) == v for k, v in tags.items())]


def latest_run(tags: Mapping[str, str], **kwargs: Any) -> Any | None:
    """The newest run of `find_runs(tags, **kwargs)`, or None."""
    found = find_runs(tags, **kwargs)
    return found[0] if found else None


def child_runs(parent_run_id: str) -> list:
    """Every run nested under `parent_run_id` (in any experiment), newest first."""
    return find_runs({PARENT_TAG: parent_run_id})


def children_by(parent_run_id: str, key_tag: str, *, status: str | None = None) -> dict[str, Any]:
    """{value of `key_tag`: the newest child of `parent_run_id` with it} (with `status`, if given)."""
    out: dict[str, Any] = {}
    for found in child_runs(parent_run_id):   # newest first: the first one of each key wins
        key = found.data.tags.get(key_tag)
        if key is not None and key not in out and (status is None or found.info.status == status):
            out[key] = found
    return out


def end_stale_children(parent_run_id: str, reason: str) -> list[str]:
    """Mark KILLED the children of `parent_run_id` left RUNNING (or SCHEDULED) by a process that is
    gone: only call this where no other process trains children of this parent. Returns their ids."""
    stale = [r.info.run_id for r in child_runs(parent_run_id) if r.info.status in ("RUNNING", "SCHEDULED")]
    for run_id in stale:
        end_run(run_id, "KILLED", reason)
    return stale


def adopt_children(parent_run_id: str, earlier_parents: Iterable[Any], *, key_tag: str | None = None,
                   wanted: Collection[str] | None = None, retire: Mapping[str, str] | None = None) -> int:
    """Move under `parent_run_id` the children of `earlier_parents` (earlier runs of the same study or
    sweep: a re-run under `mlflow run` always gets a new parent), so that one parent holds all.

    With `key_tag`, only FINISHED children whose key is in `wanted` and that `parent_run_id` does not
    hold finished already move (one per key; the others stay as history); without it, every child.
    Each earlier parent is tagged superseded_by (plus `retire`), and gets a note saying where its
    children went. Returns how many children moved."""
    have = set(children_by(parent_run_id, key_tag, status="FINISHED")) if key_tag else set()
    client = MlflowClient()
    total = 0
    for old in earlier_parents:
        old_id = old.info.run_id
        if old_id == parent_run_id:
            continue
        moved = 0
        for child in child_runs(old_id):
            if key_tag is not None:
                key = child.data.tags.get(key_tag)
                if child.info.status != "FINISHED" or key in have or (wanted is not None and key not in wanted):
                    continue
                have.add(key)
            client.set_tag(child.info.run_id, PARENT_TAG, parent_run_id)
            client.set_tag(child.info.run_id, ADOPTED_FROM_TAG, old_id)
            moved += 1
        for key, value in {SUPERSEDED_BY_TAG: parent_run_id, **dict(retire or {})}.items():
            client.set_tag(old_id, key, value)
        if moved:
            note = old.data.tags.get(NOTE_TAG, "")
            client.set_tag(old_id, NOTE_TAG, f"**Superseded by run {parent_run_id}**: its children were "
                                             f"moved there.\n\n{note}")
            print(f"moved {moved} child run(s) of earlier parent {old_id} under {parent_run_id}", flush=True)
        total += moved
    return total


@dataclass(frozen=True)
class Parent:
    """A study's or sweep's parent run, as parent_run hands it over."""
    run_id: str
    experiment: str      # its experiment's name: the children's


@contextlib.contextmanager
def parent_run(experiment: str, name: str, match: Mapping[str, str], *, tags: Mapping[str, str] | None = None,
               params: Mapping[str, Any] | None = None, description: str = "", adopt_key: str | None = None,
               wanted: Collection[str] | None = None, retire: Mapping[str, str] | None = None) -> Iterator[Parent]:
    """The parent run of a study or sweep (identified by the tags `match`), ended FINISHED, FAILED or
    KILLED like any run.

    Under `mlflow run` it is the run MLflow made ($MLFLOW_RUN_ID, taken out of the environment here so
    that no child resumes it); else the newest earlier parent with the tags `match` (in any experiment)
    goes on, or a new one starts in `experiment`. As it starts: children left RUNNING by a process that is
    gone end KILLED, and the children of earlier parents with the same tags move under it (see
    `adopt_children` for `adopt_key`, `wanted` and `retire`). It carries `match`, `tags`, the environment
    tags, `params` and `description` (the run page's)."""
    launched = os.environ.pop("MLFLOW_RUN_ID", None)
    found = None if launched else latest_run(match)
    resume = launched or (found.info.run_id if found is not None else None)
    if resume:
        actual = experiment_name(get_run(resume).info.experiment_id)
        if launched and actual != experiment:
            print(f"note: `mlflow run` chose experiment {actual!r}; {experiment!r} is used only outside "
                  f"`mlflow run` (pass --experiment-name to pick it)", flush=True)
    else:
        actual = experiment
    all_tags = {**environment_tags(), **dict(tags or {}), **match, RUN_NAME_TAG: name, NOTE_TAG: description}
    with run(actual, run_name=name, params=params, tags=all_tags, run_id=resume) as active:
        parent_id = active.info.run_id
        how = "made by `mlflow run`" if launched else "resumed" if resume else "new"
        print(f"parent run {parent_id} ({how}) in experiment {actual!r} at {tracking_uri()}", flush=True)
        end_stale_children(parent_id, "stale: its study or sweep was restarted")
        adopt_children(parent_id, find_runs(match), key_tag=adopt_key, wanted=wanted, retire=retire)
        yield Parent(parent_id, actual)


def find_resumable_run(experiment: str, match_tags: Mapping[str, str], run_name: str | None = None) -> Any | None:
    """The latest interrupted training run of `experiment` with `match_tags` (and named `run_name`, if
    given), or None. Interrupted: KILLED, or FAILED with its checkpoint still there (train.py keeps a
    failed run's checkpoint only when it holds what was trained; the `mlflow run` launcher marks a
    killed child FAILED). Only training runs have a checkpoint folder: a study's children do not."""
    for found in find_runs(match_tags, experiment_ids=[experiment_id_for(experiment)]):
        checkpoint = found.data.tags.get(CHECKPOINT_DIR_TAG)
        if checkpoint and run_name in (None, found.info.run_name) and (
                found.info.status == "KILLED" or found.info.status == "FAILED" and Path(checkpoint).is_dir()):
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
    mlflow.set_tag(RESUMED_FROM_RUN_TAG, previous_run_id)
    client.set_tag(previous_run_id, CONTINUED_IN_TAG, run_id)
    client.delete_run(previous_run_id)


# --- per-epoch metrics ---------------------------------------------------------------------------------

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


def epoch_history(run_id: str, keys: Sequence[str] = EPOCH_KEYS) -> dict[str, list[float]]:
    """A run's per-epoch metrics as {key: [value at step 0, 1, ...]}: the whole training of a resumed
    run, across the processes that trained it; where a step was logged twice, the later value."""
    client = MlflowClient()
    history = {}
    for key in keys:
        by_step: dict[int, tuple[int, float]] = {}
        for m in client.get_metric_history(run_id, key):
            if m.step not in by_step or m.timestamp >= by_step[m.step][0]:
                by_step[m.step] = (m.timestamp, m.value)
        if by_step:
            history[key] = [by_step[step][1] for step in sorted(by_step)]
    return history


# --- logging (to the active run, or to `run_id`) -------------------------------------------------------

def _run(run_id: str | None) -> str:
    return run_id or mlflow.active_run().info.run_id


def log_metrics(metrics: Mapping[str, float], step: int | None = None, *, run_id: str | None = None) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    MlflowClient().log_batch(_run(run_id), metrics=[Metric(k, float(v), now, step or 0) for k, v in metrics.items()],
                             synchronous=True)


def log_metrics_once(metrics: Mapping[str, float]) -> None:
    """Log the metrics the active run does not hold yet (a resumed run already has its run-level ones)."""
    existing = MlflowClient().get_run(_run(None)).data.metrics
    fresh = {k: v for k, v in metrics.items() if k not in existing}
    if fresh:
        log_metrics(fresh)


def set_tags(tags: Mapping[str, str], *, run_id: str | None = None) -> None:
    from mlflow.entities import RunTag

    MlflowClient().log_batch(_run(run_id), tags=[RunTag(k, str(v)) for k, v in tags.items()], synchronous=True)


def log_text(text: str, artifact_file: str, *, run_id: str | None = None) -> None:
    MlflowClient().log_text(_run(run_id), text, artifact_file)


def log_dict(data: Mapping[str, Any], artifact_file: str, *, run_id: str | None = None) -> None:
    MlflowClient().log_dict(_run(run_id), dict(data), artifact_file)


def log_figure(figure, artifact_file: str, *, run_id: str | None = None) -> None:
    """Log a matplotlib figure as an image, then close it."""
    import matplotlib.pyplot as plt

    MlflowClient().log_figure(_run(run_id), figure, artifact_file)
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
    for attempt in range(3):
        try:
            mlflow.log_input(dataset, context=context, tags={"num_examples": str(num_examples)})
            return
        except Exception as err:   # noqa: BLE001 - only the race below is retried
            # Two children (`ablate --parallel`) logging the same dataset into one SQLite store at once race
            # to create its row; the loser gets "UNIQUE constraint failed" and, tried again, finds the row.
            if "UNIQUE constraint failed" not in str(err) or attempt == 2:
                raise
            time.sleep(0.2 * (attempt + 1))


def log_keras_model(model, example_batch, metadata) -> None:
    """The trained model as a self-contained MLflow model, `runs:/<run id>/model` (serving.log_model):
    it loads with mlflow.pyfunc / `mlflow models serve` anywhere and classifies raw images.

    `metadata`: inference.model_metadata(data), the class names and preprocessing (and mean image) of
    the training data; `example_batch`: a batch of model inputs, whose first image becomes the input
    example."""
    from . import serving

    serving.log_model(model, metadata, example_batch)


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


def log_table(columns: Mapping[str, Sequence[Any]], artifact_file: str, *, run_id: str | None = None) -> None:
    """A table ({column: values}) as an MLflow table artifact (JSON), which the UI's artifact view shows
    as a table; `artifact_file` must end in .json."""
    mlflow.log_table(dict(columns), artifact_file, run_id=run_id)
