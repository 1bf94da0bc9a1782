"""A two-node Ray cluster and an MLflow tracking server on 127.0.0.1, started by tests with the commands a
user runs (`ray start`, `mlflow server`).

Every command is started in a session of its own; the daemons it leaves behind (GCS, raylets, agents,
Ray's worker processes, the server's workers) keep that session id, so they are found again by it, checked
(`loopback_violations`) and stopped (`LoopbackCluster.stop`) by process id, never by name. Ray's own
`ray stop` is not used: it ends every Ray process of the machine, other users' too.

Ray 2.60 turns token authentication on for a new local cluster, and a head started while a token exists;
the cluster here always uses it, with the token given (RAY_AUTH_TOKEN, never ~/.ray/auth_token) to its
nodes and to the test process (`auth_env`).

Ray 2.60 rewrites 127.0.0.1 to the machine's outward address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
which `ray start` refuses for a node that joins a cluster. The head is started with that switch; the
second node is started by Ray's own CLI entry point with the rewrite turned off (JOIN_LAUNCHER), so that it
too advertises and listens on 127.0.0.1 only.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import importlib.util
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from conftest import QUIET_SERVER, copy_store, free_port

try:
    import psutil
except ImportError:   # the Ray tests are skipped without it (pip install -e '.[ray]')
    psutil = None
RAY_MISSING = importlib.util.find_spec("ray") is None or psutil is None

BIN = Path(sys.executable).parent
LOOPBACK = ipaddress.ip_address("127.0.0.1")
JOIN_LAUNCHER = """\
import sys
import ray._private.services as services
services.resolve_ip_for_localhost = lambda host: host   # keep 127.0.0.1 (see tests/ray_fixtures.py)
from ray.scripts.scripts import main
sys.argv = ["ray", *sys.argv[1:]]
main()
"""


# Ray's settings for the tests' nodes: a node whose raylet is killed is found dead after 5 failed health checks
# 0.5 s apart (Ray's default: 3 s; a live node under load still has each check's 10 s timeout), and each node
# keeps up to 3 idle worker processes (default: one per CPU), so that workers which have imported TensorFlow for
# one test's jobs serve the next test's too.
RAY_TEST_SETTINGS = {"RAY_health_check_period_ms": "500", "RAY_num_workers_soft_limit": "3"}

# The token of every cluster the tests start. Ray reads its token once per process, so every test
# module that connects the pytest process itself to a cluster must use the same one (never written to
# ~/.ray).
TOKEN = secrets.token_hex(32)


def auth_env(token: str = TOKEN) -> dict[str, str]:
    """The environment that makes a Ray process use token authentication with `token`."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}


