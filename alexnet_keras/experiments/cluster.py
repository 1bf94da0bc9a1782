"""Ray clusters, where a study's children and a sweep's trials run (docs/cluster.md); Ray is imported when needed."""

import contextlib
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence
from unittest import mock
from urllib.parse import urlparse

from ..config import ConfigError

LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class ClusterError(ConfigError):
    """The cluster cannot run this (no Ray, no cluster at the address, a store it cannot share...)."""


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
    started_here: bool = False        # the connect() that returned this started it (disconnect() stops it)
    num_nodes = property(lambda self: len(self.nodes))
    cpus = property(lambda self: sum(n.cpus for n in self.nodes))
    gpus = property(lambda self: sum(n.gpus for n in self.nodes))

    def describe(self) -> str:
        return (f"{'local ' if self.started_here else ''}Ray cluster at {self.address}: {self.num_nodes} node(s) "
                f"on {', '.join(sorted({n.address for n in self.nodes}))}, {self.cpus:g} CPU(s), {self.gpus:g} GPU(s)")


def _is_loopback(host: str) -> bool:
    with contextlib.suppress(ValueError):   # not an IP address
        ip = ipaddress.ip_address(host.strip("[]"))
        return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback
    return host.lower() == "localhost"


def _host_port(address: str) -> tuple[str, int]:
    """"host:port" / "[v6]:port" -> (host, port); a ClusterError for anything else."""
    with contextlib.suppress(ValueError):   # a port out of range
        parsed = urlparse(f"//{address.removeprefix('ray://')}")
        if parsed.hostname and parsed.port:
            return parsed.hostname, parsed.port
    raise ClusterError(f"--ray {address!r}: expected a cluster address HOST:PORT (e.g. 10.0.0.5:6379), `auto` "
                       f"to join the cluster this machine belongs to, or no address to start a local cluster.")


def _ray(required: bool = True):
    ray = sys.modules.get("ray")
    connected = ray is not None and ray.is_initialized()
    if required and not connected:
        raise ClusterError("not connected to a Ray cluster: call alexnet_keras.experiments.cluster.connect() first.")
    return ray if connected else None


def cluster_info() -> ClusterInfo:
    """The cluster this process is connected to, as it is now."""
    ray = _ray()
    nodes = tuple(Node(n["NodeID"], n["NodeManagerAddress"], n["Resources"].get("CPU", 0.0),
                       n["Resources"].get("GPU", 0.0)) for n in ray.nodes() if n["Alive"])
    return ClusterInfo(ray.get_runtime_context().gcs_address, nodes)


def connect(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None) -> ClusterInfo:
    """Start (address None or "local": on 127.0.0.1 only, sized by `num_cpus` / `num_gpus`) or join ("auto",
    "HOST:PORT") a Ray cluster, without dashboard or usage statistics; what it has. Already connected: that."""
    address = (address or "").strip() or "local"
    local = address == "local"
    if (num_cpus is not None or num_gpus is not None) and not local:
        raise ClusterError("num_cpus / num_gpus size a local cluster; a cluster that is joined has its own.")
    if _ray(required=False) is not None:
        return cluster_info()
    joined = address if address != "auto" else os.environ.get("RAY_ADDRESS", "auto")
    loopback = local or (joined not in ("auto", "local") and _is_loopback(_host_port(joined)[0]))
    if not local and address != "auto" and not address.startswith("ray://"):
        host, port = _host_port(address)
        try:   # fail in a second with a clear message instead of Ray's minute of retries
            socket.create_connection((host, port), timeout=5).close()
        except OSError as err:
            raise ClusterError(f"--ray {address}: no Ray cluster answers there ({err.strerror or err}). Start one "
                               f"with `ray start --head --port={port}` on {host}, pass `--ray auto` to join the "
                               f"cluster this machine belongs to, or `--ray` alone for a local cluster.") from None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with mock.patch.dict(os.environ, {LOOPBACK_SWITCH: "0"} if loopback else {}):
        try:   # Ray reads the switch once, when it is imported; this process's later children need not see it
            import ray
        except ImportError:
            raise ClusterError("--ray and --parallel N need Ray: pip install -e '.[ray]'.") from None
    sizes = {"num_cpus": num_cpus, "num_gpus": num_gpus, "include_dashboard": False} if local else {}
    try:
        with mock.patch.dict(os.environ):   # a local cluster's processes inherit this environment, but not
            for name in NOT_FORWARDED if local else ():   # the run and experiment of `mlflow run`
                os.environ.pop(name, None)
            ray.init(address=address, logging_level=logging.WARNING, **sizes)
    except (ConnectionError, RuntimeError, ray.exceptions.RayError) as err:
        if "auth" not in str(err).lower() and not isinstance(err, ConnectionError):
            raise
        first = (str(err).strip().splitlines() or [""])[0]
        raise ClusterError(f"--ray {address}: cannot connect: {first}. A cluster with token authentication "
                           f"refuses a machine without its token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
                           f"(or the file ~/.ray/auth_token) here as on its nodes.") from None
    info = replace(cluster_info(), started_here=local)
    outside = sorted({n.address for n in info.nodes if not _is_loopback(n.address)}) if loopback else []
    if outside:
        disconnect()
        raise ClusterError(f"the Ray cluster at {address} advertises {', '.join(outside)} instead of 127.0.0.1: "
                           f"set {LOOPBACK_SWITCH}=0 before Ray is imported, here and on its nodes (see "
                           f"docs/cluster.md).")
    return info


