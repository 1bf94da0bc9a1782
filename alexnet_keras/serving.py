"""A trained model as an MLflow model: logged self-contained (`log_model`: the pyfunc `AlexNetClassifier` plus a keras
flavor, this package as its code), loaded from any reference (`load_predictor`), served by `mlflow models serve`,
registered (`register_model`). The folder and the requests: docs/data.md."""

import base64
import binascii
import importlib.metadata
import io
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import AnyType, Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema

from .data import DataError
from .model.inference import (METADATA_KEY, ModelMetadata, Predictor, check_options, load_keras_predictor, save_model,
                              sidecar)

MODEL_NAME = "alexnet"                # the logged model's name (runs:/<run id>/alexnet), unless the caller gives one
KERAS_FILE = "model.keras"            # under artifacts/ in the model folder
# What the served model imports beyond MLflow's own requirements, pinned to the versions that trained
# it (tests/test_serving.py checks this against a fresh process that loads the model).
REQUIREMENTS = ("tensorflow", "keras", "numpy", "scikit-learn")
DEFAULT_ALIAS = "champion"
_RUN_ID = re.compile(r"[0-9a-f]{32}")
# "Models from code": the model's code is this file, run by MLflow when it loads the model, after it has
# put the model's code/ folder (this package) on sys.path. Nothing is unpickled.
_MODEL_CODE = ('"""The served model of alexnet-keras (see alexnet_keras/serving.py)."""\n'
               "import mlflow\n\nfrom alexnet_keras.serving import AlexNetClassifier\n\n"
               "mlflow.models.set_model(AlexNetClassifier())\n")

INPUT_SCHEMA = Schema([ColSpec("binary", "image", required=False), ColSpec(AnyType(), "pixels", required=False)])
OUTPUT_SCHEMA = Schema([
    ColSpec("string", "class"), ColSpec("long", "index"), ColSpec("double", "probability"),
    ColSpec(Array(Object([Property("rank", "long"), Property("class", "string"), Property("index", "long"),
                          Property("probability", "double")])), "top_k")])
PARAMS_SCHEMA = ParamSchema([ParamSpec("top_k", "long", 5), ParamSpec("crops", "string", "center")])


class ModelError(DataError):
    """A model cannot be loaded, logged or registered as asked; the message says why and what to do."""


class AlexNetClassifier(mlflow.pyfunc.PythonModel):
    """Raw images in, top-k classes out (the request and response: docs/data.md)."""

    def load_context(self, context) -> None:
        keras_file = Path(context.artifacts[KERAS_FILE])
        self.predictor = load_keras_predictor(keras_file, source=str(keras_file.parent.parent))

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        params = {"top_k": 5, "crops": "center", **(params or {})}
        try:
            check_options(params["crops"], params["top_k"], top_name="top_k")
            results = self.predictor.predict_images(request_images(model_input), crops=params["crops"],
                                                    top=int(params["top_k"]))
        except DataError as err:
            raise MlflowException(str(err), INVALID_PARAMETER_VALUE) from None
        errors = [f"row {i}: {r['error']}" for i, r in enumerate(results) if "error" in r]
        if errors:   # INVALID_PARAMETER_VALUE: the server answers 400 and keeps serving
            raise MlflowException("; ".join(errors)[:2000], INVALID_PARAMETER_VALUE)
        return pd.DataFrame([{"class": r["predictions"][0]["class"], "index": r["predictions"][0]["index"],
                              "probability": r["predictions"][0]["probability"], "top_k": r["predictions"]}
                             for r in results], columns=list(OUTPUT_SCHEMA.input_names()))


def request_images(model_input: pd.DataFrame) -> list:
    """The images of a request, one per row: bytes (`image`) or an array (`pixels`). `image` may be base64:
    MLflow decodes it in the dataframe formats, but hands on the base64 text of `inputs` and `instances`
    (as bytes), and an image file's bytes are never valid base64."""
    if not len(model_input) or not {"image", "pixels"} & set(model_input.columns):
        raise DataError("no images in the request: send rows with an `image` column (the bytes of an image file; "
                        "base64 in JSON) or a `pixels` column (HxWx3 integers in 0..255).")
    images = []
    for i, row in enumerate(model_input.reindex(columns=["image", "pixels"]).itertuples(index=False)):
        given = {k: v for k, v in zip(("image", "pixels"), row) if v is not None and not isinstance(v, float)}
        if len(given) != 1:
            raise DataError(f"row {i}: give exactly one of `image` and `pixels`; got {sorted(given) or 'neither'}.")
        (key, value), = given.items()
        if key == "image" and isinstance(value, (str, bytes)):
            try:
                value = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                if isinstance(value, str):
                    raise DataError(f"row {i}: `image` is a string but not base64 (send the file's bytes, "
                                    "base64-encoded in JSON).") from None
        images.append(value)
    return images


