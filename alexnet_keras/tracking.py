"""Every MLflow call of training, studies and sweeps, and every tag name the project writes (the model as a
pyfunc that loads, serves and registers is serving.py's); how runs end and are found again: docs/reliability.md."""

import contextlib
import functools
import json
import logging
import os
import platform
import random
import re
import signal
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Collection, Iterable, Iterator, Mapping, Sequence
from urllib.parse import urlparse

import mlflow
import psutil
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils import git_utils

# MLflow logs each failed query of a SQL store with its traceback, then raises the error (reported in one line).
logging.getLogger("mlflow.store.db.utils").addFilter(lambda record: "SQLAlchemy database error" not in str(record.msg))

# --- tag and artifact names: typed here only ---------------------------------------------------------
TAG_PREFIX = "alexnet_keras."
PARENT_TAG = "mlflow.parentRunId"            # MLflow's own: nests a run under its parent in the UI
RUN_NAME_TAG = "mlflow.runName"
NOTE_TAG = "mlflow.note.content"             # the description of a run or logged model page
ERROR_TAG = "error"                          # why a run ended FAILED
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"   # without it the UI may open an experiment in its GenAI layout
# Every training run (train.py).
CONFIG_DIGEST_TAG = TAG_PREFIX + "config_digest"
DATA_DIGEST_TAG = TAG_PREFIX + "data_digest"
VARIANT_NAME_TAG = TAG_PREFIX + "variant"
NUM_PARAMS_TAG = TAG_PREFIX + "num_params"
CHECKPOINT_DIR_TAG = TAG_PREFIX + "checkpoint_dir"
RESUMED_FROM_EPOCH_TAG = TAG_PREFIX + "resumed_from_epoch"
JOB_TAG = TAG_PREFIX + "job"
# Where a study's child or a sweep's worker ran (cluster.py): its GPU, Ray task (one id for its retries), node.
VISIBLE_DEVICES_TAG = TAG_PREFIX + "cuda_visible_devices"
RAY_TASK_TAG = TAG_PREFIX + "ray_task_id"
RAY_NODE_TAG = TAG_PREFIX + "ray_node_id"
# Who owns a run (host, process and its start time), why it ended, which parent took over a child.
HOST_TAG = TAG_PREFIX + "host"
PID_TAG = TAG_PREFIX + "pid"
PID_START_TAG = TAG_PREFIX + "pid_start"
END_REASON_TAG = TAG_PREFIX + "end_reason"
ADOPTED_FROM_TAG = TAG_PREFIX + "adopted_from"
SUPERSEDED_BY_TAG = TAG_PREFIX + "superseded_by"
LEASE_TAG = TAG_PREFIX + "lease."                # + a claim's token (its time in ns, then random); value: `owner()`
LEASE_RIVAL_S = 2                                # a claim younger than this may be a rival's, which gives way too
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
# On a model version `ablate --register` / `tune --register` chose: the parent run, the metric and its value.
PARENT_RUN_TAG = TAG_PREFIX + "parent_run_id"
SELECTION_METRIC_TAG = TAG_PREFIX + "selection_metric"
SELECTION_VALUE_TAG = TAG_PREFIX + "selection_value"
# The per-epoch metrics Keras logs (step = epoch).
EPOCH_KEYS = ("loss", "accuracy", "top5_accuracy", "val_loss", "val_accuracy", "val_top5_accuracy")


class TrackingError(RuntimeError):
    """The MLflow store cannot be used (unreachable, not writable, ...)."""