def disconnect() -> None:
    """Leave the cluster; a local cluster started by connect() is shut down."""
    if "ray" in sys.modules:   # ray.shutdown() does nothing when not connected
        sys.modules["ray"].shutdown()


@contextlib.contextmanager
def connected(address: str | None = None, **kwargs: Any) -> Iterator[ClusterInfo]:
    """`with connected(address) as info:` connect(), and disconnect() at the end if it connected."""
    was_connected = _ray(required=False) is not None
    try:
        yield connect(address, **kwargs)
    finally:
        if not was_connected:
            disconnect()


def _local_path(uri: str) -> Path | None:
    """The file behind a store or artifact URI on this machine; None for a server or a remote store."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        return Path(uri.removeprefix("sqlite:///") or "mlflow.db").expanduser().resolve()
    return Path(parsed.path).expanduser().resolve() if parsed.scheme in ("file", "") else None


def check_store(tracking_uri: str, cluster: ClusterInfo, *, artifact_location: str | None = None) -> None:
    """Refuse, before anything starts, an MLflow store that some node of `cluster` cannot write to."""
    path = _local_path(tracking_uri)
    backend = f"sqlite:///{path}" if path and path.suffix == ".db" else "sqlite:////SHARED/PATH/mlflow.db"
    if path is not None and cluster.num_nodes > 1:
        raise ClusterError(
            f"MLflow store {tracking_uri!r} is a file on this machine ({path}), but the Ray cluster has "
            f"{cluster.num_nodes} nodes: children on the other nodes cannot write to it. Serve it from a machine "
            f"every node reaches (see docs/cluster.md):\n  mlflow server --backend-store-uri {backend} "
            f"--artifacts-destination /SHARED/PATH/mlartifacts --host 0.0.0.0 --port 5000\n"
            f"  export MLFLOW_TRACKING_URI=http://SERVER_HOST:5000   (or pass --tracking-uri http://SERVER_HOST:5000)")
    elsewhere = sorted({n.address for n in cluster.nodes if not _is_loopback(n.address)})
    if _is_loopback(urlparse(tracking_uri).hostname or "") and elsewhere:
        raise ClusterError(f"MLflow tracking server {tracking_uri!r} is on 127.0.0.1, which nodes "
                           f"{', '.join(elsewhere)} cannot reach. Start it with --host 0.0.0.0 (or the "
                           f"address the nodes use) and set MLFLOW_TRACKING_URI=http://THAT_ADDRESS:PORT.")
    if artifact_location and cluster.num_nodes > 1 and _local_path(artifact_location) is not None:
        raise ClusterError(f"the experiment's artifacts go to {artifact_location!r}, a folder on this machine, but "
                           f"the Ray cluster has {cluster.num_nodes} nodes: use a new experiment, created through a "
                           f"tracking server that serves artifacts, or a --default-artifact-root every node mounts.")


@dataclass(frozen=True)
class Job:
    name: str                                     # shown in progress lines and outcomes
    fn: Callable[..., Any]                        # picklable: a module-level function
    args: tuple = ()
    resources: Mapping[str, float] | None = None  # {"num_cpus": .., "num_gpus": ..}; None: job_resources()
    env: Mapping[str, str] = field(default_factory=dict)   # set while it runs (as run_jobs' env)
    node_id: str | None = None                    # run on this node only (e.g. a server others must find)
    serves: bool = False                          # a server of the other jobs: cancelled, as done, once they end


@dataclass
class JobOutcome:
    name: str
    value: Any = None
    error: BaseException | None = None            # the job's own exception, or Ray's (worker / node died)
    node_id: str = ""                             # where the (last, successful) attempt ran
    node_address: str = ""
    pid: int | None = None
    seconds: float = 0.0                          # inside the task
    ok = property(lambda self: self.error is None)

    @property
    def error_text(self) -> str:
        first = (str(self.error).strip().splitlines() or [""])[0]
        return f"{type(self.error).__name__}: {first}" if self.error is not None else ""


def _run_job(fn: Callable[..., Any], args: tuple, env: dict[str, str], cwd: str | None) -> dict[str, Any]:
    """Every job's Ray task: the job, with its variables set here (not in a slow runtime_env), and where it ran."""
    import ray

    # ray.cancel raises KeyboardInterrupt through SIGINT's handler; a node started with SIGINT ignored (nohup,
    # a script's background job) hands that on to its workers, where the cancel would silently do nothing.
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if cwd and os.path.isdir(cwd):   # relative paths (store, data, tuner state) as for the caller
        os.chdir(cwd)
    start = time.perf_counter()
    with mock.patch.dict(os.environ, env):
        value = fn(*args)
    return {"value": value, "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
            "node_address": ray.util.get_node_ip_address(), "seconds": time.perf_counter() - start}


