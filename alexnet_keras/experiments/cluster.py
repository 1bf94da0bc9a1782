"""Ray clusters, where the children of a study and the trials of a sweep run (docs/cluster.md): `connect`
starts a local cluster on 127.0.0.1 or joins one, `check_store` refuses before anything starts an MLflow
store that some node cannot write to, `run_jobs` runs picklable callables as Ray tasks (one GPU each
where the cluster has GPUs, else CPUs), retried when their process or node dies. Ray is an optional
extra (`pip install -e '.[ray]'`), imported only by the functions that need it.

Loopback: Ray 2.60 on Linux rewrites 127.0.0.1 / localhost to the machine's outward address unless
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is set when Ray is imported: `connect` sets it for a local cluster
and a loopback address, and checks afterwards that every node is on loopback.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence
from urllib.parse import urlparse

from ..config import ConfigError

LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
RAY_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")   # the names Ray rewrites to the outward address
INSTALL_HINT = "pip install -e '.[ray]' (or pip install 'ray>=2.60')"


class ClusterError(ConfigError):
    """The cluster cannot run this (Ray missing, no cluster at the address, a store it cannot share...).
    A ConfigError: raised before any child starts, and the CLI prints it as one message, exit status 2."""


# ----------------------------------------------------------------------------------------------
# Connecting
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Node:
    node_id: str
    address: str          # the IP address the node advertises
    cpus: float
    gpus: float


@dataclass(frozen=True)
class ClusterInfo:
    address: str                      # the cluster's (GCS) address, host:port
    nodes: tuple[Node, ...]           # the nodes alive when this was read
    started_here: bool = False        # connect() started it (disconnect() stops it)

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def cpus(self) -> float:
        return sum(n.cpus for n in self.nodes)

    @property
    def gpus(self) -> float:
        return sum(n.gpus for n in self.nodes)

    def describe(self) -> str:
        where = "local Ray cluster" if self.started_here else "Ray cluster"
        hosts = ", ".join(sorted({n.address for n in self.nodes}))
        return (f"{where} at {self.address}: {self.num_nodes} node(s) on {hosts}, {self.cpus:g} CPU(s), "
                f"{self.gpus:g} GPU(s)")


def _is_loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def _split_address(address: str) -> tuple[str, int]:
    """"host:port" / "[v6]:port" -> (host, port); a ClusterError for anything else."""
    match = re.fullmatch(r"\[?([^\[\]]+?)\]?:(\d{1,5})", address.strip())
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ClusterError(f"--ray {address!r}: expected a cluster address HOST:PORT (e.g. 10.0.0.5:6379), "
                           f"`auto` to join the cluster this machine belongs to, or no address to start a "
                           f"local cluster.")
    return match.group(1), int(match.group(2))


def _wants_loopback(address: str | None) -> bool:
    """True when Ray would otherwise rewrite the node or cluster address to the outward one."""
    if address in (None, "local"):
        return True
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS") or ""
        if not address or address in ("auto", "local"):
            return False
    host = _split_address(address.removeprefix("ray://"))[0]
    return host.lower() in RAY_LOOPBACK_HOSTS


def _import_ray(keep_loopback: bool):
    switched = keep_loopback and "ray" not in sys.modules and LOOPBACK_SWITCH not in os.environ
    if switched:   # Ray reads it once, when it is imported; this process's later children need not see it
        os.environ[LOOPBACK_SWITCH] = "0"
    try:
        import ray
    except ImportError:
        raise ClusterError(f"--ray and --parallel N need Ray, which is not installed: {INSTALL_HINT}.") from None
    finally:
        if switched:
            del os.environ[LOOPBACK_SWITCH]
    if keep_loopback and not _is_loopback_host(ray.util.get_node_ip_address()):
        raise ClusterError(f"Ray was imported before alexnet_keras.experiments.cluster.connect(), without "
                           f"{LOOPBACK_SWITCH}=0, so it would put this local cluster on "
                           f"{ray.util.get_node_ip_address()} instead of 127.0.0.1. Set {LOOPBACK_SWITCH}=0 in "
                           f"the environment before starting Python, or connect before importing ray.")
    return ray


def _ray_if_connected():
    ray = sys.modules.get("ray")
    return ray if ray is not None and ray.is_initialized() else None


def _connected_ray():
    ray = _ray_if_connected()
    if ray is None:
        raise ClusterError("not connected to a Ray cluster: call alexnet_keras.experiments.cluster.connect() first.")
    return ray


_STATE: dict[str, Any] = {}   # {"started_here": bool} while connected


def cluster_info() -> ClusterInfo:
    """The cluster this process is connected to, as it is now."""
    ray = _connected_ray()
    nodes = tuple(Node(n["NodeID"], n["NodeManagerAddress"], float(n["Resources"].get("CPU", 0)),
                       float(n["Resources"].get("GPU", 0)))
                  for n in ray.nodes() if n.get("Alive"))
    return ClusterInfo(ray.get_runtime_context().gcs_address, nodes, _STATE.get("started_here", False))


def connect(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None,
            log_to_driver: bool = True) -> ClusterInfo:
    """Start or join a Ray cluster; returns what it has. Already connected: returns that cluster.

    address: None (or "local") starts a local cluster bound to 127.0.0.1 only (`num_cpus` / `num_gpus`
    size it; default: all of this machine's); "auto" joins the cluster of this machine ($RAY_ADDRESS, else
    the latest `ray start`); "HOST:PORT" joins that cluster's head. No dashboard, no usage statistics.
    """
    address = (address or "").strip() or None
    if (num_cpus is not None or num_gpus is not None) and address not in (None, "local"):
        raise ClusterError("num_cpus / num_gpus size a local cluster; a cluster that is joined has its own.")
    if _ray_if_connected() is not None:
        return cluster_info()
    if address not in (None, "local", "auto") and not address.startswith("ray://"):
        host, port = _split_address(address)
        try:   # fail in a second with a clear message instead of Ray's minute of retries
            socket.create_connection((host, port), timeout=5).close()
        except OSError as err:
            raise ClusterError(f"--ray {address}: no Ray cluster answers there ({err.strerror or err}). Start "
                               f"one with `ray start --head --port={port}` on {host}, pass `--ray auto` to join "
                               f"the cluster this machine belongs to, or `--ray` alone for a local "
                               f"cluster.") from None
    keep_loopback = _wants_loopback(address)
    ray = _import_ray(keep_loopback)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    local = address in (None, "local")
    try:
        if local:   # its processes inherit this environment: not the run and experiment of `mlflow run`
            with _without(NOT_FORWARDED):
                ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                         logging_level=logging.WARNING, log_to_driver=log_to_driver)
        else:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=log_to_driver)
    except (ConnectionError, RuntimeError, ray.exceptions.RayError) as err:
        if "auth" not in str(err).lower() and not isinstance(err, ConnectionError):
            raise
        first = (str(err).strip().splitlines() or [""])[0]
        raise ClusterError(f"--ray {address or 'local'}: cannot connect: {first}. A cluster with token "
                           f"authentication refuses a machine without its token: set RAY_AUTH_MODE=token and "
                           f"RAY_AUTH_TOKEN (or the file ~/.ray/auth_token) here as on its nodes.") from None
    _STATE["started_here"] = local
    info = cluster_info()
    if keep_loopback:
        outside = sorted({n.address for n in info.nodes if not _is_loopback_host(n.address)})
        if outside:
            disconnect()
            raise ClusterError(f"the Ray cluster at {address or 'this machine'} advertises {', '.join(outside)} "
                               f"instead of 127.0.0.1; start its nodes with {LOOPBACK_SWITCH}=0 (see "
                               f"docs/cluster.md).")
    return info


@contextlib.contextmanager
def _without(names: Sequence[str]) -> Iterator[None]:
    """Within: `names` are not in this process's environment."""
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def disconnect() -> None:
    """Leave the cluster; a local cluster started by connect() is shut down."""
    ray = _ray_if_connected()
    if ray is not None:
        ray.shutdown()
    _STATE.clear()


