"""alexnet_keras.experiments.cluster: the store preflight, and Ray for real: the two-node cluster on 127.0.0.1
(tests/ray_fixtures.py, conftest's `two_nodes`) with an MLflow server, jobs, errors, and the faults (a worker
SIGKILLed, a node's raylet killed) with their retries. (A local cluster, on 127.0.0.1 only and gone when left:
tests/test_ray_study.py's `--parallel` test.)"""

import concurrent.futures as cf
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from ray_fixtures import RAY_MISSING, free_port, loopback_violations, psutil, tcp_sockets, wait_until

from alexnet_keras.experiments import cluster
from alexnet_keras.experiments.cluster import ClusterError, ClusterInfo, Job, Node

needs_ray = pytest.mark.skipif(RAY_MISSING, reason="ray or psutil is not installed (pip install -e '.[ray]')")


# ----------------------------------------------------------------------------------------------
# The store preflight
# ----------------------------------------------------------------------------------------------

ONE = ClusterInfo("127.0.0.1:6379", (Node("a", "127.0.0.1", 2, 0),))
TWO_HERE = ClusterInfo("127.0.0.1:6379", (Node("a", "127.0.0.1", 1, 0), Node("b", "127.0.0.1", 1, 0)))
TWO_HOSTS = ClusterInfo("10.0.0.5:6379", (Node("a", "10.0.0.5", 8, 1), Node("b", "10.0.0.6", 8, 1)))


def test_check_store_refuses_a_local_store_on_several_nodes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for uri in ("sqlite:///mlflow.db", f"sqlite:///{tmp_path}/runs.db", f"file://{tmp_path}/mlruns", "mlruns"):
        with pytest.raises(ClusterError) as err:
            cluster.check_store(uri, TWO_HERE)
        message = str(err.value)
        assert "2 nodes" in message and "mlflow server --backend-store-uri" in message
        assert "MLFLOW_TRACKING_URI=http://" in message and "--artifacts-destination" in message
    # the command it suggests serves the very store the user has (absolute path), so no run is lost
    with pytest.raises(ClusterError, match=f"--backend-store-uri sqlite:///{tmp_path}/mlflow.db "):
        cluster.check_store("sqlite:///mlflow.db", TWO_HOSTS)
    cluster.check_store("sqlite:///mlflow.db", ONE)            # one node: the file is on it
    cluster.check_store("http://10.0.0.9:5000", TWO_HOSTS)     # a server every node reaches
    cluster.check_store("postgresql://db.internal/mlflow", TWO_HOSTS)


def test_check_store_refuses_a_loopback_server_for_other_hosts():
    cluster.check_store("http://127.0.0.1:5000", TWO_HERE)     # every node is on this machine
    with pytest.raises(ClusterError, match="10.0.0.5, 10.0.0.6 cannot reach"):
        cluster.check_store("http://localhost:5000", TWO_HOSTS)


def test_check_store_refuses_local_artifacts_on_several_nodes(tmp_path):
    with pytest.raises(ClusterError, match="artifacts go to .* a folder on this machine"):
        cluster.check_store("http://10.0.0.9:5000", TWO_HOSTS, artifact_location=str(tmp_path / "mlruns/1"))
    cluster.check_store("http://10.0.0.9:5000", TWO_HOSTS, artifact_location="mlflow-artifacts:/1")
    cluster.check_store("http://10.0.0.9:5000", TWO_HOSTS, artifact_location="s3://bucket/mlruns/1")


def test_job_resources_one_gpu_else_cpus():
    assert cluster.job_resources(TWO_HOSTS, cpus_per_job=4) == {"num_cpus": 1, "num_gpus": 1}
    assert cluster.job_resources(TWO_HERE, cpus_per_job=2) == {"num_cpus": 2, "num_gpus": 0}
    with pytest.raises(ClusterError, match="positive"):
        cluster.job_resources(TWO_HERE, cpus_per_job=0)


def test_bad_addresses_get_one_clear_message():
    with pytest.raises(ClusterError, match="expected a cluster address HOST:PORT"):
        cluster.connect("head-node")
    with pytest.raises(ClusterError, match="no Ray cluster answers there"):
        cluster.connect(f"127.0.0.1:{free_port()}")
    with pytest.raises(ClusterError, match="size a local cluster"):
        cluster.connect("10.0.0.5:6379", num_cpus=2)