def configure(tracking_uri: str | None = None) -> str:
    """Point MLflow at `tracking_uri`, else $MLFLOW_TRACKING_URI, else `./mlflow.db` (MLflow refuses `./mlruns`)."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
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


tracking_uri = mlflow.get_tracking_uri


def open_experiment(name: str) -> str:
    """Create-or-get the experiment `name` and make it the current one; its id. Surfaces store errors
    before any training (and creates the experiment before a fan-out of processes, mlflow#4123)."""
    root = Path.cwd() / "mlruns"   # where a local store puts a new experiment's artifacts, for good
    writable = os.access(next(p for p in (root, *root.parents) if p.exists()), os.W_OK)
    if not writable and urlparse(mlflow.get_tracking_uri()).scheme in ("sqlite", "file", "") and (
            mlflow.get_experiment_by_name(name) is None):
        raise TrackingError(f"a new experiment {name!r} would keep its artifacts in {str(root)!r}, which is not "
                            f"writable; it is not created. Run from a writable folder, or pass an existing "
                            f"--experiment.")
    try:
        experiment = mlflow.set_experiment(name)
    except Exception as err:  # store unreachable, schema locked, permission denied ...
        raise TrackingError(f"could not open MLflow experiment {name!r} at {mlflow.get_tracking_uri()!r}: "
                            f"{err}") from err
    mark_model_training(experiment)
    return experiment.experiment_id


def mark_model_training(experiment) -> None:
    """Tag `experiment` as model training for the UI, unless it has a kind already."""
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        try:
            MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, "custom_model_development")
        except mlflow.exceptions.MlflowException:   # SQLite: UNIQUE constraint, when another process set it first
            if EXPERIMENT_KIND_TAG not in MlflowClient().get_experiment(experiment.experiment_id).tags:
                raise


def artifact_location(experiment_id: str) -> str:
    """Where the runs of an experiment keep their artifacts (fixed when the experiment was created)."""
    return MlflowClient().get_experiment(experiment_id).artifact_location


def experiment_id_for(experiment: str) -> str:
    """The experiment this process logs to: `experiment`, or under `mlflow run` its run's, with a note
    (once) when that is another one than where `alexnet-keras` runs go."""
    launched = os.environ.get("MLFLOW_RUN_ID")
    if not launched:
        return open_experiment(experiment)
    try:
        found = mlflow.get_experiment(MlflowClient().get_run(launched).info.experiment_id)
    except Exception as err:
        raise TrackingError(f"cannot read the run {launched!r} that `mlflow run` started, at "
                            f"{mlflow.get_tracking_uri()!r}: {err}") from err
    mark_model_training(found)
    if found.name != experiment:
        _note_once(f"note: `mlflow run` put run {launched} in experiment {found.name!r}, not {experiment!r} where "
                   f"`alexnet-keras` runs go; to compare them, pass `--experiment-name {experiment}` to "
                   f"`mlflow run` (or set MLFLOW_EXPERIMENT_NAME).", flush=True)
    return found.experiment_id


_note_once = functools.cache(print)   # each note once per process


def preflight(experiment: str) -> None:
    """Fail before any data is read or any run exists if the store (a server: within seconds) or the local
    artifact folder (a probe file) of the experiment this process logs to is unusable; it is created if needed."""
    with quick_requests():
        try:
            found = mlflow.get_experiment(experiment_id_for(experiment))
        except Exception as err:
            uri = mlflow.get_tracking_uri()
            if not uri.startswith(("http://", "https://")):
                raise
            raise TrackingError(f"the MLflow tracking server {uri!r} cannot be reached or refused the request "
                                f"({_short(err)}). Start it (e.g. `mlflow server --host 127.0.0.1 --port 5000`), "
                                f"or pass --tracking-uri (or set MLFLOW_TRACKING_URI) to a store that "
                                f"works.") from None
    parsed = urlparse(found.artifact_location)
    if parsed.scheme not in ("", "file"):
        return  # a remote artifact store (s3://, mlflow-artifacts:/ ...) reports its own errors
    local = Path(parsed.path if parsed.scheme else found.artifact_location)
    try:
        local.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=local, prefix=".write-probe-"):
            pass
    except OSError as err:
        raise TrackingError(f"MLflow artifact folder {str(local)!r} of experiment {experiment!r} is not "
                            f"writable ({err.strerror or err}). Free space or fix permissions there, or use "
                            f"another experiment (--experiment) or store (--tracking-uri).") from None