def wait_until(predicate, timeout: float, interval: float = 0.1, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def session_pids(sid: int) -> list[int]:
    """Every live process of session `sid` (the session a command started with start_new_session has)."""
    out = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return out


def signal_pids(pids, action: str) -> list:
    """`action` ("terminate" or "kill") sent to each live process of `pids`; the processes reached."""
    procs = []
    for pid in set(pids):
        try:
            proc = psutil.Process(pid)
            getattr(proc, action)()
            procs.append(proc)
        except psutil.Error:
            continue
    return procs


def _ip(text: str):
    ip = ipaddress.ip_address(text.split("%")[0])
    return getattr(ip, "ipv4_mapped", None) or ip


def tcp_sockets(pids) -> list[tuple[int, str, str, str]]:
    """(pid, status, local address, remote address) of every TCP socket of `pids`."""
    out = []
    for pid in set(pids):
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            continue
        for c in conns:
            local = f"{c.laddr.ip}:{c.laddr.port}" if c.laddr else ""
            remote = f"{c.raddr.ip}:{c.raddr.port}" if c.raddr else ""
            out.append((pid, c.status, local, remote))
    return out


def loopback_violations(sockets) -> list[tuple[int, str, str, str]]:
    """The sockets (from tcp_sockets) with an end that is not 127.0.0.1 (a listener on 0.0.0.0 / :: too)."""
    bad = []
    for sock in sockets:
        for end in sock[2:]:
            if end and _ip(end.rsplit(":", 1)[0]) != LOOPBACK:
                bad.append(sock)
                break
    return bad


class LoopbackCluster:
    """`ray start` head + a second node (1 CPU each, no GPU, no dashboard, no usage stats) and
    `mlflow server`s, each with its own SQLite store and artifact folder, all on 127.0.0.1. A server
    can be killed and started again on the same store and port (a tracking server that goes away)."""

    def __init__(self, cpus_per_node: int = 1, token: str = TOKEN, store_template: Path | None = None):
        # Short: Ray's Unix socket paths live under it and must stay under 108 characters.
        self.root = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
        self.cpus = cpus_per_node
        self.token = token
        self.store_template = store_template        # a migrated store each server starts from (seconds saved)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.sessions: dict[str, int] = {}          # name -> session id (= pid of the command started)
        self.second = "second"                      # the node besides the head (add_node's latest)
        self.mlflow_uri = ""                        # the server named "mlflow"
        self._servers: dict[str, tuple[subprocess.Popen, str]] = {}   # name -> (process, URI)
        self._ports: dict[str, int] = {}

    # -- processes ------------------------------------------------------------------------------
    def _env(self, loopback_switch: bool) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
        env.update(RAY_USAGE_STATS_ENABLED="0", **auth_env(self.token), **RAY_TEST_SETTINGS)
        if loopback_switch:
            env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        return env

    def _start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root,
                                start_new_session=True)
        log.close()
        self.sessions[name] = proc.pid
        return proc

    def _ray_start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        # Every node starts with SIGINT ignored, as under nohup or as a script's background job: its
        # workers inherit that, and run_jobs' cancellation must reach them all the same.
        proc = self._start(name, ["/bin/sh", "-c", 'trap "" INT; exec "$@"', "sh", *argv], env)
        try:
            rc = proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            rc = None
        if rc != 0:
            raise RuntimeError(f"{name}: `ray start` failed ({rc}):\n{self.log(name)[-3000:]}")

    def _node_flags(self, name: str) -> list[str]:
        temp = self.root / name
        temp.mkdir()
        return [f"--num-cpus={self.cpus}", "--num-gpus=0", "--disable-usage-stats", f"--temp-dir={temp}",
                f"--object-store-memory={200 * 1024 * 1024}", f"--dashboard-agent-listen-port={free_port()}"]

    def start_head(self) -> None:
        self._ray_start("head", [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
                                 f"--port={self.port}", f"--ray-client-server-port={free_port()}",
                                 "--include-dashboard=false", *self._node_flags("head")],
                        self._env(loopback_switch=True))

    def add_node(self, name: str = "second") -> None:
        self.second = name
        self._ray_start(name, [sys.executable, "-c", JOIN_LAUNCHER, "start", f"--address={self.address}",
                               "--node-ip-address=127.0.0.1", *self._node_flags(name)],
                        self._env(loopback_switch=False))

    def start_mlflow_server(self, name: str = "mlflow") -> str:
        """Start `mlflow server` (its store and artifacts in a folder named `name`) and return its URI at
        once; wait_for_mlflow_server(name) waits until it answers. Starting a server that was killed
        serves the same store on the same port again."""
        folder = self.root / name
        folder.mkdir(exist_ok=True)
        if self.store_template and not (folder / "mlflow.db").exists():
            copy_store(self.store_template, folder)
        port = self._ports.setdefault(name, free_port())
        uri = f"http://127.0.0.1:{port}"
        proc = self._start(name, [
            str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{folder}/mlflow.db", "--artifacts-destination",
            str(folder / "artifacts")], {**self._env(loopback_switch=False), **QUIET_SERVER})
        self._servers[name] = (proc, uri)
        if name == "mlflow":
            self.mlflow_uri = uri
        return uri

    def wait_for_mlflow_server(self, name: str = "mlflow", timeout: float = 180) -> None:
        proc, uri = self._servers[name]

        def answers() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server {name} exited:\n{self.log(name)[-3000:]}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as reply:
                    return reply.status == 200
            except OSError:
                return False

        wait_until(answers, timeout, interval=0.5, what=f"the mlflow server {name}")

    def kill(self, name: str) -> None:
        """SIGKILL every process of `name`'s session (a server or node that goes away at once)."""
        psutil.wait_procs(signal_pids(self.pids(name), "kill"), timeout=30)
        if name in self._servers:
            self._servers[name][0].wait(timeout=30)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def pids(self, *names: str) -> list[int]:
        return [pid for name, sid in self.sessions.items() if not names or name in names
                for pid in session_pids(sid)]

    def raylet_pid(self, name: str) -> int:
        for pid in self.pids(name):
            try:
                if psutil.Process(pid).name() == "raylet":
                    return pid
            except psutil.Error:
                continue
        raise LookupError(f"no raylet in session {name!r}")

    def kill_raylet(self, name: str) -> int:
        pid = self.raylet_pid(name)
        os.kill(pid, signal.SIGKILL)
        return pid

    def stop(self) -> None:
        """SIGKILL at once: Ray's agents ignore SIGTERM, and nothing here needs a clean exit."""
        psutil.wait_procs(signal_pids(self.pids(), "kill"), timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "LoopbackCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def two_node_lab(store_template: Path | None = None):
    """The body of conftest's `two_nodes` fixture: a two-node cluster (1 CPU a node) and an MLflow server
    on 127.0.0.1, yielded once all are up; every process stopped afterwards, pass or fail."""
    from alexnet_keras.experiments import cluster

    def gcs_answers() -> bool:
        if head.done():
            head.result()   # raises why `ray start` failed
            return True
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", lab.port), timeout=1):
            return True
        return False

    with LoopbackCluster(store_template=store_template) as lab, cf.ThreadPoolExecutor(1) as pool:
        lab.start_mlflow_server()       # slowest to come up: start it first
        head = pool.submit(lab.start_head)
        wait_until(gcs_answers, 180, interval=0.2, what="the head's GCS")
        lab.add_node("second")          # while the head's `ray start` brings up the rest of the head
        head.result()
        lab.wait_for_mlflow_server()
        yield lab
        cluster.disconnect()
