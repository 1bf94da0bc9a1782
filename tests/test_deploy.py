"""The Docker / Kubernetes route: deploy/docker/MLproject (docker_env) and deploy/kubernetes/.

Docker and a cluster are not available here, so these tests drive MLflow's own code as far as it goes
without them: its MLproject loader, the `docker run` command of its local backend, its Kubernetes
config parser and Job builder, fed with the commands README.md documents.
"""

import json
import re
import shlex
import sys
import tomllib
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from mlflow.cli import _user_args_to_dict
from mlflow.projects import _parse_kubernetes_config, env_type
from mlflow.projects._project_spec import load_project
from mlflow.projects.backend.local import _get_docker_command
from mlflow.projects.docker import get_docker_tracking_cmd_and_envs, validate_docker_env
from mlflow.projects.utils import get_entry_point_command
from mlflow.tracking._tracking_service.utils import _use_tracking_uri

ROOT = Path(__file__).resolve().parent.parent
DOCKER_PROJECT = ROOT / "deploy" / "docker"
K8S_CONFIG = ROOT / "deploy" / "kubernetes" / "kubernetes_config.json"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"alexnet-keras:{VERSION}"
README = (ROOT / "README.md").read_text()
DOCKERFILE = (ROOT / "Dockerfile").read_text()
# The command MLflow runs in the container names the CLI the image installs (pyproject's script).
CLI = ["alexnet-keras"]
ROOT_CLI = ["python", "-m", "alexnet_keras"]


def _readme_mlflow_run(kubernetes: bool):
    (line,) = [ln for ln in README.splitlines()
               if ln.startswith("mlflow run deploy/docker") and ("--backend kubernetes" in ln) == kubernetes]
    argv = shlex.split(line)
    docker_args = [argv[i + 1] for i, a in enumerate(argv) if a == "-A"]
    params = [argv[i + 1] for i, a in enumerate(argv) if a == "-P"]
    # MLflow's own CLI parser turns `-A gpus=all` into {"gpus": "all"}, `-A t` into {"t": True}.
    return argv, _user_args_to_dict(docker_args, argument_type="A"), _user_args_to_dict(params)


def _entry_point_names(folder):
    return set(yaml.safe_load((folder / "MLproject").read_text())["entry_points"])


def _signature(entry_point):
    return {name: (p.type, p.default) for name, p in entry_point.parameters.items()}


def test_docker_project_loads_and_runs_the_documented_image():
    project = load_project(str(DOCKER_PROJECT))
    assert project.env_type == env_type.DOCKER
    assert project.docker_env["image"] == IMAGE
    validate_docker_env(project)  # what `mlflow run` checks first: a name and an image
    # One tag everywhere: the build command in README.md and in the Dockerfile's header.
    assert f"docker build -t {IMAGE} ." in README
    assert f"docker build -t {IMAGE} ." in DOCKERFILE


def test_docker_entry_points_mirror_the_root_project():
    root, docker = load_project(str(ROOT)), load_project(str(DOCKER_PROJECT))
    assert _entry_point_names(DOCKER_PROJECT) == _entry_point_names(ROOT)
    for name in _entry_point_names(ROOT):
        root_ep, ep = root.get_entry_point(name), docker.get_entry_point(name)
        assert _signature(ep) == _signature(root_ep), name
        assert set(re.findall(r"\{(\w+)\}", ep.command)) == set(ep.parameters), name
        root_argv = shlex.split(root_ep.command)
        assert root_argv[:len(ROOT_CLI)] == ROOT_CLI, name
        assert shlex.split(ep.command) == CLI + root_argv[len(ROOT_CLI):], name


def test_local_docker_backend_runs_the_cli_on_a_gpu_against_the_tracking_server(tmp_path):
    argv, docker_args, params = _readme_mlflow_run(kubernetes=False)
    assert "--backend" not in argv and "--build-image" not in argv  # the image as built, WORKDIR and all
    project = load_project(str(DOCKER_PROJECT))
    run = SimpleNamespace(info=SimpleNamespace(run_id="r1", experiment_id="7",
                                               artifact_uri="mlflow-artifacts:/7/r1/artifacts"))
    with _use_tracking_uri("http://127.0.0.1:5000"):
        docker_cmd = _get_docker_command(
            image=SimpleNamespace(tags=[IMAGE]), active_run=run, docker_args=docker_args,
            volumes=project.docker_env.get("volumes"), user_env_vars=project.docker_env.get("environment"))
    entry = get_entry_point_command(project, "main", params, str(tmp_path))
    # LocalBackend.run joins both with spaces and runs the string with `bash -c`.
    words = shlex.split(" ".join(docker_cmd + entry))
    assert words[:3] == ["docker", "run", "--rm"]
    at = words.index(IMAGE)
    options, i = {}, 3
    while i < at:
        options.setdefault(words[i], []).append(words[i + 1])
        i += 2
    assert options["--gpus"] == ["all"] and options["--network"] == ["host"]
    assert "MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in options["-e"] and "MLFLOW_RUN_ID=r1" in options["-e"]
    assert "-v" not in options  # a server store: nothing of the host's store is mounted
    # What the container executes: `docker run` appends its arguments to the ENTRYPOINT.
    (entrypoint,) = re.findall(r"^ENTRYPOINT (.+)$", DOCKERFILE, flags=re.M)
    executed = (options["--entrypoint"] if "--entrypoint" in options else json.loads(entrypoint)) + words[at + 1:]
    if executed[0] == "env":
        executed = executed[1:]
    assert executed[:2] == CLI + ["train"], executed[:3]
    assert executed[executed.index("--lrn") + 1] == "false"
    data_dir = executed[executed.index("--data-dir") + 1]
    assert any(data_dir.startswith(v.split(":")[1] + "/") for v in options["--volume"])