# Instead of MLflow's 7 retries of up to 120 s each (docs/reliability.md); a value the user set stays.
QUICK_REQUESTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@contextlib.contextmanager
def quick_requests() -> Iterator[None]:
    """Within: MLflow's HTTP requests give up within seconds (MLflow reads these on every request)."""
    added = [key for key in QUICK_REQUESTS if key not in os.environ]
    os.environ.update({key: QUICK_REQUESTS[key] for key in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def store_answers() -> bool:
    """Whether the store answers now, within seconds (a failed child's own error may not name the store)."""
    with quick_requests(), contextlib.suppress(Exception):
        MlflowClient().search_experiments(max_results=1)
        return True
    return False


def _short(err: BaseException) -> str:
    """The reason in an MLflow request error (e.g. "[Errno 111] Connection refused"), else its message."""
    text = " ".join(str(getattr(err, "message", None) or err).split()).split(" [SQL: ")[0]   # without its SQL query
    reason = re.search(r"\[Errno -?\d+\][^\"')]*|Failed to resolve '[^']*'|Read timed out[^\"')]*", text)
    if reason:
        return reason.group(0).strip(" .")
    return text if len(text) <= 300 else text[:297] + "..."


def is_tracking_error(err: BaseException) -> bool:
    """Whether `err` (or what caused it) comes from MLflow or its store, rather than from training."""
    return any(isinstance(e, TrackingError) or type(e).__module__.split(".")[0] in ("mlflow", "sqlalchemy", "sqlite3")
               for e in (err, err.__cause__, err.__context__) if e is not None)


def environment_tags() -> dict[str, str]:
    """Backend, device and library versions: what is needed to reproduce a number."""
    import importlib.metadata

    import keras

    device = f"cpu:{platform.processor() or platform.machine()} x{os.cpu_count()}"
    with contextlib.suppress(Exception):  # a device query must never stop a run
        if keras.backend.backend() == "torch":
            import torch

            if torch.cuda.is_available():
                device = f"cuda:{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
        elif (devices := keras.distribution.list_devices())[0].split(":")[0] != "cpu":   # jax and tensorflow
            device = f"{devices[0].split(':')[0]} x{len(devices)}"
    tags = {"keras_backend": keras.backend.backend(), "python_version": platform.python_version(),
            "platform": platform.platform(), "device": device}
    for package in ("keras", "mlflow", "numpy", "tensorflow", "jax", "torch"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            tags[f"{package}_version"] = importlib.metadata.version(package)
    return {TAG_PREFIX + k: v for k, v in tags.items()}


@functools.cache
def git_tags(folder: str) -> dict[str, str]:
    """MLflow's source tags of the git checkout holding `folder` (none outside one). MLflow looks only where
    the entry script is, which for the `alexnet-keras` command is a git-ignored virtualenv."""
    commit = git_utils.get_git_commit(folder)
    if commit is None:
        return {}
    tags = {"mlflow.source.git.commit": commit, "mlflow.source.git.branch": git_utils.get_git_branch(folder),
            "mlflow.source.git.repoURL": git_utils.get_git_repo_url(folder)}
    return {k: v for k, v in tags.items() if v is not None}


def log_params(params: Mapping[str, Any]) -> None:
    """Log params on the active run, skipping keys already on it: `mlflow run` logged its entry point's
    as typed (`-P lrn=False`), and MLflow refuses to change a param ("False" to "false")."""
    from .tables import value_text

    existing = MlflowClient().get_run(mlflow.active_run().info.run_id).data.params
    fresh = {k: value_text(v) for k, v in params.items() if k not in existing}
    if fresh:
        mlflow.log_params(fresh)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within: SIGTERM (a scheduler stopping the job) takes Ctrl-C's path, so runs end KILLED (main thread only)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def run(experiment: str, *, run_name: str | None = None, params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None, nested: bool = False,
        parent_run_id: str | None = None, run_id: str | None = None,
        system_metrics: bool | None = None) -> Iterator[mlflow.ActiveRun]:
    """Start, or resume (`run_id`; else $MLFLOW_RUN_ID for a top-level run under `mlflow run`), a run
    that ends FINISHED, FAILED or KILLED. A child is nested when its parent is this process's active run;
    a top-level run turns SIGTERM into Ctrl-C. `system_metrics`: True / False, or None for MLflow's own switch."""
    if system_metrics:   # a sample every 2 s, each logged (MLflow's 10 s leave short runs empty); the user's win
        os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "2")
        os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    if parent_run_id is not None and active_run_id() == parent_run_id:
        nested = True   # MLflow refuses a second active run unless it is nested
    top_level = not nested and parent_run_id is None
    run_id = run_id or (os.environ.get("MLFLOW_RUN_ID") if top_level else None)
    if run_id is not None:
        found = get_run(run_id)
        theirs, ours = found.data.tags.get(CONFIG_DIGEST_TAG), dict(tags or {}).get(CONFIG_DIGEST_TAG)
        if theirs and ours and theirs != ours:
            raise TrackingError(f"run {run_id} was started with config digest {theirs}, this command's config has "
                                f"digest {ours}: continuing it would mix two configurations. Give the options it was "
                                f"started with (its params), or start a new run (without MLFLOW_RUN_ID).")
        claim = lease(run_id)
        # start_run(run_id=...) refuses a run of another experiment than the last set_experiment().
        mark_model_training(mlflow.set_experiment(experiment_id=found.info.experiment_id))
        active = mlflow.start_run(run_id=run_id, nested=nested, log_system_metrics=system_metrics)
        for key in {END_REASON_TAG, ERROR_TAG} & set(active.data.tags):   # why it ended last time; it runs again
            MlflowClient().delete_tag(run_id, key)
    else:   # claimed as it is made: no other process can have claimed it before
        claim = f"{LEASE_TAG}{time.time_ns()}-{uuid.uuid4().hex[:8]}"
        active = mlflow.start_run(experiment_id=open_experiment(experiment), run_name=run_name, nested=nested,
                                  parent_run_id=parent_run_id, log_system_metrics=system_metrics, tags={claim: owner()})
    owner_tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), PID_START_TAG: process_start(os.getpid())}
    source = {k: v for k, v in git_tags(os.getcwd()).items() if k not in active.data.tags}
    with sigterm_as_interrupt() if top_level else contextlib.nullcontext():
        try:
            mlflow.set_tags({**source, **owner_tags, **dict(tags or {})})
            if params:
                log_params(params)
            yield active
        except BaseException as err:
            interrupted = isinstance(err, KeyboardInterrupt)
            why = (END_REASON_TAG, "interrupted") if interrupted else (ERROR_TAG, f"{type(err).__name__}: {err}"[:5000])
            # The store may be what failed (a server gone): the interrupt or error goes up, not the
            # store's complaint about ending the run (mlflow.end_run leaves no active run either way).
            with contextlib.suppress(Exception):
                mlflow.set_tag(*why)
            with contextlib.suppress(Exception):
                mlflow.end_run("KILLED" if interrupted else "FAILED")
            raise
        else:
            mlflow.end_run("FINISHED")
        finally:   # once ended: a claim given back earlier could let another process in before the end
            with contextlib.suppress(Exception):
                MlflowClient().delete_tag(active.info.run_id, claim)


