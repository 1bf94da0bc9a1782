"""The logged model as a first-class MLflow model: a fresh Python loads it without the package, `mlflow
models serve` / `mlflow models predict` / `alexnet-keras predict` agree on a model that has learned
something, bad requests get a 400 and the server keeps serving, and the registry works on SQLite."""

from __future__ import annotations

import ast
import base64
import contextlib
import importlib.metadata
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.cli import cli as mlflow_cli
from mlflow.tracking import MlflowClient
from conftest import COLOURS, colour_image, free_port, jpeg_bytes, serving_env
from PIL import Image

from alexnet_keras import cli
from alexnet_keras import serving


@pytest.fixture(scope="module")
def learned(colour_model, tmp_path_factory):
    """conftest's colour model (a paper-recipe model with a per-pixel mean image, registered as
    `colours`) and one fresh JPEG per class."""
    uri, run, root = colour_model
    rng = np.random.default_rng(99)
    requests = tmp_path_factory.mktemp("requests")
    files = {}
    for name, colour in COLOURS.items():
        files[name] = requests / f"{name}.jpg"
        files[name].write_bytes(jpeg_bytes(colour_image(rng, colour, (45, 30))))
    mlflow.set_tracking_uri(uri)
    yield uri, run.info.run_id, root, files


FRESH_PYTHON = r"""
import base64, json, sys
import mlflow, numpy as np, pandas as pd
from PIL import Image
assert not [m for m in sys.modules if m.startswith("alexnet_keras")]
model = mlflow.pyfunc.load_model(sys.argv[1])
files = json.loads(sys.argv[2])
rows = pd.DataFrame({
    "image": [open(f, "rb").read() for f in files] + [base64.b64encode(open(files[0], "rb").read()).decode(), None],
    "pixels": [None] * (len(files) + 1) + [np.asarray(Image.open(files[0]).convert("RGB"))],
})
out = model.predict(rows, params={"top_k": 2})
print(json.dumps({"classes": out["class"].tolist(), "probability": out["probability"].tolist(),
                  "top_k": [len(t) for t in out["top_k"]],
                  "package": sys.modules["alexnet_keras"].__file__,
                  "modules": sorted(m.__file__ for n, m in sys.modules.items()
                                    if n.startswith("alexnet_keras") and getattr(m, "__file__", None))}))
"""