def test_a_local_sqlite_store_is_mounted_as_a_file_which_the_readme_advises_against():
    # MLflow mounts the database file at /mlflow/tmp/mlruns: its folder is created by Docker as root,
    # so the image's uid 1000 cannot create SQLite's journal beside it. If MLflow changes this, revisit
    # README.md's "The store is a tracking server".
    cmds, envs = get_docker_tracking_cmd_and_envs("sqlite:////srv/store/mlflow.db")
    assert cmds[0] == "-v" and cmds[1].lstrip("/") == "srv/store/mlflow.db:/mlflow/tmp/mlruns", cmds
    assert envs["MLFLOW_TRACKING_URI"] == "sqlite:////mlflow/tmp/mlruns"


def test_kubernetes_config_has_what_mlflow_reads(monkeypatch):
    monkeypatch.chdir(ROOT)  # the template path is relative to the folder `mlflow run` starts in
    config = _parse_kubernetes_config(json.loads(K8S_CONFIG.read_text()))
    assert config["repository-uri"].endswith("/alexnet-keras")  # a registry path, pushed to by --build-image
    template = config["kube-job-template"]
    assert template["kind"] == "Job" and template["metadata"]["namespace"]
    (container,) = template["spec"]["template"]["spec"]["containers"]
    assert template["metadata"]["name"] == container["name"] == "{replaced with MLflow Project name}"
    assert container["image"] == "{replaced with URI of Docker image created during Project execution}"
    assert container["command"] == ["{replaced with MLflow Project entry point command}"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert template["spec"]["template"]["spec"]["restartPolicy"] == "Never"


@pytest.fixture
def mlflow_kubernetes(monkeypatch):
    """mlflow.projects.kubernetes, importable without the `kubernetes` client.

    It imports the client at module level; the two functions used here never call it.
    """
    import mlflow.projects

    try:
        import kubernetes  # noqa: F401
        stubbed = False
    except ImportError:
        stubbed = True
        exceptions = types.ModuleType("kubernetes.config.config_exception")
        exceptions.ConfigException = type("ConfigException", (Exception,), {})
        config = types.ModuleType("kubernetes.config")
        config.config_exception = exceptions
        client = types.ModuleType("kubernetes")
        client.config = config
        for module in (client, config, exceptions):
            monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.delenv("KUBE_MLFLOW_TRACKING_URI", raising=False)
    import mlflow.projects.kubernetes as kb

    yield kb
    if stubbed:  # leave no module bound to the stub behind
        sys.modules.pop("mlflow.projects.kubernetes", None)
        vars(mlflow.projects).pop("kubernetes", None)


def test_kubernetes_job_runs_the_cli_with_a_gpu_in_the_app_folder(mlflow_kubernetes, tmp_path):
    kb = mlflow_kubernetes
    argv, _, params = _readme_mlflow_run(kubernetes=True)
    # Without --build-image MLflow would push `alexnet-keras:0.1.0` itself, which names no registry.
    assert "--build-image" in argv
    assert argv[argv.index("--backend-config") + 1] == str(K8S_CONFIG.relative_to(ROOT))
    project = load_project(str(DOCKER_PROJECT))
    template = yaml.safe_load((K8S_CONFIG.parent / "job_template.yaml").read_text())
    # What mlflow.projects.run(backend="kubernetes") hands to run_kubernetes_job.
    job = kb._get_kubernetes_job_definition(
        project.name, "registry.example.com/alexnet-keras:abc1234", "sha256:" + "0" * 64,
        kb._get_run_command(get_entry_point_command(project, "main", params, str(tmp_path))),
        {"MLFLOW_RUN_ID": "r1", "MLFLOW_TRACKING_URI": "http://mlflow:5000"}, template)
    name = job["metadata"]["name"]
    assert len(name) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name
    (container,) = job["spec"]["template"]["spec"]["containers"]
    # The container's `command` replaces the image's ENTRYPOINT, so it names the CLI itself.
    assert container["command"][:2] == CLI + ["train"]
    # MLflow quotes each word though no shell reads them: an empty value would arrive as `''`.
    assert "''" not in container["command"], container["command"]
    assert all(set(e) == {"name", "value"} for e in container["env"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # Relative config paths (experiments/...) and ./tuner resolve in the image's app folder.
    workdirs = re.findall(r"^WORKDIR\s+(\S+)", DOCKERFILE, flags=re.M)
    assert container["workingDir"] == workdirs[-1]