def active_run_id() -> str | None:
    active = mlflow.active_run()
    return active.info.run_id if active is not None else None


# --- who owns a run ----------------------------------------------------------------------------------

def process_start(pid: int) -> str:
    """When process `pid` started: a reused pid is not the run's owner."""
    return str(psutil.Process(pid).create_time())


def _process_alive(pid: int, start: str | None) -> bool:
    try:
        return process_start(pid) == start or not start
    except psutil.NoSuchProcess:   # a zombie too
        return False


def owner() -> str:
    """This process as the value of a claim: host, pid and start."""
    return json.dumps([socket.gethostname(), os.getpid(), process_start(os.getpid())])


def live_claims(runs: Iterable[Any]) -> list[tuple[str, str, str]]:
    """(tag, owner, run id) of the claims on `runs` of live processes (all of other hosts), oldest first."""
    claims = [(k, v, r.info.run_id) for r in runs for k, v in r.data.tags.items() if k.startswith(LEASE_TAG)]
    here = socket.gethostname()
    return sorted(c for c in claims if json.loads(c[1])[0] != here or _process_alive(*json.loads(c[1])[1:]))


def lease(run_id: str, match: Mapping[str, str] | None = None) -> str:
    """This process's claim tag on `run_id`, or TrackingError naming who holds it or (`match`) a rival parent."""
    client, me = MlflowClient(), owner()
    held = [k for k, v in get_run(run_id).data.tags.items() if k.startswith(LEASE_TAG) and v == me]
    while not held:   # written, then read: of two claimants at least one sees the other's claim
        claim = f"{LEASE_TAG}{time.time_ns()}-{uuid.uuid4().hex[:8]}"
        client.set_tag(run_id, claim, me)
        rivals = {r.info.run_id: r for r in [*(find_runs(match) if match else []), get_run(run_id)]}
        others = [c for c in live_claims(rivals.values()) if c[1] != me]
        if not others:
            return claim
        client.delete_tag(run_id, claim)
        tag, holder, where = others[0]
        (host, pid, _), since = json.loads(holder), int(tag[len(LEASE_TAG):].split("-")[0]) / 1e9
        if time.time() - since > LEASE_RIVAL_S:   # a younger claim may be a rival's that gives way too: try again
            raise TrackingError(f"run {where} is taken by process {pid} on host {host} since "
                                f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(since))}, which is still "
                                f"running: wait for it to end (or stop it), then run the same command again to "
                                f"continue; `train --resume false` trains a new run instead.")
        time.sleep(random.uniform(0.05, 0.5))
    return held[0]