def requirements() -> list[str]:
    """REQUIREMENTS pinned to the running versions (never alexnet-keras: its code travels with the model)."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in REQUIREMENTS]


def example_image(metadata: ModelMetadata, example_batch) -> bytes:
    """A PNG for the model's input example: the first image of `example_batch` (model views)."""
    from PIL import Image

    pixels = np.asarray(example_batch[0], np.float64)
    if metadata.mean_image is not None:   # the views are centre crops with the mean image subtracted
        o, size = (metadata.mean_image.shape[0] - pixels.shape[0]) // 2, pixels.shape[0]
        pixels = pixels + metadata.mean_image[o:o + size, o:o + size]
    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


class _PyfuncWithKerasFlavor:
    """MLflow's pyfunc flavor plus a `keras` flavor on the same .keras file (mlflow.keras.load_model)."""

    __name__ = "mlflow.pyfunc"

    @staticmethod
    def save_model(path, mlflow_model, **kwargs) -> None:
        import keras

        kwargs.pop("validate_serving_input", None)   # Model.log's own option, handed on to the flavor
        mlflow.pyfunc.save_model(path, mlflow_model=mlflow_model, **kwargs)
        # mlflow.keras's loader reads <data>/model.keras.
        mlflow_model.add_flavor("keras", data="artifacts", keras_version=keras.__version__,
                                keras_backend=keras.backend.backend(), save_exported_model=False)
        mlflow_model.save(os.path.join(path, "MLmodel"))


def log_model(model, metadata: ModelMetadata, example_batch, name: str = MODEL_NAME, **options):
    """Log `model` to the active run as a self-contained MLflow model called `name` (`options`: more of
    mlflow.models.Model.log's arguments: tags, params, ...); MLflow's ModelInfo, whose model_uri is
    `models:/m-…`."""
    import keras

    with tempfile.TemporaryDirectory(prefix="alexnet-keras-log-") as folder:
        save_model(model, Path(folder, KERAS_FILE), metadata.class_names, metadata.preprocessing, metadata.mean_image)
        artifacts = {p.name: str(p) for p in Path(folder).iterdir()}   # model.keras and its sidecars
        code = Path(folder, "alexnet_classifier.py")
        code.write_text(_MODEL_CODE)
        example = pd.DataFrame({"image": [example_image(metadata, example_batch)]})
        return mlflow.models.Model.log(
            artifact_path=None, name=name, flavor=_PyfuncWithKerasFlavor, python_model=str(code), artifacts=artifacts,
            code_paths=[str(Path(__file__).resolve().parent)], pip_requirements=requirements(),
            signature=ModelSignature(INPUT_SCHEMA, OUTPUT_SCHEMA, PARAMS_SCHEMA),
            input_example=(example, {"top_k": min(5, len(metadata.class_names))}),
            # MLflow would load a second copy of the network to predict the example (seconds and a model's
            # memory per run); tests/test_serving.py loads and serves logged models for real instead.
            validate_serving_input=False,
            metadata={METADATA_KEY: {**metadata.to_dict(f"artifacts/{sidecar(Path(KERAS_FILE), 'mean_image.npy')}"),
                                     "keras_version": keras.__version__}}, **options)


def mlflow_reference(ref: str) -> bool:
    """Whether `ref` names a model in an MLflow store: a run id, or a runs:/, models:/ (or other scheme) URI."""
    return bool(_RUN_ID.fullmatch(ref)) or "://" in ref or ref.startswith(("runs:/", "models:/"))


def load_predictor(ref: str) -> Predictor:
    """A Predictor from a run id, an MLflow model URI (runs:/, models:/NAME/VERSION, models:/NAME@ALIAS),
    a model folder or a .keras file; downloads go to a temporary folder, removed before returning."""
    path = Path(ref).expanduser()
    if not path.exists() and not mlflow_reference(ref):
        raise ModelError(f"--model {ref!r} is neither an existing .keras file or MLflow model folder nor a "
                         "run id (32 hex digits) or an MLflow model URI (models:/NAME/VERSION, models:/NAME@ALIAS, "
                         "runs:/<run id>/NAME).")
    if path.is_file():
        return load_keras_predictor(path, source=ref)
    with tempfile.TemporaryDirectory(prefix="alexnet-keras-model-") as folder:
        if not path.exists():
            uri = logged_model_uri(get_run(ref)) if _RUN_ID.fullmatch(ref) else ref
            try:
                path = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=folder))
            except Exception as err:  # noqa: BLE001 - unknown run or model, no such artifact, store unreachable
                raise ModelError(f"could not fetch the model {uri!r} from {mlflow.get_tracking_uri()!r}: "
                                 f"{_first_line(err)}. Check the run id or model name (and --tracking-uri), or "
                                 "pass a .keras file.") from None
        if not (path / "MLmodel").is_file() or not (path / "artifacts" / KERAS_FILE).is_file():
            raise ModelError(f"{ref!r} is no MLflow model logged by alexnet-keras (an MLmodel file and "
                             f"artifacts/{KERAS_FILE}); pass a .keras file, an MLflow model folder, a run id or a "
                             "models:/ URI.")
        return load_keras_predictor(path / "artifacts" / KERAS_FILE, source=ref)