def job_resources(cluster: ClusterInfo, cpus_per_job: float = 1) -> dict[str, float]:
    """What one job asks for: one GPU (and one CPU) where the cluster has GPUs, else `cpus_per_job` CPUs."""
    if cpus_per_job <= 0:
        raise ClusterError(f"CPUs per job must be positive; got {cpus_per_job}.")
    return {"num_cpus": 1, "num_gpus": 1} if cluster.gpus > 0 else {"num_cpus": cpus_per_job, "num_gpus": 0}


def run_jobs(jobs: Sequence[Job], *, cpus_per_job: float = 1, max_retries: int = 3,
             env: Mapping[str, str] | None = None, cwd: str | None = None,
             on_done: Callable[[JobOutcome], None] | None = None) -> list[JobOutcome]:
    """Run `jobs` as Ray tasks (re-run `max_retries` times if their process or node dies); their outcomes in order.
    `env`, `cwd`: the jobs' variables and folder. `on_done(outcome)` runs here as each ends; if it raises (or on
    Ctrl-C), the jobs not yet finished are cancelled."""
    ray = _ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cluster = cluster_info()
    default_request = job_resources(cluster, cpus_per_job)
    task = ray.remote(_run_job)
    variables = {str(k): str(v) for k, v in dict(env or {}).items()}
    # Only what TensorFlow and Keras read at import needs worker processes of its own; MLflow's and ours: in the task.
    at_start = {k: v for k, v in variables.items() if not k.startswith(FORWARDED_PREFIXES)}
    tasks = []
    for job in jobs:   # every request checked before any job is submitted
        request = {**default_request, **dict(job.resources or {})}
        if not any(n.cpus >= request["num_cpus"] and n.gpus >= request["num_gpus"] and job.node_id in (None, n.node_id)
                   for n in cluster.nodes):   # it would wait forever
            largest = max(cluster.nodes, key=lambda n: (n.gpus, n.cpus))
            raise ClusterError(f"no node of the Ray cluster can run a job that needs {request['num_cpus']:g} CPU(s) "
                               f"and {request['num_gpus']:g} GPU(s): the largest has {largest.cpus:g} CPU(s) and "
                               f"{largest.gpus:g} GPU(s). Ask for fewer CPUs per job.")
        strategy = NodeAffinitySchedulingStrategy(job.node_id, soft=False) if job.node_id else "DEFAULT"
        tasks.append(task.options(name=job.name, max_retries=max_retries, retry_exceptions=False, **request,
                                 runtime_env={"env_vars": at_start} if at_start else None,
                                 scheduling_strategy=strategy))
    index = {options.remote(job.fn, tuple(job.args), {**variables, **job.env}, cwd): i
             for i, (job, options) in enumerate(zip(jobs, tasks))}
    outcomes: list[JobOutcome] = [JobOutcome(job.name) for job in jobs]
    pending = list(index)
    try:
        while pending and not all(jobs[index[ref]].serves for ref in pending):   # servers: cancelled when alone
            [ref], pending = ray.wait(pending, num_returns=1)
            name = jobs[index[ref]].name
            try:
                outcome = JobOutcome(name, **ray.get(ref))
            except ray.exceptions.RayTaskError as err:   # the job raised: keep its own exception
                outcome = JobOutcome(name, error=err.cause if isinstance(err.cause, BaseException) else err)
            except ray.exceptions.RayError as err:       # its process or node died (retries spent), cancelled...
                outcome = JobOutcome(name, error=err)
            outcomes[index[ref]] = outcome
            how = (f"finished in {outcome.seconds:.1f}s on {outcome.node_address} (node {outcome.node_id[:8]}, "
                   f"pid {outcome.pid})" if outcome.ok else f"FAILED: {outcome.error_text}")
            print(f"[{len(jobs) - len(pending)}/{len(jobs)}] {outcome.name} {how}", flush=True)
            if on_done is not None:
                on_done(outcome)
    finally:
        for ref in pending:
            ray.cancel(ref)
        if pending:   # let cancelled jobs end (their MLflow runs close) before the error goes up
            ray.wait(pending, num_returns=len(pending), timeout=30)
    return outcomes