def mark_dead_runs(experiment: str) -> list[str]:
    """Mark KILLED the runs of `experiment` RUNNING whose process on this host is gone (none claims it); their ids."""
    host, marked = socket.gethostname(), []
    for found in find_runs({HOST_TAG: host}, experiment_ids=[experiment_id_for(experiment)], status="RUNNING"):
        pid = found.data.tags.get(PID_TAG, "")
        if not pid.isdigit() or live_claims([found]) or _process_alive(int(pid), found.data.tags.get(PID_START_TAG)):
            continue
        end_run(found.info.run_id, "KILLED", f"process {pid} on {host} died while the run was RUNNING")
        marked.append(found.info.run_id)
    return marked


def end_run(run_id: str, status: str, reason: str) -> None:
    """End `run_id` with `status`, saying why in its end_reason tag (as this process's active run too, if it is)."""
    client = MlflowClient()
    client.set_tag(run_id, END_REASON_TAG, reason)
    client.set_terminated(run_id, status)
    if (active := mlflow.active_run()) is not None and active.info.run_id == run_id:
        mlflow.end_run(status)


def delete_tag(run_id: str, key: str) -> None:
    MlflowClient().delete_tag(run_id, key)


# --- finding runs, parents and children ------------------------------------------------------------------

def find_runs(tags: Mapping[str, str], *, experiment_ids: Sequence[str] | None = None,
              status: str | None = None) -> list:
    """The runs (not deleted) with `tags` (and `status`), newest first, in `experiment_ids` (default: all)."""
    client = MlflowClient()
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    conditions = [f"tags.`{k}` = '{v}'" for k, v in tags.items() if "'" not in v and "\\" not in v]   # others: below
    conditions += [f"attributes.status = '{status}'"] if status is not None else []
    runs = client.search_runs(list(experiment_ids), " and ".join(conditions), max_results=50000,
                              order_by=["attributes.start_time DESC"]) if experiment_ids else []
    return [r for r in runs if all(r.data.tags.get(k) == v for k, v in tags.items())]


def child_runs(parent_run_id: str) -> list:
    """Every run nested under `parent_run_id` (in any experiment), newest first."""
    return find_runs({PARENT_TAG: parent_run_id})


def children_by(parent_run_id: str, key_tag: str, *, status: str | None = None) -> dict[str, Any]:
    """{value of `key_tag`: the newest child of `parent_run_id` with it} (with `status`, if given)."""
    runs = [r for r in child_runs(parent_run_id) if key_tag in r.data.tags and status in (None, r.info.status)]
    return {r.data.tags[key_tag]: r for r in reversed(runs)}   # oldest first: the newest of each key stays


def end_stale_children(parent_run_id: str, reason: str, digest: str | None = None) -> list[str]:
    """Mark KILLED the children of `parent_run_id` (with `digest`: its runs) left RUNNING or SCHEDULED; their ids."""
    stale = [r.info.run_id for r in child_runs(parent_run_id) if r.info.status in ("RUNNING", "SCHEDULED")
             and digest in (None, r.data.tags.get(CONFIG_DIGEST_TAG))]
    for run_id in stale:
        end_run(run_id, "KILLED", reason)
        print(f"ended KILLED the run {run_id}: {reason}", flush=True)
    return stale


