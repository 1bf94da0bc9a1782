"""Studies and sweeps across devices and nodes, for real: `ablate --parallel` (a local Ray cluster) on a
(faked) two-GPU machine, then `ablate --ray` and `tune --ray` on the two-node Ray cluster with an MLflow
tracking server, all on 127.0.0.1 (conftest's `two_nodes`), and the faults: a node's raylet killed
mid-child, the tracking server gone mid-study. (A worker process SIGKILLed: tests/test_cluster.py.)

The node-kill test leaves one node: the tests after it run their children one at a time, on the head. The
refused store is checked with the CLI in a subprocess, as a user runs it; the other commands run `cli.main`
in a thread of this process, connected to the cluster once: one Ray job for them all, so the nodes' worker
processes (and the TensorFlow they imported) serve every study, which keeps the module's time down.
"""

import concurrent.futures as cf
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from ray_fixtures import RAY_MISSING, TOKEN, auth_env, loopback_violations, psutil, tcp_sockets, wait_until

from alexnet_keras import cli, tracking
from alexnet_keras.experiments import cluster
from alexnet_keras.experiments.study import load_study

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "experiments" / "smoke.yaml"
SWEEP_SMOKE = ROOT / "experiments" / "sweep_smoke.yaml"
needs_ray = pytest.mark.skipif(RAY_MISSING, reason="ray or psutil is not installed (pip install -e '.[ray]')")
PARENT = "mlflow.parentRunId"