def test_a_fresh_python_loads_the_logged_model_without_the_package(learned, tmp_path):
    uri, run_id, _, files = learned
    model_uri = serving.logged_model_uri(MlflowClient(uri).get_run(run_id))
    assert model_uri.startswith("models:/m-")
    info = mlflow.models.get_model_info(model_uri)
    assert set(info.flavors) == {"python_function", "keras"}
    assert info.flavors["python_function"]["code"] == "code"
    assert info.signature.inputs.input_names() == ["image", "pixels"]
    assert info.signature.params.to_dict()[0]["name"] == "top_k"
    assert info.metadata["alexnet_keras"]["class_names"] == sorted(COLOURS)
    folder = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "model")))
    requirements = (folder / "requirements.txt").read_text().split()
    assert requirements == [f"mlflow=={mlflow.__version__}", *serving.requirements()]
    assert not [r for r in requirements if "alexnet" in r]
    assert {"model.keras", "model.preprocessing.json", "model.mean_image.npy"} <= {
        p.name for p in (folder / "artifacts").iterdir()}
    example = json.loads((folder / "serving_input_example.json").read_text())
    assert example["dataframe_split"]["columns"] == ["image"]
    import alexnet_keras.model.alexnet  # noqa: F401 - the keras flavor needs the AlexNet class registered

    network = mlflow.keras.load_model(model_uri)   # the keras flavor: the same .keras file
    assert network.input_shape == (None, 32, 32, 3) and network.output_shape == (None, len(COLOURS))

    # A Python started elsewhere, with no PYTHONPATH, that never imports alexnet_keras itself.
    (tmp_path / "elsewhere").mkdir()
    ordered = [str(files[name]) for name in sorted(COLOURS)]
    result = subprocess.run([sys.executable, "-I", "-c", FRESH_PYTHON, model_uri, json.dumps(ordered)],
                            cwd=tmp_path / "elsewhere", env=serving_env(uri), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    # Each colour, then the first file again as base64 text and as decoded pixels.
    assert out["classes"] == [*sorted(COLOURS), sorted(COLOURS)[0], sorted(COLOURS)[0]]
    assert out["top_k"] == [2] * 5
    assert out["probability"][3] == pytest.approx(out["probability"][0], abs=1e-6)
    assert "/code/alexnet_keras/" in out["package"] and str(Path(cli.__file__).parent) not in out["package"]

    # Every third-party module the package imports on that path comes with requirements.txt.
    assert_imports_covered(out["modules"], requirements)


def assert_imports_covered(module_files: list[str], requirements: list[str]) -> None:
    imported = set()
    for path in module_files:
        for node in ast.walk(ast.parse(Path(path).read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    imported -= set(sys.stdlib_module_names) | {"alexnet_keras", "__future__"}
    providers = importlib.metadata.packages_distributions()
    needed = {dist.lower() for name in imported for dist in providers.get(name, [name])}
    covered: set[str] = set()

    def add(dist: str) -> None:
        key = dist.lower().replace("_", "-")
        if key in covered:
            return
        covered.add(key)
        try:
            requires = importlib.metadata.requires(dist) or []
        except importlib.metadata.PackageNotFoundError:
            return
        for requirement in requires:
            if "extra ==" not in requirement:
                add(re.split(r"[ ;<>=!~\[(]", requirement, maxsplit=1)[0])

    for requirement in requirements:
        add(requirement.split("==")[0])
    assert {d.replace("_", "-") for d in needed} <= covered, sorted(needed - covered)


@contextlib.contextmanager
def model_server(model_uri: str, cwd: Path, uri: str):
    """`mlflow models serve -m model_uri` on a free 127.0.0.1 port, as a user starts it; yields (port,
    process) once /ping answers, and stops it (and its uvicorn workers) afterwards, pass or fail."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
                               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              cwd=cwd, env=serving_env(uri), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, server.stdout.read()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        yield port, server
    finally:
        stop(server)


def stop(server: subprocess.Popen) -> None:
    """End the server and the uvicorn workers it started (its own process group)."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def post(port: int, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_serve_predict_and_cli_agree_and_bad_requests_get_400(learned, tmp_path, capsys, monkeypatch):
    """`mlflow models serve` of the registered model (models:/colours@champion) on loopback, `mlflow models
    predict` of the run's model and `alexnet-keras predict`: the same class and probabilities for real JPEGs;
    bad requests are answered 400 and the server keeps serving."""
    uri, run_id, _, files = learned
    names = sorted(COLOURS)
    encoded = [base64.b64encode(files[name].read_bytes()).decode() for name in names]
    request = {"dataframe_split": {"columns": ["image"], "data": [[e] for e in encoded]}, "params": {"top_k": 3}}
    with model_server("models:/colours@champion", tmp_path, uri) as (port, server):
        status, served = post(port, request)
        assert status == 200, served
        served = served["predictions"]
        assert [row["class"] for row in served] == names
        assert all(len(row["top_k"]) == 3 and row["top_k"][0]["class"] == row["class"] for row in served)

        pixels = np.asarray(Image.open(files["red"]).convert("RGB")).tolist()
        status, body = post(port, {"inputs": {"pixels": [pixels]}})
        assert status == 200 and body["predictions"][0]["class"] == "red", body
        # The tensor formats: MLflow hands the model the base64 text of `image` there, not the bytes.
        for body in ({"inputs": {"image": encoded}, "params": {"top_k": 3}},
                     {"instances": [{"image": e} for e in encoded], "params": {"top_k": 3}}):
            status, answer = post(port, body)
            assert status == 200 and answer["predictions"] == served, (body.keys(), answer)

        bad = {
            "not an image": {"dataframe_split": {"columns": ["image"],
                                                 "data": [[base64.b64encode(b"plain text").decode()]]}},
            "wrong shape": {"inputs": {"pixels": [[[1, 2], [3, 4]]]}},
            "out of range": {"inputs": {"pixels": [[[[300, 0, 0]]]]}},
            "empty": {"dataframe_split": {"columns": ["image"], "data": []}},
            "no image column": {"dataframe_split": {"columns": ["photo"], "data": [["x"]]}},
            "bad top_k": {**request, "params": {"top_k": 0}},
            "negative top_k": {"instances": [{"image": encoded[0]}], "params": {"top_k": -2}},
            "bad crops": {**request, "params": {"crops": "seven"}},
        }
        fragments = {"not an image": "row 0: not a readable image", "wrong shape": "shape (height, width, 3)",
                     "out of range": "integers in 0..255", "empty": "", "no image column": "no images",
                     "bad top_k": "top_k must be a whole number of at least 1; got 0",
                     "negative top_k": "top_k must be a whole number of at least 1; got -2",
                     "bad crops": "crops must be one of"}
        for case, body in bad.items():
            status, answer = post(port, body)
            assert 400 <= status < 500, (case, status, answer)
            assert fragments[case] in answer.get("message", ""), (case, answer)
        status, again = post(port, request)
        assert status == 200 and again["predictions"] == served   # still serving, same answer
        assert server.poll() is None

    # `mlflow models predict` of the run's logged model on the same request: the same answer. The command runs
    # here, not in a Python of its own: with the local env manager it predicts in its own process anyway, and
    # test_a_fresh_python_loads_the_logged_model_without_the_package loads the model in a fresh one.
    logged = serving.logged_model_uri(MlflowClient(uri).get_run(run_id))
    (tmp_path / "request.json").write_text(json.dumps(request))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result = CliRunner().invoke(mlflow_cli, ["models", "predict", "-m", logged, "--env-manager", "local", "-i",
                                             str(tmp_path / "request.json"), "-t", "json", "-o",
                                             str(tmp_path / "out.json")])
    assert result.exit_code == 0, (result.output[-3000:], result.exception)
    predicted = json.loads((tmp_path / "out.json").read_text())["predictions"]
    assert [row["class"] for row in predicted] == names
    np.testing.assert_allclose([r["probability"] for r in predicted], [r["probability"] for r in served], atol=1e-6)

    # `alexnet-keras predict --model RUN_ID`: the same, and no model copy left in the temporary folder.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr("tempfile.tempdir", None)
    capsys.readouterr()
    assert cli.main(["predict", "--model", run_id, *[str(files[n]) for n in names], "--json", "--top", "3"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert [r["predictions"] for r in results] == [row["top_k"] for row in served]
    left = [p.name for p in scratch.rglob("*") if not p.name.startswith("__autograph_generated_file")]
    assert left == []   # (TensorFlow's autograph leaves its own generated code there until exit)


class Constant(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        return model_input


def test_registry_alias_tags_and_predict_by_alias(learned, capsys, caplog, monkeypatch):
    uri, run_id, _, files = learned
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    logging.getLogger("mlflow").addHandler(caplog.handler)   # MLflow's loggers do not propagate to the root
    try:
        first = serving.register_model(run_id, "shelf", origin="train", tags={"note": "first"})
        second = serving.register_model(run_id, "shelf", origin="sweep", description="the sweep's best")
    finally:
        logging.getLogger("mlflow").removeHandler(caplog.handler)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert (int(first.version), int(second.version)) == (1, 2)
    client = MlflowClient(uri)
    champion = client.get_model_version_by_alias("shelf", "champion")
    assert int(champion.version) == 2 and champion.source.startswith("models:/m-")
    run = client.get_run(run_id)
    assert champion.description == (f"the sweep's best\n\ntest accuracy 1; run {run_id} ({run.info.run_name}) in "
                                     f"experiment {run.info.experiment_id}.")
    # Registered with no description: the run's own.
    assert client.get_model_version("shelf", "1").description.startswith(run.data.tags["mlflow.note.content"])
    assert champion.run_id == run_id
    tags = champion.tags
    assert tags["alexnet_keras.origin"] == "sweep" and tags["alexnet_keras.run_id"] == run_id
    assert tags["alexnet_keras.run_name"] == run.info.run_name
    assert tags["alexnet_keras.config_digest"] == run.data.tags["alexnet_keras.config_digest"]
    assert float(tags["alexnet_keras.test_accuracy"]) == 1.0
    assert client.get_model_version("shelf", "1").tags["note"] == "first"

    assert cli.main(["predict", "--model", "models:/shelf@champion", str(files["green"]), "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)["results"]
    assert result["predictions"][0]["class"] == "green"
    model = mlflow.pyfunc.load_model("models:/shelf@champion")
    answer = model.predict(pd.DataFrame({"image": [files["blue"].read_bytes()]}))
    assert answer["class"].tolist() == ["blue"]

    for name, alias, fragment in [("", "champion", "registered model name"), ("a/b", "champion", "no '/'"),
                                  ("ok", "latest", "model alias 'latest'"), ("ok", "v3", "model alias 'v3'")]:
        with pytest.raises(serving.ModelError, match=fragment):
            serving.check_model_name(name, alias)
    with pytest.raises(serving.ModelError, match="no MLflow run"):
        serving.register_model("0" * 32, "shelf")
    assert cli.main(["predict", "--model", "models:/shelf@nobody", str(files["green"])]) == 2
    assert "could not fetch the model 'models:/shelf@nobody'" in capsys.readouterr().err

    # A worse model (whatever its logged name) becomes a version, but champion stays on the better one.
    with mlflow.start_run(experiment_id=run.info.experiment_id) as worse:
        mlflow.log_metric("test_accuracy", 0.5)
        mlflow.pyfunc.log_model(name="constant", python_model=Constant(), pip_requirements=[])
    capsys.readouterr()
    third = serving.register_model(worse.info.run_id, "shelf")
    assert int(third.version) == 3 and int(client.get_model_version_by_alias("shelf", "champion").version) == 2
    assert "test accuracy 0.5; run" in client.get_model_version("shelf", "3").description
    assert capsys.readouterr().out.strip() == (
        "shelf@champion stays on version 2 (test accuracy 1; version 3 has test accuracy 0.5). To move it anyway: "
        "MlflowClient().set_registered_model_alias('shelf', 'champion', 3)")