@contextlib.contextmanager
def connected(address: str | None = None, **kwargs: Any) -> Iterator[ClusterInfo]:
    """`with connected(address) as info:` connect(), and disconnect() at the end if it connected."""
    was_connected = _ray_if_connected() is not None
    info = connect(address, **kwargs)
    try:
        yield info
    finally:
        if not was_connected:
            disconnect()


# ----------------------------------------------------------------------------------------------
# The MLflow store must be one every node reaches
# ----------------------------------------------------------------------------------------------

def _local_store_path(uri: str) -> Path | None:
    """The file behind a store or artifact URI on this machine; None for a server or a remote store."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else parsed.path
        return Path(path or "mlflow.db").expanduser().resolve()
    if parsed.scheme == "file":
        return Path(parsed.path).expanduser().resolve()
    if parsed.scheme == "":
        return Path(uri).expanduser().resolve()
    return None


def check_store(tracking_uri: str, cluster: ClusterInfo, *, artifact_location: str | None = None) -> None:
    """Refuse, before anything starts, an MLflow store that some node of `cluster` cannot write to.

    A sqlite:/// or local-file store (or artifact folder) lives on this machine: with more than one
    node, children elsewhere would write to a store of their own, or to nothing. A tracking server on
    127.0.0.1 is only reachable from nodes on this machine.
    """
    path = _local_store_path(tracking_uri)
    backend = f"sqlite:///{path}" if path and path.suffix == ".db" else "sqlite:////SHARED/PATH/mlflow.db"
    how = (f"Serve the store from a machine every node reaches and point the runs at it:\n"
           f"  mlflow server --backend-store-uri {backend} --artifacts-destination /SHARED/PATH/mlartifacts "
           f"--host 0.0.0.0 --port 5000\n"
           f"  export MLFLOW_TRACKING_URI=http://SERVER_HOST:5000   (or pass --tracking-uri http://SERVER_HOST:5000)\n"
           f"(--artifacts-destination may be s3://BUCKET/PATH or any folder every node mounts; see docs/cluster.md)")
    several = cluster.num_nodes > 1
    if path is not None and several:
        raise ClusterError(f"MLflow store {tracking_uri!r} is a file on this machine ({path}), but the Ray "
                           f"cluster has {cluster.num_nodes} nodes: children on the other nodes cannot write "
                           f"to it.\n{how}")
    host = urlparse(tracking_uri).hostname
    if host and _is_loopback_host(host):
        elsewhere = sorted({n.address for n in cluster.nodes if not _is_loopback_host(n.address)})
        if elsewhere:
            raise ClusterError(f"MLflow tracking server {tracking_uri!r} is on 127.0.0.1, which nodes "
                               f"{', '.join(elsewhere)} cannot reach. Start it with --host 0.0.0.0 (or the "
                               f"address the nodes use) and set MLFLOW_TRACKING_URI=http://THAT_ADDRESS:PORT.")
    if artifact_location and several and _local_store_path(artifact_location) is not None:
        raise ClusterError(f"the experiment's artifacts go to {artifact_location!r}, a folder on this machine, "
                           f"but the Ray cluster has {cluster.num_nodes} nodes: artifacts logged elsewhere "
                           f"would be lost. Use an experiment created through a tracking server that serves "
                           f"artifacts (a new experiment name), or start the server with "
                           f"--default-artifact-root on storage every node mounts.")


# ----------------------------------------------------------------------------------------------
# Running independent jobs as Ray tasks
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    name: str                                     # shown in progress lines and outcomes
    fn: Callable[..., Any]                        # picklable: a module-level function
    args: tuple = ()
    resources: Mapping[str, float] | None = None  # {"num_cpus": .., "num_gpus": ..}; None: job_resources()
    env: Mapping[str, str] = field(default_factory=dict)   # on top of run_jobs(env=...), for this job only
    node_id: str | None = None                    # run on this node only (e.g. a server others must find)


@dataclass
class JobOutcome:
    name: str
    value: Any = None
    error: BaseException | None = None            # the job's own exception, or Ray's (worker / node died)
    node_id: str = ""                             # where the (last, successful) attempt ran
    node_address: str = ""
    pid: int | None = None
    seconds: float = 0.0                          # inside the task

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def error_text(self) -> str:
        if self.error is None:
            return ""
        first = (str(self.error).strip().splitlines() or [""])[0]
        return f"{type(self.error).__name__}: {first}"


def _task_body():
    """The function every job runs in: it calls the job and says where it ran. Built here as a closure so
    that Ray ships it by value: a worker does not import this package (and TensorFlow) for a no-op."""

    def run_job(fn, args, cwd=None):
        import os as _os
        import signal as _signal
        import threading as _threading
        import time as _time

        import ray as _ray

        # ray.cancel stops a running job by raising KeyboardInterrupt through SIGINT's handler. A node
        # started with SIGINT ignored (under nohup, or as a background job of a script) hands that on to
        # its workers, whose Python then installs no handler, and the cancel silently does nothing.
        if (_threading.current_thread() is _threading.main_thread()
                and _signal.getsignal(_signal.SIGINT) is _signal.SIG_IGN):
            _signal.signal(_signal.SIGINT, _signal.default_int_handler)
        if cwd and _os.path.isdir(cwd):   # relative paths (store, data, tuner state) as for the caller
            _os.chdir(cwd)
        start = _time.perf_counter()
        value = fn(*args)
        context = _ray.get_runtime_context()
        return {"value": value, "node_id": context.get_node_id(), "node_address": _ray.util.get_node_ip_address(),
                "pid": _os.getpid(), "seconds": _time.perf_counter() - start}

    return run_job


def job_resources(cluster: ClusterInfo, cpus_per_job: float = 1) -> dict[str, float]:
    """What one job asks for: one GPU (and one CPU) where the cluster has GPUs, else `cpus_per_job` CPUs."""
    if cpus_per_job <= 0:
        raise ClusterError(f"CPUs per job must be positive; got {cpus_per_job}.")
    if cluster.gpus > 0:
        return {"num_cpus": 1, "num_gpus": 1}
    return {"num_cpus": cpus_per_job, "num_gpus": 0}


def _check_feasible(cluster: ClusterInfo, request: Mapping[str, float], node_id: str | None = None) -> None:
    """A request no node can meet would wait forever: say so now."""
    fits = [n for n in cluster.nodes if n.cpus >= request["num_cpus"] and n.gpus >= request["num_gpus"]
            and node_id in (None, n.node_id)]
    if not fits:
        largest = max(cluster.nodes, key=lambda n: (n.gpus, n.cpus), default=None)
        have = f"the largest has {largest.cpus:g} CPU(s) and {largest.gpus:g} GPU(s)" if largest else "none is alive"
        raise ClusterError(f"no node of the Ray cluster can run a job that needs {request['num_cpus']:g} CPU(s) "
                           f"and {request['num_gpus']:g} GPU(s): {have}. Ask for fewer CPUs per job.")


def run_jobs(jobs: Sequence[Job], *, cpus_per_job: float = 1, max_retries: int = 3,
             env: Mapping[str, str] | None = None, cwd: str | None = None,
             on_done: Callable[[JobOutcome], None] | None = None, verbose: bool = True) -> list[JobOutcome]:
    """Run `jobs` as Ray tasks on the connected cluster; their outcomes, in the order of `jobs`.

    A task whose worker process or node dies is re-run (up to `max_retries` times) by Ray, on any node
    with room; an exception raised by the job itself is not retried: it becomes that job's `error` and
    the others go on. `env`: variables set in the jobs' worker processes (plus each job's own `env`).
    `cwd`: the folder jobs run in, on nodes that have it (default: where Ray starts them).
    `on_done(outcome)` runs on this process as each job finishes; if it raises (or on Ctrl-C), the jobs
    not yet finished are cancelled and the error propagates.
    """
    ray = _connected_ray()
    if max_retries < 0:
        raise ClusterError(f"max_retries must be 0 or more; got {max_retries}.")
    cluster = cluster_info()
    default_request = job_resources(cluster, cpus_per_job)
    per_job = []
    for job in jobs:   # every request checked before any job is submitted
        request = {**default_request, **dict(job.resources or {})}
        _check_feasible(cluster, request, job.node_id)
        options = {"max_retries": max_retries, "retry_exceptions": False, **request}
        variables = {**dict(env or {}), **dict(job.env)}
        if variables:
            options["runtime_env"] = {"env_vars": {str(k): str(v) for k, v in variables.items()}}
        if job.node_id is not None:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(job.node_id, soft=False)
        per_job.append(options)
    task = ray.remote(_task_body())
    outcomes: list[JobOutcome | None] = [None] * len(jobs)
    index = {task.options(name=job.name, **options).remote(job.fn, tuple(job.args), cwd): i
             for i, (job, options) in enumerate(zip(jobs, per_job))}
    pending = list(index)
    finished = 0
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                i = index[ref]
                outcome = _outcome(ray, jobs[i].name, ref)
                outcomes[i] = outcome
                finished += 1
                if verbose:
                    print(_progress_line(outcome, finished, len(jobs)), flush=True)
                if on_done is not None:
                    on_done(outcome)
    except BaseException:
        for ref in pending:
            ray.cancel(ref)
        if pending:   # let cancelled jobs end (their MLflow runs close) before the error goes up
            ray.wait(pending, num_returns=len(pending), timeout=30)
        raise
    return [o for o in outcomes if o is not None]


def _outcome(ray, name: str, ref) -> JobOutcome:
    try:
        result = ray.get(ref)
    except ray.exceptions.RayTaskError as err:   # the job raised: keep its own exception
        cause = err.cause if isinstance(getattr(err, "cause", None), BaseException) else err
        return JobOutcome(name, error=cause)
    except ray.exceptions.RayError as err:       # worker or node died (retries spent), cancelled, ...
        return JobOutcome(name, error=err)
    return JobOutcome(name, **result)


def is_system_error(err: BaseException | None) -> bool:
    """Whether a job's error is Ray's (its worker process or node died and the retries are spent, it was
    cancelled, ...) rather than an exception the job itself raised."""
    ray = sys.modules.get("ray")
    return (err is not None and ray is not None and isinstance(err, ray.exceptions.RayError)
            and not isinstance(err, ray.exceptions.RayTaskError))


def current_task() -> dict[str, str]:
    """Inside a job: {"task_id": ..., "node_id": ...}; the task id is the same for every retry of the job,
    so a retry can find what an earlier attempt left behind. Empty outside a Ray task."""
    ray = _ray_if_connected()
    if ray is None:
        return {}
    context = ray.get_runtime_context()
    task_id = context.get_task_id()
    return {"task_id": task_id, "node_id": context.get_node_id()} if task_id else {}


def driver_node() -> Node:
    """The node this process (the driver) is on: where a job that others must reach is pinned."""
    ray = _connected_ray()
    node_id = ray.get_runtime_context().get_node_id()
    return next(node for node in cluster_info().nodes if node.node_id == node_id)


def free_port(host: str) -> int:
    """A TCP port free on `host` (an address of this machine) now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


# What a job needs of the caller's environment: the Keras backend, this package's settings (data folder,
# cache), MLflow's client settings (retries, timeouts, credentials). Not the devices (Ray's business),
# and not `mlflow run`'s run and experiment, which belong to the parent.
FORWARDED_PREFIXES = ("MLFLOW_", "ALEXNET_KERAS_")
FORWARDED_NAMES = ("KERAS_BACKEND", "TF_CPP_MIN_LOG_LEVEL")
NOT_FORWARDED = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TRACKING_URI")


def forwarded_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables of `environ` (default: this process's) that jobs get (see FORWARDED_PREFIXES)."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items()
            if (k.startswith(FORWARDED_PREFIXES) or k in FORWARDED_NAMES) and k not in NOT_FORWARDED}


def _progress_line(outcome: JobOutcome, finished: int, total: int) -> str:
    if outcome.ok:
        return (f"[{finished}/{total}] {outcome.name} finished in {outcome.seconds:.1f}s on "
                f"{outcome.node_address} (node {outcome.node_id[:8]}, pid {outcome.pid})")
    return f"[{finished}/{total}] {outcome.name} FAILED: {outcome.error_text}"