def _study_file(folder: Path, name: str, *, axes=None, epochs: int = 3, samples: int = 128) -> Path:
    """A study of two children (one seed; `axes`, default dropout 0.5 vs 0), each about a second or more
    per epoch: long enough to be killed in the middle."""
    study = {"name": name, "experiment": name, "seeds": [0], "axes": axes or {"dropout": [0.5, 0.0]},
             "base": {"model": {"variant": "cifar", "width": 0.125, "init": "keras"},
                      "data": {"dataset": "synthetic", "synthetic_samples": samples, "synthetic_classes": 4},
                      "train": {"epochs": epochs, "batch_size": 32, "schedule": "constant"}}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def _steps(client: MlflowClient, run_id: str, key: str = "loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


# ----------------------------------------------------------------------------------------------
# The flags, and what is refused before any cluster is reached
# ----------------------------------------------------------------------------------------------

def test_ray_flag_values():
    parse = lambda *argv: cli.build_parser().parse_args(["ablate", "s.yaml", *argv])
    assert parse().ray is None and parse("--ray", "none").ray is None and parse("--ray", "").ray is None
    assert parse("--ray").ray == "local" and parse("--ray", "auto").ray == "auto"
    assert parse("--ray", "10.0.0.5:6379", "--ray-cpus", "4").ray_cpus == 4.0
    assert cli.build_parser().parse_args(["tune", "s.yaml", "--ray", "--ray-workers", "3"]).ray_workers == 3


@pytest.mark.parametrize("argv, env, fragment", [
    (["ablate", SMOKE, "--ray", "--parallel", "2"], {}, "--parallel 2 with --ray"),
    (["tune", SWEEP_SMOKE, "--ray", "ray://head:10001"], {}, "not through a ray:// client address"),
    (["tune", SWEEP_SMOKE, "--ray"], {"KERASTUNER_TUNER_ID": "chief", "KERASTUNER_ORACLE_IP": "127.0.0.1",
                                       "KERASTUNER_ORACLE_PORT": "8000"}, "starts the chief and the workers itself"),
])
def test_ray_misuse_is_refused_before_anything_starts(untouched_store, monkeypatch, capsys, argv, env, fragment):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main([str(a) for a in argv]) == 2
    assert fragment in capsys.readouterr().err
    assert not untouched_store.exists()


def test_jobs_get_the_drivers_training_environment_only():
    env = {"KERAS_BACKEND": "jax", "ALEXNET_KERAS_DATA_DIR": "/data", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
           "MLFLOW_TRACKING_TOKEN": "t", "MLFLOW_RUN_ID": "r", "MLFLOW_EXPERIMENT_ID": "1",
           "MLFLOW_TRACKING_URI": "http://x", "PATH": "/bin", "HOME": "/root"}
    assert cluster.forwarded_env(env) == {"KERAS_BACKEND": "jax", "ALEXNET_KERAS_DATA_DIR": "/data",
                                          "MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_TRACKING_TOKEN": "t"}


def test_sweep_workers_one_per_gpu_else_per_cpus_at_most_max_trials():
    from alexnet_keras.experiments.cluster import ClusterInfo, Node
    from alexnet_keras.experiments.sweep import load_sweep
    from alexnet_keras.experiments.tune import ray_workers

    sweep = load_sweep(SWEEP_SMOKE, max_trials=6)
    cpus = ClusterInfo("h:1", (Node("a", "10.0.0.5", 8, 0), Node("b", "10.0.0.6", 8, 0)))
    gpus = ClusterInfo("h:1", (Node("a", "10.0.0.5", 8, 4), Node("b", "10.0.0.6", 8, 4)))
    assert ray_workers(cpus, sweep, cpus=4, workers=None) == 4
    assert ray_workers(cpus, sweep, cpus=1, workers=None) == 6          # capped at max_trials
    assert ray_workers(gpus, sweep, cpus=1, workers=None) == 6
    assert ray_workers(gpus, load_sweep(SWEEP_SMOKE, max_trials=20), cpus=1, workers=None) == 8
    assert ray_workers(cpus, sweep, cpus=1, workers=2) == 2


# ----------------------------------------------------------------------------------------------
# --parallel N: a local Ray cluster, which gives each child a GPU of its own
# ----------------------------------------------------------------------------------------------

@needs_ray
def test_parallel_gives_each_worker_process_its_own_gpu(mlflow_store, tmp_path, monkeypatch):
    """Also the local cluster that `--parallel` starts: on 127.0.0.1 only, both ends of every socket of it and
    of its workers, and gone with the study (was tests/test_cluster.py's test_local_cluster_is_on_loopback_only)."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    connect, disconnect, me = cluster.connect, cluster.disconnect, psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}   # e.g. multiprocessing's resource tracker
    local = {}

    def two_gpus(address=None, **sizes):   # a faked two-GPU machine (TensorFlow sees none): Ray hands them out
        local["info"] = connect(address, **sizes, num_gpus=2)
        return local["info"]

    def checked_disconnect():   # as the study leaves its local cluster, whose workers trained the children
        [outcome] = cluster.run_jobs([cluster.Job("noop", lambda: "done")])
        local["outcome"] = outcome
        local["started"] = [p for p in me.children(recursive=True) if p.pid not in before]
        local["sockets"] = tcp_sockets([me.pid, *(p.pid for p in local["started"])])
        disconnect()

    monkeypatch.setattr(cluster, "connect", two_gpus)
    monkeypatch.setattr(cluster, "disconnect", checked_disconnect)
    disconnect()
    study = _study_file(tmp_path, "two-gpus", epochs=1, samples=128)
    assert cli.main(["ablate", str(study), "--parallel", "2"]) == 0
    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("two-gpus")
    children = [r for r in client.search_runs([experiment.experiment_id]) if PARENT in r.data.tags]
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    device_of = {r.data.tags[tracking.PID_TAG]: r.data.tags.get(tracking.VISIBLE_DEVICES_TAG) for r in children}
    assert set(device_of.values()) <= {"0", "1"}, device_of       # every child trained on one of them
    assert len(set(device_of.values())) == len(device_of), device_of   # and no two workers shared one

    info, outcome, sockets = local["info"], local["outcome"], local["sockets"]
    assert info.started_here and info.num_nodes == 1 and info.nodes[0].address == "127.0.0.1"
    assert info.address.startswith("127.0.0.1:")
    assert outcome.ok and outcome.value == "done" and outcome.node_address == "127.0.0.1"
    assert {int(pid) for pid in device_of} <= {p.pid for p in local["started"]}   # the workers' sockets too
    assert any(s[1] == psutil.CONN_LISTEN for s in sockets)          # the check below has something to check
    assert loopback_violations(sockets) == []
    _, alive = psutil.wait_procs(local["started"], timeout=30)       # the local cluster is gone with the study
    assert not alive, [p.pid for p in alive]


# ----------------------------------------------------------------------------------------------
# The cluster: `ablate --ray` and `tune --ray`
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def driver(two_nodes, tmp_path, monkeypatch):
    """Start `alexnet-keras ARGS` in a thread of this process, connected to the two nodes, in tmp_path."""
    info = cluster.connect(two_nodes.address)        # the connection of an earlier test, if any
    if info.address != two_nodes.address:
        cluster.disconnect()
        cluster.connect(two_nodes.address)
    monkeypatch.chdir(tmp_path)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    pool = cf.ThreadPoolExecutor(1)
    yield lambda args: Driver(pool, args)
    pool.shutdown(wait=False)


class Driver:
    """`alexnet-keras ARGS` through cli.main in a thread; its exit status from wait()."""

    def __init__(self, pool: cf.ThreadPoolExecutor, args: list):
        self.future = pool.submit(cli.main, [str(a) for a in args])

    def running(self) -> bool:
        if self.future.done():
            raise AssertionError(f"the command ended early: {self.future.result()}")
        return True

    def wait(self, timeout: float = 600) -> int:
        return self.future.result(timeout=timeout)


def _env(**extra: str) -> dict[str, str]:
    """A user's shell: the cluster's token, nothing of this process's MLflow, Ray or keras-tuner state."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_", "KERASTUNER_"))}
    env.update(auth_env(TOKEN), TF_CPP_MIN_LOG_LEVEL="2", **extra)
    return env


class Command:
    """`python -m alexnet_keras ARGS` in `cwd`, as a user runs it, its output in a log file."""

    def __init__(self, args: list, cwd: Path):
        self.log_path = cwd / f"command-{time.monotonic_ns()}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "alexnet_keras", *map(str, args)], cwd=cwd,
                                         env=_env(), stdout=log, stderr=subprocess.STDOUT)

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def running(self) -> bool:
        assert self.proc.poll() is None, f"exited early ({self.proc.returncode}):\n{self.output[-4000:]}"
        return True

    def wait(self, timeout: float = 600) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout:g}s:\n{self.output[-4000:]}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)   # the driver cancels its jobs and ends its runs
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def command():
    started: list[Command] = []

    def start(args: list, cwd: Path) -> Command:
        started.append(Command(args, cwd))
        return started[-1]

    yield start
    for each in started:
        each.stop()