def get_run(run_id: str):
    try:
        return mlflow.MlflowClient().get_run(run_id)
    except MlflowException as err:
        raise ModelError(f"no MLflow run {run_id!r} in {mlflow.get_tracking_uri()!r}: {_first_line(err)}") from None


def logged_model_uri(run) -> str:
    """The `models:/m-…` URI of the model `run` logged last (an MLflow 3 logged model lives outside the run's
    artifacts, under whatever name it was logged with)."""
    found = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}], max_results=1, output_format="list")
    if not found:
        raise ModelError(f"run {run.info.run_id} holds no logged model (its status is {run.info.status}): a run "
                         "logs its model only when its training ends FINISHED. Pick a finished run (`mlflow ui`, "
                         "or `mlflow runs list`).")
    return found[0].model_uri


def _first_line(err: Exception) -> str:
    text = getattr(err, "message", None) or str(err) or type(err).__name__
    return text.strip().splitlines()[0][:300]


def check_model_name(name: str, alias: str | None = DEFAULT_ALIAS) -> None:
    """A ModelError unless `name` (and `alias`) can be used in `models:/NAME@ALIAS` (checked before training)."""
    # models:/ URIs are parsed as URLs: a tab or newline is dropped and '?' starts a query, so no URI reaches them.
    bad = re.search(r"[/:@%?\x00-\x1f\x7f]", name) if isinstance(name, str) else None
    if not isinstance(name, str) or not name.strip() or name != name.strip() or bad:
        raise ModelError(f"registered model name {name!r}{f' contains {bad.group()!r}' if bad else ''}: use letters, "
                         "digits, spaces, '.', '_' or '-' (not empty; no '/', ':', '@', '%', '?' or control "
                         "characters), e.g. alexnet-cifar10.")
    if alias is not None and (not re.fullmatch(r"[A-Za-z0-9_-]+", alias) or alias.lower() == "latest"
                              or re.fullmatch(r"[vV]\d+", alias)):
        raise ModelError(f"model alias {alias!r}: use letters, digits, '_' or '-', not 'latest' or v<number>; "
                         "e.g. champion.")


def register_model(run_id: str, name: str, *, alias: str | None = DEFAULT_ALIAS, origin: str = "train",
                   tags: Mapping[str, str] | None = None, description: str | None = None):
    """Register the model run `run_id` logged as a new version of `name`, described (`description`, else the
    run's own, with its test accuracy and the run) and tagged with where it came from: `origin` (train, study,
    sweep ...), the run's id, name and experiment, its config and data digests and test accuracy, plus `tags`.
    `alias` moves to it unless the version it names has a higher test accuracy. Returns MLflow's ModelVersion."""
    check_model_name(name, alias)
    run = get_run(run_id)
    source = {"origin": origin, "run_id": run_id, "run_name": run.info.run_name or "",
              "experiment_id": run.info.experiment_id}
    source.update({key: run.data.tags[f"{METADATA_KEY}.{key}"] for key in ("config_digest", "data_digest", "variant")
                   if f"{METADATA_KEY}.{key}" in run.data.tags})
    accuracy = run.data.metrics.get("test_accuracy")
    if accuracy is not None:
        source["test_accuracy"] = f"{accuracy:.6g}"
    scored = f"test accuracy {source['test_accuracy']}" if accuracy is not None else "no test accuracy"
    description = (f"{description or run.data.tags.get('mlflow.note.content') or 'A model trained by alexnet-keras.'}"
                   f"\n\n{scored}; run {run_id} ({source['run_name']}) in experiment {run.info.experiment_id}.")
    version_tags = {**{f"{METADATA_KEY}.{k}": str(v) for k, v in source.items()}, **(tags or {})}
    client = mlflow.MlflowClient()
    try:
        version = mlflow.register_model(logged_model_uri(run), name, tags={k: str(v) for k, v in version_tags.items()})
        client.update_model_version(name, version.version, description)
        holder = client.get_registered_model(name).aliases.get(alias) if alias else None
        best = holder and client.get_model_version(name, holder).tags.get(f"{METADATA_KEY}.test_accuracy")
        if best is not None and (accuracy is None or float(source["test_accuracy"]) < float(best)):
            print(f"{name}@{alias} stays on version {holder} (test accuracy {best}; version {version.version} has "
                  f"{scored}). To move it anyway: MlflowClient().set_registered_model_alias({name!r}, {alias!r}, "
                  f"{version.version})", flush=True)
        elif alias:
            client.set_registered_model_alias(name, alias, version.version)
    except MlflowException as err:
        raise ModelError(f"could not register the model of run {run_id} as {name!r}: {_first_line(err)}") from None
    return version