def test_connect_without_ray_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)     # `import ray` raises ImportError
    with pytest.raises(ClusterError, match=r"pip install -e '\.\[ray\]'"):
        cluster.connect()


def test_the_package_does_not_import_ray():
    code = ("import sys; sys.modules['ray'] = None\n"
            "from alexnet_keras.experiments import ablate, cluster\n"
            "print(cluster.forwarded_env({'KERAS_BACKEND': 'jax'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("{'KERAS_BACKEND': 'jax'}")


# ----------------------------------------------------------------------------------------------
# Ray, for real
# ----------------------------------------------------------------------------------------------

def _job_functions() -> SimpleNamespace:
    """The jobs the tests run. Defined inside a function so that Ray ships them by value: the
    cluster's worker processes cannot import this test module."""

    def noop():
        return "done"

    def fail(message, after=None):
        """Raise ValueError(message), once the file `after` exists if given."""
        deadline = time.monotonic() + 120
        while after and not list(Path(after).parent.glob(Path(after).name)) and time.monotonic() < deadline:
            time.sleep(0.05)
        raise ValueError(message)

    def env_value(name):
        return os.environ.get(name)

    def gated(folder, name, release_after=120.0):
        """Mark the start (pid, raylet pid = the node), wait for the test's release file, mark the end."""
        folder = Path(folder)
        (folder / f"{name}.start.{os.getpid()}").write_text(str(os.getppid()))
        try:
            deadline = time.monotonic() + release_after
            while not (folder / f"{name}.release").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        except KeyboardInterrupt:        # ray.cancel
            (folder / f"{name}.cancelled.{os.getpid()}").write_text("")
            raise
        (folder / f"{name}.done.{os.getpid()}").write_text(str(os.getppid()))
        return name

    def barrier_run(folder, name, tracking_uri, experiment_id, parties):
        """Wait until `parties` jobs run at once (so they are on different 1-CPU nodes), then log a run."""
        import mlflow
        import ray

        folder = Path(folder)
        (folder / f"{name}.here").write_text("")
        deadline = time.monotonic() + 120
        while len(list(folder.glob("*.here"))) < parties and time.monotonic() < deadline:
            time.sleep(0.05)
        node = ray.get_runtime_context().get_node_id()
        mlflow.set_tracking_uri(tracking_uri)
        with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags={"node_id": node}) as run:
            mlflow.log_metric("x", 1.0)
        return run.info.run_id

    return SimpleNamespace(noop=noop, fail=fail, env_value=env_value, gated=gated, barrier_run=barrier_run)


JOBS = _job_functions()


def _files(folder: Path, pattern: str) -> list[Path]:
    return sorted(folder.glob(pattern))


@pytest.fixture
def on_two_nodes(two_nodes) -> ClusterInfo:
    info = cluster.connect(two_nodes.address)        # returns the connection if there is one
    if info.address != two_nodes.address:             # connected elsewhere by an earlier test
        cluster.disconnect()
        info = cluster.connect(two_nodes.address)
    return info