def _experiment_id(client: MlflowClient, name: str, running) -> str:
    found = []

    def created() -> bool:
        experiment = client.get_experiment_by_name(name)
        found[:] = [experiment.experiment_id] if experiment else []
        return running.running() and bool(found)

    wait_until(created, 300, interval=0.5, what=f"experiment {name}")
    return found[0]


def _child_in_training(client: MlflowClient, experiment_id: str, running, where=lambda run: True,
                       logged_an_epoch: bool = True):
    """A child RUNNING with at least one epoch logged (and `where(run)`), once there is one."""
    found = []

    def in_training() -> bool:
        running.running()
        found[:] = [r for r in client.search_runs([experiment_id], "attributes.status = 'RUNNING'")
                    if PARENT in r.data.tags and ("loss" in r.data.metrics or not logged_an_epoch) and where(r)]
        return bool(found)

    wait_until(in_training, 600, interval=0.5, what="a child in the middle of its training")
    return found[0]


def _study_state(client: MlflowClient, experiment_id: str) -> tuple:
    runs = client.search_runs([experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get(tracking.ROLE_TAG) == "parent"]
    children = [r for r in runs if PARENT in r.data.tags]
    return parents, children


def _assert_every_child_finished_once(client: MlflowClient, experiment_id: str, study_path: Path):
    """One parent, FINISHED; every (variant, seed) FINISHED exactly once under it, with each of its epochs'
    metrics logged once; no child left RUNNING."""
    (parent,), children = _study_state(client, experiment_id)
    assert parent.info.status == "FINISHED"
    assert {r.data.tags[PARENT] for r in children} == {parent.info.run_id}
    finished = [r for r in children if r.info.status == "FINISHED"]
    expected = sorted(c.digest for c in load_study(study_path).children())
    assert sorted(r.data.tags[tracking.CONFIG_DIGEST_TAG] for r in finished) == expected
    assert not [r.info.run_id for r in children if r.info.status == "RUNNING"]
    for run in finished:
        epochs = int(run.data.params["epochs"])
        assert _steps(client, run.info.run_id) == list(range(epochs)), run.info.run_name
    return parent, children


def _retry_of(children: list, victim) -> object:
    (retry,) = [r for r in children if r.info.status == "FINISHED"
                and r.data.tags[tracking.CONFIG_DIGEST_TAG] == victim.data.tags[tracking.CONFIG_DIGEST_TAG]]
    assert retry.data.tags[tracking.RAY_TASK_TAG] == victim.data.tags[tracking.RAY_TASK_TAG]   # Ray's retry
    assert retry.data.tags[tracking.PID_TAG] != victim.data.tags[tracking.PID_TAG]
    return retry


@needs_ray
def test_a_store_the_nodes_cannot_share_is_refused_before_any_run(two_nodes, command, tmp_path):
    store = tmp_path / "mlflow.db"
    study = command(["ablate", SMOKE, "--ray", two_nodes.address, "--tracking-uri", f"sqlite:///{store}"],
                    cwd=tmp_path)
    assert study.wait() == 2
    error = [line for line in study.output.splitlines() if line.startswith("alexnet-keras ablate: error:")]
    assert error and "is a file on this machine" in error[0] and "2 nodes" in error[0], study.output[-3000:]
    assert f"mlflow server --backend-store-uri sqlite:///{store}" in study.output
    assert "Traceback" not in study.output
    assert not store.exists()                                          # nothing was created


@needs_ray
def test_smoke_sweep_chief_and_workers_on_two_nodes_and_resume(two_nodes, driver, tmp_path, capsys):
    client = MlflowClient(two_nodes.mlflow_uri)
    # The sweep's model (final_model) is test_tune's: here the chief, the workers and the resume on Ray,
    # without a model evaluated and logged after each of the two runs.
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({**yaml.safe_load(SWEEP_SMOKE.read_text()), "final_model": "none"}))
    args = ["tune", sweep, "--ray", two_nodes.address, "--tracking-uri", two_nodes.mlflow_uri]
    assert driver(args).wait() == 0
    assert "the chief on 127.0.0.1" in capsys.readouterr().out

    def state():
        runs = client.search_runs([client.get_experiment_by_name("alexnet-keras-smoke").experiment_id],
                                  max_results=1000)
        role = lambda name: [r for r in runs if r.data.tags.get(tracking.SWEEP_ROLE_TAG) == name]
        return role("parent"), role("trial")

    (parent,), trials = state()
    assert parent.info.status == "FINISHED" and parent.data.metrics["completed_trials"] == 2
    assert sorted(t.data.tags[tracking.TRIAL_TAG] for t in trials) == ["0", "1"]
    assert all(t.info.status == "FINISHED" and t.data.tags[PARENT] == parent.info.run_id for t in trials)
    assert {t.data.tags[tracking.TUNER_ID_TAG] for t in trials} <= {"tuner0", "tuner1"}   # the workers'

    # Resume as without Ray: a bigger budget continues the same sweep under the same parent.
    assert driver([*args, "--max-trials", "3", "--ray-workers", "1"]).wait() == 0
    (same,), trials = state()
    assert same.info.run_id == parent.info.run_id and same.info.status == "FINISHED"
    assert sorted(t.data.tags[tracking.TRIAL_TAG] for t in trials) == ["0", "1", "2"]
    assert all(t.info.status == "FINISHED" for t in trials)
    assert same.data.metrics["completed_trials"] == 3