def is_system_error(err: BaseException | None) -> bool:
    """Whether a job's error is Ray's (its process or node died each try, it was cancelled...), not the job's."""
    from ray.exceptions import RayError, RayTaskError   # imported already: the job ran through run_jobs

    return isinstance(err, RayError) and not isinstance(err, RayTaskError)


def current_task() -> dict[str, str]:
    """Inside a job: its task id (the same in every retry: what an earlier attempt left) and node id; else {}."""
    ray = _ray(required=False)
    task_id = ray.get_runtime_context().get_task_id() if ray is not None else None
    return {"task_id": task_id, "node_id": ray.get_runtime_context().get_node_id()} if task_id else {}


def driver_node() -> Node:
    """The node this process (the driver) is on: where a job that others must reach is pinned."""
    node_id = _ray().get_runtime_context().get_node_id()
    return next(node for node in cluster_info().nodes if node.node_id == node_id)


def free_port(host: str) -> int:
    """A TCP port free on `host` (an address of this machine) now."""
    with socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        return probe.getsockname()[1]


# What jobs get of the caller's environment: the Keras backend, this package's and MLflow's client settings;
# not the devices (Ray's business), nor `mlflow run`'s run and experiment, which belong to the parent.
FORWARDED_PREFIXES = ("MLFLOW_", "ALEXNET_KERAS_")
FORWARDED_NAMES = ("KERAS_BACKEND", "TF_CPP_MIN_LOG_LEVEL")
NOT_FORWARDED = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TRACKING_URI")


def forwarded_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables of `environ` (default: this process's) that jobs get (see FORWARDED_PREFIXES)."""
    return {k: v for k, v in (os.environ if environ is None else environ).items()
            if (k.startswith(FORWARDED_PREFIXES) or k in FORWARDED_NAMES) and k not in NOT_FORWARDED}