def adopt_children(parent_run_id: str, earlier_parents: Iterable[Any], *, key_tag: str | None = None,
                   wanted: Collection[str] | None = None, retire: Mapping[str, str] | None = None) -> int:
    """Move under `parent_run_id` the children of `earlier_parents` (with `key_tag`: FINISHED ones, one per `wanted`
    key it lacks) and tag those parents superseded (plus `retire`). Returns how many moved."""
    have, total = set(children_by(parent_run_id, key_tag, status="FINISHED")) if key_tag else set(), 0
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
            set_tags({PARENT_TAG: parent_run_id, ADOPTED_FROM_TAG: old_id}, run_id=child.info.run_id)
            moved += 1
        set_tags({SUPERSEDED_BY_TAG: parent_run_id, **dict(retire or {})}, run_id=old_id)
        if moved:
            set_tags({NOTE_TAG: f"**Superseded by run {parent_run_id}**: its children were moved there.\n\n"
                                f"{old.data.tags.get(NOTE_TAG, '')}"}, run_id=old_id)
            print(f"moved {moved} child run(s) of earlier parent {old_id} under {parent_run_id}", flush=True)
        total += moved
    return total


@contextlib.contextmanager
def parent_run(experiment: str, name: str, match: Mapping[str, str], *, tags: Mapping[str, str] | None = None,
               params: Mapping[str, Any] | None = None, description: str = "", adopt_key: str | None = None,
               wanted: Collection[str] | None = None, retire: Mapping | None = None) -> Iterator[tuple[str, str]]:
    """(Run id, experiment) of a study's or sweep's parent with `match`, `tags` and the environment's, once leased:
    `mlflow run`'s, else the newest with `match`, else new. It ends stale children, adopts earlier parents' ones."""
    if "MLFLOW_RUN_ID" in os.environ:
        experiment_id_for(experiment)   # the note when `mlflow run` chose another experiment
    launched, made = os.environ.pop("MLFLOW_RUN_ID", None), None
    resume = launched or next((r.info.run_id for r in find_runs(match)), None)
    actual = MlflowClient().get_experiment(get_run(resume).info.experiment_id).name if resume else experiment
    all_tags = {**environment_tags(), **dict(tags or {}), **match, RUN_NAME_TAG: name, NOTE_TAG: description}
    if resume is None:   # made with its tags, so that an identical command finds it, and claimed before it runs
        resume = made = MlflowClient().create_run(open_experiment(experiment), tags=resolve_tags(all_tags)).info.run_id
    try:
        lease(resume, match)
    except TrackingError:
        if made and not live_claims([get_run(made)]):   # lost to another command: the parent made here goes
            MlflowClient().delete_run(made)
        raise
    with run(actual, run_name=name, params=params, tags=all_tags, run_id=resume) as active:
        parent_id = active.info.run_id
        how = "made by `mlflow run`" if launched else "new" if made else "resumed"
        print(f"parent run {parent_id} ({how}) in experiment {actual!r} at {tracking_uri()}", flush=True)
        end_stale_children(parent_id, "stale: its study or sweep was restarted")
        adopt_children(parent_id, find_runs(match), key_tag=adopt_key, wanted=wanted, retire=retire)
        yield parent_id, actual


def find_resumable_run(experiment: str, match_tags: Mapping[str, str], run_name: str | None = None) -> Any | None:
    """The latest run of `experiment` with `match_tags` (and `run_name`) that can be continued, or None."""
    for found in find_runs(match_tags, experiment_ids=[experiment_id_for(experiment)]):
        checkpoint = found.data.tags.get(CHECKPOINT_DIR_TAG)   # RUNNING: lease() refuses it while its owner lives
        if checkpoint and run_name in (None, found.info.run_name) and found.info.status != "FINISHED" and (
                found.info.status != "FAILED" or Path(checkpoint).is_dir()):
            return found
    return None


def adopt_run(previous_run_id: str) -> None:
    """Continue `previous_run_id` in the active run (`mlflow run` makes a new one): copy its metrics, delete it."""
    client = MlflowClient()
    run_id = mlflow.active_run().info.run_id
    history = [m for key in client.get_run(previous_run_id).data.metrics
               for m in client.get_metric_history(previous_run_id, key)]
    for start in range(0, len(history), 1000):   # MLflow's log_batch limit
        client.log_batch(run_id, metrics=history[start:start + 1000], synchronous=True)
    set_tags({TAG_PREFIX + "resumed_from_run": previous_run_id})
    set_tags({TAG_PREFIX + "continued_in": run_id}, run_id=previous_run_id)
    client.delete_run(previous_run_id)