@needs_ray
def test_a_study_on_two_nodes_logs_to_one_server_and_a_killed_node_s_child_is_retried(two_nodes, driver, tmp_path,
                                                                                       capsys):
    """A study on both nodes, whose second node's raylet is killed mid-child: the child is retried on the head.
    (Was two tests, a smoke study on two nodes and this fault: both studies' assertions are here.) Kills the
    second node for good: the tests after it run on the head alone."""
    client = MlflowClient(two_nodes.mlflow_uri)
    # 6 epochs: found after its first, the victim still trains for seconds after the socket scan, even when idle.
    path = _study_file(tmp_path, "ray-node-kill", epochs=6)
    study = driver(["ablate", path, "--ray", two_nodes.address, "--tracking-uri", two_nodes.mlflow_uri])
    experiment_id = _experiment_id(client, "ray-node-kill", study)
    victim = _child_in_training(client, experiment_id, study,   # the second node's processes, as they are now
                                where=lambda run: int(run.data.tags[tracking.PID_TAG]) in two_nodes.pids(two_nodes.second))
    # Mid-study: every TCP socket of the driver (this process), the nodes, their workers training the
    # children and the server, on 127.0.0.1.
    me = psutil.Process()
    sockets = tcp_sockets([*two_nodes.pids(), me.pid, *(p.pid for p in me.children(recursive=True))])
    assert any(pid == me.pid for pid, *_ in sockets)
    assert loopback_violations(sockets) == []
    two_nodes.kill_raylet(two_nodes.second)
    assert study.wait() == 0

    parent, children = _assert_every_child_finished_once(client, experiment_id, path)
    assert len(children) == 3                                          # 2 children + the dead attempt
    assert len({r.data.tags[tracking.RAY_NODE_TAG] for r in children}) == 2   # both nodes trained children
    assert all(r.data.tags[tracking.RAY_TASK_TAG] for r in children)
    out = capsys.readouterr().out
    assert "2/2 runs finished" in out and f"parent run: {parent.info.run_id}" in out
    killed = client.get_run(victim.info.run_id)
    # The dead attempt's run was ended by the retry, what it logged kept in it; not left RUNNING.
    assert killed.info.status == "KILLED" and "Ray retried the child" in killed.data.tags[tracking.END_REASON_TAG]
    assert _steps(client, killed.info.run_id)
    retry = _retry_of(children, victim)
    assert retry.data.tags[tracking.RAY_NODE_TAG] != victim.data.tags[tracking.RAY_NODE_TAG]
    assert int(retry.data.tags[tracking.PID_TAG]) in two_nodes.pids("head")   # on the surviving node