@needs_ray
def test_two_node_cluster_on_loopback_with_an_mlflow_server(two_nodes, on_two_nodes, tmp_path):
    from mlflow.tracking import MlflowClient

    info = on_two_nodes
    assert info.num_nodes == 2 and {n.address for n in info.nodes} == {"127.0.0.1"}
    cluster.check_store(two_nodes.mlflow_uri, info)                     # a server: fine
    with pytest.raises(ClusterError, match="2 nodes"):                  # its SQLite file: refused
        cluster.check_store(f"sqlite:///{two_nodes.root}/mlflow/mlflow.db", info)

    client = MlflowClient(two_nodes.mlflow_uri)
    # Created before the fan-out: two jobs creating it at once race, and one run lands in "Default".
    experiment_id = client.create_experiment("cluster-test")
    jobs = [Job(f"job{i}", JOBS.barrier_run, (str(tmp_path), f"job{i}", two_nodes.mlflow_uri, experiment_id, 2))
            for i in range(2)]
    outcomes = cluster.run_jobs(jobs)
    assert all(o.ok for o in outcomes), [o.error_text for o in outcomes]
    assert {o.node_id for o in outcomes} == {n.node_id for n in info.nodes}     # one on each node
    runs = client.search_runs([experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(o.value for o in outcomes)
    assert {r.data.tags["node_id"] for r in runs} == {o.node_id for o in outcomes}

    # Every TCP socket of every process the test started (both nodes, their workers, the server) and
    # of this driver is on 127.0.0.1, both ends.
    me = psutil.Process()
    sockets = tcp_sockets([*two_nodes.pids(), me.pid, *(p.pid for p in me.children(recursive=True))])
    listening = {pid for pid, status, *_ in sockets if status == psutil.CONN_LISTEN}
    assert listening & set(two_nodes.pids("head")) and listening & set(two_nodes.pids(two_nodes.second))
    assert listening & set(two_nodes.pids("mlflow"))
    assert loopback_violations(sockets) == []


@needs_ray
def test_a_failing_job_loses_no_other(on_two_nodes, capsys):
    jobs = [Job("first", JOBS.noop), Job("broken", JOBS.fail, ("bad value",)), Job("third", JOBS.noop)]
    seen = []
    outcomes = cluster.run_jobs(jobs, on_done=seen.append)
    assert [o.name for o in outcomes] == ["first", "broken", "third"]      # in the order given
    assert [o.ok for o in outcomes] == [True, False, True]
    assert isinstance(outcomes[1].error, ValueError) and str(outcomes[1].error) == "bad value"
    assert outcomes[1].error_text == "ValueError: bad value"
    assert sorted(o.name for o in seen) == ["broken", "first", "third"]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert sorted(line[:5] for line in lines) == ["[1/3]", "[2/3]", "[3/3]"]
    assert any("broken FAILED: ValueError: bad value" in line for line in lines)
    assert sum("finished in" in line for line in lines) == 2


@needs_ray
def test_an_error_in_on_done_cancels_the_rest(on_two_nodes, tmp_path):
    def stop_on_failure(outcome):
        if not outcome.ok:
            raise RuntimeError(f"stop: {outcome.error_text}")

    jobs = [Job("slow", JOBS.gated, (str(tmp_path), "slow")),
            Job("broken", JOBS.fail, ("fatal", str(tmp_path / "slow.start.*")))]   # fails once slow runs
    with pytest.raises(RuntimeError, match="stop: ValueError: fatal"):
        cluster.run_jobs(jobs, on_done=stop_on_failure)
    # the slow job was interrupted, not left running until its release (which never comes); on a loaded
    # 2-core machine the cancellation has taken over 30 s to reach the worker
    wait_until(lambda: _files(tmp_path, "slow.cancelled.*"), 90, what="the slow job's cancellation")
    assert _files(tmp_path, "slow.done.*") == []


@needs_ray
def test_requests_no_node_can_meet_are_refused(on_two_nodes):
    with pytest.raises(ClusterError, match="needs 4 CPU.* the largest has 1 CPU"):
        cluster.run_jobs([Job("big", JOBS.noop)], cpus_per_job=4)


@needs_ray
def test_env_reaches_the_jobs(on_two_nodes):
    [outcome] = cluster.run_jobs([Job("env", JOBS.env_value, ("ALEXNET_KERAS_PROBE",))],
                                 env={"ALEXNET_KERAS_PROBE": "from-the-driver"})
    assert outcome.value == "from-the-driver"


@needs_ray
def test_a_server_job_is_stopped_as_done_once_the_jobs_it_serves_have_ended(on_two_nodes, tmp_path):
    # keras-tuner's chief polls every 20 s for its workers' end: the sweep would wait for it.
    jobs = [Job("server", JOBS.gated, (str(tmp_path), "server"), serves=True), Job("client", JOBS.noop)]
    started = time.monotonic()
    outcomes = cluster.run_jobs(jobs)
    assert time.monotonic() - started < 60                             # not the server's 120 s
    assert [o.ok for o in outcomes] == [True, True] and outcomes[1].value == "done"
    assert _files(tmp_path, "server.done.*") == []                     # it never returned: it was stopped


def _run_in_thread(jobs, **kwargs):
    pool = cf.ThreadPoolExecutor(1)
    return pool, pool.submit(cluster.run_jobs, jobs, **kwargs)


def _start_pid(folder: Path, name: str, after: set[int] = frozenset()) -> int:
    """The pid of a new attempt of job `name` (one not in `after`), once it has started."""
    found: list[int] = []

    def started() -> bool:
        found[:] = [int(p.name.rsplit(".", 1)[1]) for p in _files(folder, f"{name}.start.*")
                    if int(p.name.rsplit(".", 1)[1]) not in after]
        return bool(found)

    wait_until(started, 120, what=f"an attempt of {name} to start")
    return found[0]


@needs_ray
def test_a_sigkilled_worker_is_retried_and_counted_once(on_two_nodes, tmp_path):
    pool, future = _run_in_thread([Job("victim", JOBS.gated, (str(tmp_path), "victim"))])
    first = _start_pid(tmp_path, "victim")
    os.kill(first, signal.SIGKILL)
    second = _start_pid(tmp_path, "victim", after={first})       # Ray ran it again, in another process
    (tmp_path / "victim.release").write_text("")
    [outcome] = future.result(timeout=120)
    pool.shutdown()
    assert outcome.ok and outcome.value == "victim" and outcome.pid == second != first
    assert len(_files(tmp_path, "victim.start.*")) == 2
    assert [p.name for p in _files(tmp_path, "victim.done.*")] == [f"victim.done.{second}"]   # once


@needs_ray
def test_a_sigkilled_worker_without_retries_is_reported_failed(on_two_nodes, tmp_path):
    import ray

    jobs = [Job("victim", JOBS.gated, (str(tmp_path), "victim")), Job("bystander", JOBS.gated,
                                                                      (str(tmp_path), "bystander"))]
    pool, future = _run_in_thread(jobs, max_retries=0)
    victim = _start_pid(tmp_path, "victim")
    _start_pid(tmp_path, "bystander")
    os.kill(victim, signal.SIGKILL)
    (tmp_path / "bystander.release").write_text("")
    outcomes = future.result(timeout=120)
    pool.shutdown()
    assert [o.name for o in outcomes] == ["victim", "bystander"]
    assert isinstance(outcomes[0].error, ray.exceptions.WorkerCrashedError), outcomes[0].error
    assert outcomes[1].ok and outcomes[1].value == "bystander"
    assert len(_files(tmp_path, "victim.start.*")) == 1 and _files(tmp_path, "victim.done.*") == []


@needs_ray
def test_a_dead_node_s_job_is_retried_on_the_surviving_node(two_nodes, on_two_nodes, tmp_path):
    """Kills the second node, and starts another in its place for the tests after it."""
    head_raylet, second_raylet = two_nodes.raylet_pid("head"), two_nodes.raylet_pid(two_nodes.second)
    jobs = [Job("a", JOBS.gated, (str(tmp_path), "a")), Job("b", JOBS.gated, (str(tmp_path), "b"))]
    pool, future = _run_in_thread(jobs)
    pids = {name: _start_pid(tmp_path, name) for name in ("a", "b")}    # both run: one on each node
    node_of = {name: int((tmp_path / f"{name}.start.{pid}").read_text()) for name, pid in pids.items()}
    assert sorted(node_of.values()) == sorted([head_raylet, second_raylet])
    doomed = next(name for name, raylet in node_of.items() if raylet == second_raylet)
    survivor = next(name for name in node_of if name != doomed)

    two_nodes.kill_raylet(two_nodes.second)
    (tmp_path / f"{survivor}.release").write_text("")                # frees the head's only CPU
    retry = _start_pid(tmp_path, doomed, after={pids[doomed]})
    assert int((tmp_path / f"{doomed}.start.{retry}").read_text()) == head_raylet
    (tmp_path / f"{doomed}.release").write_text("")
    outcomes = future.result(timeout=120)
    pool.shutdown()

    head_id = next(o.node_id for o in outcomes if o.name == survivor)
    assert all(o.ok for o in outcomes) and sorted(o.value for o in outcomes) == ["a", "b"]
    assert [o.node_id for o in outcomes] == [head_id, head_id]
    assert len(_files(tmp_path, f"{doomed}.start.*")) == 2            # ran twice ...
    assert len(_files(tmp_path, f"{doomed}.done.*")) == 1             # ... finished once
    assert len(_files(tmp_path, f"{survivor}.done.*")) == 1
    wait_until(lambda: cluster.cluster_info().num_nodes == 1, 60, what="Ray to mark the node dead")
    two_nodes.add_node("third")
    wait_until(lambda: cluster.cluster_info().num_nodes == 2, 60, what="the new node")