# --- per-epoch metrics ---------------------------------------------------------------------------------

STORE_WAIT_ENV = "ALEXNET_KERAS_STORE_WAIT_S"   # how long epoch metrics wait for a store that stopped answering


def epoch_metrics_callback(skip_logged_steps: bool = False, unlogged: list | None = None):
    """A Keras callback that logs the optimizer's settings, and each epoch's metrics (step = epoch) as it ends,
    synchronously (`mlflow.keras.MlflowCallback` queues them: lost if the process is killed). With
    `skip_logged_steps` (a run resumed from a checkpoint), an epoch the run holds keeps its first values. Metrics the
    store does not take wait in `unlogged` (the checkpoint keeps them) for a while: docs/reliability.md, 8.5."""
    import keras   # here, not at the top: `report` and the other store-only commands need no Keras

    class EpochMetrics(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.run_id = active_run_id()   # None: a plain fit, nothing to log
            self.logged_steps, self.unlogged, self.down_since = set(), [] if unlogged is None else unlogged, None
            if self.run_id is None:
                return
            if skip_logged_steps:
                self.logged_steps = {m.step for m in MlflowClient().get_metric_history(self.run_id, "loss")}
            log_params({f"optimizer_{k}": v for k, v in self.model.optimizer.get_config().items()})

        def on_epoch_end(self, epoch, logs=None):
            if self.run_id and logs and epoch not in self.logged_steps:
                self.unlogged.extend((k, float(v), int(time.time() * 1000), epoch) for k, v in logs.items())
                self.logged_steps.add(epoch)
                self.write()

        def on_train_end(self, logs=None):
            while self.run_id and not self.write():
                time.sleep(min(30.0, 1 + time.monotonic() - self.down_since))   # waits about double each time

        def write(self) -> bool:   # False while the store does not answer
            try:
                with quick_requests():   # a server that is down fails within seconds, then is retried here
                    while batch := [Metric(*m) for m in self.unlogged[:1000]]:   # MLflow's limit of a call
                        MlflowClient().log_batch(self.run_id, batch, synchronous=True)
                        del self.unlogged[:len(batch)]
            except Exception as err:   # MLflow's: the store is locked, down or slow (a row written again is kept once)
                limit = float(os.environ.get(STORE_WAIT_ENV, 120))
                if self.down_since is None:
                    self.down_since = time.monotonic()
                    stderr(f"warning: the MLflow store does not take the metrics of epoch {self.unlogged[-1][3] + 1} "
                           f"({_short(err)}); training goes on, they wait for up to {limit:g} s (${STORE_WAIT_ENV}).")
                if time.monotonic() - self.down_since > limit:
                    raise TrackingError(f"the MLflow store has not answered for {limit:g} s ({_short(err)})") from err
                return False
            if self.down_since is not None:
                stderr(f"the MLflow store answers again after {time.monotonic() - self.down_since:.0f} s: the metrics "
                       f"that waited are written.")
            self.down_since = None
            return True

    return EpochMetrics()


def epoch_history(run_id: str, keys: Sequence[str] = EPOCH_KEYS) -> dict[str, list[float]]:
    """A run's per-epoch metrics as {key: [value at step 0, 1, ...]}; of a step logged twice, the later value."""
    client = MlflowClient()
    by_key = {key: {m.step: m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)}
              for key in keys}
    return {key: [by_step[step] for step in sorted(by_step)] for key, by_step in by_key.items() if by_step}


# --- logging (to the active run, or to `run_id`) -------------------------------------------------------

def log_metrics(metrics: Mapping[str, float], step: int | None = None, *, run_id: str | None = None) -> None:
    now = int(time.time() * 1000)
    MlflowClient().log_batch(run_id or mlflow.active_run().info.run_id, synchronous=True,
                             metrics=[Metric(k, float(v), now, step or 0) for k, v in metrics.items()])