@needs_ray
def test_a_tracking_server_gone_mid_study_fails_clearly_and_loses_nothing(two_nodes, driver, tmp_path,
                                                                        monkeypatch, capsys):
    """On the head alone (after the node-kill test), with the cluster's own server, killed and started again."""
    uri = two_nodes.mlflow_uri
    client = MlflowClient(uri)
    # One child of one epoch, then one of 10 (one node of one CPU: one child at a time, in the order given):
    # the first finishes before the second starts, and the server is killed in the second's training
    # epochs, which 256 images make ~0.6 s each (~0.1 s after the first), a window of seconds for the poll.
    path = _study_file(tmp_path, "ray-server-gone", axes={"epochs": [1, 10]}, samples=256)
    # MLflow's client retries a dead server for minutes by default, and a training waits 120 s for its store
    # before it gives up (tracking.STORE_WAIT_ENV); these reach the jobs too.
    for name, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                        ("MLFLOW_HTTP_REQUEST_TIMEOUT", "60"), (tracking.STORE_WAIT_ENV, "3")):
        monkeypatch.setenv(name, value)
    argv = ["ablate", path, "--ray", two_nodes.address, "--tracking-uri", uri]
    study = driver(argv)
    experiment_id = _experiment_id(client, "ray-server-gone", study)

    def one_done_one_training() -> bool:
        _, children = _study_state(client, experiment_id)
        return (study.running() and any(r.info.status == "FINISHED" for r in children)
                and any(r.info.status == "RUNNING" and 0 < len(_steps(client, r.info.run_id)) <= 6
                        for r in children))

    wait_until(one_done_one_training, 600, interval=0.5, what="a child finished and another training")
    before = {r.info.run_id: (r.info.status, _steps(client, r.info.run_id))
              for r in _study_state(client, experiment_id)[1]}
    capsys.readouterr()
    two_nodes.kill("mlflow")

    assert study.wait(timeout=300) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alexnet-keras ablate:")]
    assert len(error) == 1 and f"error: the MLflow store {uri} failed while child" in error[0], error
    assert "run the same command to train the children that did not finish" in error[0]

    two_nodes.start_mlflow_server("mlflow")                            # the same store, back again
    two_nodes.wait_for_mlflow_server("mlflow")
    (parent,), children = _study_state(client, experiment_id)
    after = {r.info.run_id: r for r in children}
    for run_id, (status, steps) in before.items():                     # nothing logged before is lost
        assert _steps(client, run_id)[:len(steps)] == steps
        if status == "FINISHED":
            assert after[run_id].info.status == "FINISHED" and "test_accuracy" in after[run_id].data.metrics
    stranded = [r.info.run_id for r in children if r.info.status == "RUNNING"]
    assert stranded                                                    # the server could not be told

    assert driver(argv).wait() == 0                                    # the same command finishes the study
    again, children = _assert_every_child_finished_once(client, experiment_id, path)
    assert again.info.run_id == parent.info.run_id
    assert all(client.get_run(run_id).info.status == "KILLED" for run_id in stranded)


@pytest.mark.parametrize("command, spec", [("ablate", SMOKE), ("tune", SWEEP_SMOKE)])
@pytest.mark.parametrize("cpus", ["0", "-1", "nan", "inf", "two"])
def test_ray_cpus_that_fit_no_job_are_refused_before_any_cluster_or_run(untouched_store, capsys, monkeypatch,
                                                                        command, spec, cpus):
    from alexnet_keras.experiments import cluster

    # Another test of this worker may have connected to a cluster already: what counts is that this
    # command never asks for one.
    monkeypatch.setattr(cluster, "connect", lambda *args, **kwargs: pytest.fail("a Ray cluster was asked for"))
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, str(spec), "--ray", "--ray-cpus", cpus])
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert f"--ray-cpus: expected a positive number of CPUs (e.g. 0.5 or 2), got {cpus!r}" in line
    assert not untouched_store.exists()