def log_metrics_once(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log the metrics the active run does not hold yet (a resumed run already has its run-level ones)."""
    existing = MlflowClient().get_run(mlflow.active_run().info.run_id).data.metrics
    log_metrics({k: v for k, v in metrics.items() if k not in existing}, step=step)   # none: MLflow does nothing


def set_tags(tags: Mapping[str, str], *, run_id: str | None = None) -> None:
    MlflowClient().log_batch(run_id or mlflow.active_run().info.run_id, synchronous=True,
                             tags=[RunTag(k, str(v)) for k, v in tags.items()])


log_text = mlflow.log_text
log_dict = mlflow.log_dict
load_dict = mlflow.artifacts.load_dict   # a downloaded JSON/YAML artifact, its temporary folder removed
log_table = mlflow.log_table   # a table ({column: values}) as JSON, which the UI's artifact view shows as one


def log_figure(figure, artifact_file: str, *, run_id: str | None = None) -> None:
    """Log a matplotlib figure as an image, then close it."""
    import matplotlib.pyplot as plt

    MlflowClient().log_figure(run_id or mlflow.active_run().info.run_id, figure, artifact_file)
    plt.close(figure)


def log_dataset(name: str, source: str, digest: str, context: str, num_examples: int) -> None:
    """Record which data a run used, without walking a tf.data pipeline (mlflow#9600)."""
    import warnings

    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are local files
        warnings.simplefilter("ignore", UserWarning)
        origin = resolve_dataset_source(os.path.abspath(source)) if os.path.exists(source) else CodeDatasetSource(
            tags={"origin": source})
    for attempt in range(3):
        try:
            return mlflow.log_input(MetaDataset(source=origin, name=name, digest=digest), context=context,
                                    tags={"num_examples": str(num_examples)})
        except Exception as err:   # noqa: BLE001 - only the race below is retried
            # Two children (`ablate --parallel`) create one dataset's row at once: the loser, tried again, finds it.
            if "UNIQUE constraint failed" not in str(err) or attempt == 2:
                raise


def log_keras_model(model, example_batch, metadata, evaluated_on: Mapping[str, Sequence[str]] | None = None) -> str:
    """The trained model as a self-contained MLflow model (serving.log_model) described as its run; its id.
    `evaluated_on` ({dataset context: keys of run metrics computed on it}): each metric's latest value is linked
    to the model and to the dataset the run logged for that context (the model page's metrics and datasets)."""
    from . import serving

    client = MlflowClient()
    run = client.get_run(mlflow.active_run().info.run_id)
    model_id = serving.log_model(model, metadata, example_batch).model_id
    client.set_logged_model_tags(model_id, {NOTE_TAG: run.data.tags.get(NOTE_TAG, "")})
    datasets = {t.value: i.dataset for i in run.inputs.dataset_inputs for t in i.tags if t.key == "mlflow.data.context"}
    # MLflow links the run's step-0 metrics itself (without their dataset) as it logs the model: each once.
    linked = {(m.key, m.step, m.timestamp) for m in client.get_logged_model(model_id).metrics or ()}
    latest = [(max(client.get_metric_history(run.info.run_id, key), key=lambda m: m.timestamp), datasets[context])
              for context, keys in (evaluated_on or {}).items() if context in datasets for key in keys]
    client.log_batch(run.info.run_id, synchronous=True, metrics=[
        Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id, dataset_name=d.name, dataset_digest=d.digest)
        for m, d in latest if (m.key, m.step, m.timestamp) not in linked])
    return model_id


def log_preprocessing(data) -> None:
    """The paper recipe's training-set statistics and mean image under `preprocessing/` (predict.py reads it)."""
    if data.recipe_stats is not None:
        mlflow.log_dict(dict(data.recipe_stats), "preprocessing/statistics.json")
    if data.mean_image is not None:
        import numpy as np

        with tempfile.TemporaryDirectory() as folder:
            np.save(os.path.join(folder, "mean_image.npy"), np.asarray(data.mean_image, np.float32))
            mlflow.log_artifact(os.path.join(folder, "mean_image.npy"), "preprocessing")


def get_run(run_id: str):
    try:
        return MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException as err:
        raise TrackingError(f"no MLflow run {run_id!r} in {mlflow.get_tracking_uri()!r}: {err.message}. "
                            f"List runs with `mlflow runs list --experiment-id ID` or open `mlflow ui`.") from None



flush = mlflow.flush_async_logging   # what MLFLOW_ENABLE_ASYNC_LOGGING queues (this module logs synchronously)


def dumps(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


def stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
