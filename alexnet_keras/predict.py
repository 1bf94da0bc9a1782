"""`alexnet-keras predict`: the top classes of image files under a trained model.

The model is given as a run id, an MLflow model URI (`runs:/<run>/model`, `models:/<name>/<version>`), a
local MLflow model folder, or a `.keras` file. Every file is preprocessed exactly as the model's
training run preprocessed its evaluation images, from what that run stored, never guessed:
  * class names and the `preprocessing` block (data.Data.preprocessing: recipe, resize policy, stored
    size, input size, pixel-mean flag) come from the logged model's metadata (the MLmodel file,
    `metadata.alexnet_keras`), else from the run's `data.json`; for a `.keras` file, from the
    `<name>.preprocessing.json` that `save_model` writes beside it (or a `data.json` in its folder);
  * the per-pixel mean image, when the run used one, from the run's `preprocessing/mean_image.npy`
    (`<name>.mean_image.npy` beside a `.keras` file);
  * per-channel normalisation is inside the model (its first layer), so nothing else is needed.
Runs from before the recipe existed (data.json without `preprocessing`) used the simple recipe: files
squashed to the model's input size.

A file is decoded by the same function as in training (data.decode_image) to the stored size, then
`--crops center` takes the centre crop and `--crops ten` the paper's ten views, whose softmax outputs
are averaged. A model trained on images held at a small native size (CIFAR-10's 32 px, resized to the
stored size per batch; `native_size` in the preprocessing) gets each file squashed to that size first
and resized by the same float resize as in training, so a CIFAR test image gives exactly the pixels the
evaluation pipeline gave.
`.keras` files are loaded with `safe_mode=True` (no arbitrary code from lambdas).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .data import DataError

METADATA_KEY = "alexnet_keras"          # key of the MLmodel `metadata` block written by train.py
MEAN_IMAGE_ARTIFACT = "preprocessing/mean_image.npy"
CROPS = ("center", "ten")
_RUN_ID = re.compile(r"[0-9a-f]{32}")


@dataclasses.dataclass
class Predictor:
    model: Any                      # keras.Model: float (B,S,S,3) pixels in 0..255 -> probabilities
    class_names: list[str]
    preprocessing: dict             # data.Data.preprocessing of the training run
    mean_image: np.ndarray | None   # (stored, stored, 3) when the run subtracted a per-pixel mean
    source: str                     # where the model came from

    def views(self, stored_images, crops: str = "center") -> np.ndarray:
        """The model's input for a batch of decoded (stored-size, uint8) images; 10 rows per image for
        "ten"."""
        from .data import model_views

        spec = self.preprocessing
        return model_views(stored_images, image_size=spec["image_size"], stored_size=spec["stored_size"],
                           mean_image=self.mean_image, crops=crops).numpy()

    def probabilities(self, stored_images, crops: str = "center", batch_size: int = 32) -> np.ndarray:
        """(B, classes) probabilities of a batch of decoded images, averaged over the views."""
        x = self.views(stored_images, crops)
        probs = np.asarray(self.model.predict(x, batch_size=batch_size, verbose=0), np.float64)
        return probs.reshape(len(stored_images), -1, probs.shape[-1]).mean(axis=1)

    def predict_files(self, files: Sequence[str], *, crops: str = "center", top: int = 5,
                      batch_size: int = 32) -> list[dict]:
        """One entry per file: {"file", "predictions": [{"rank", "class", "index", "probability"}]} or
        {"file", "error"} for a file that is not a readable image."""
        import tensorflow as tf

        from .data import decode_image

        if crops not in CROPS:
            raise DataError(f"crops must be one of {', '.join(CROPS)}; got {crops!r}.")
        spec = self.preprocessing
        side, policy = spec["stored_size"], spec["resize"]
        if spec.get("native_size"):   # trained on small in-memory images (CIFAR) resized per batch
            side, policy = spec["native_size"], "squash"
        results: list[dict] = [{"file": f, "error": "not a readable image (JPEG, PNG, GIF or BMP)"}
                               for f in files]
        if not files:
            return results
        ds = (tf.data.Dataset.from_tensor_slices((np.arange(len(files), dtype=np.int64),
                                                  np.asarray([str(f) for f in files], str)))
              .map(lambda i, path: (i, decode_image(tf.io.read_file(path), side, policy)),
                   num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
              .ignore_errors()
              .batch(max(1, batch_size // (10 if crops == "ten" else 1))))
        for index, images in ds.as_numpy_iterator():
            probs = self.probabilities(images, crops, batch_size)
            for i, row in zip(index, probs):
                results[i] = {"file": files[i], "predictions": [
                    {"rank": r + 1, "class": self.class_names[c], "index": int(c), "probability": float(row[c])}
                    for r, c in enumerate(top_k(row[None], top)[0])]}
        return results


# ---------------------------------------------------------------------------------------------
# Top-k and the 10-crop evaluation (train.py)
# ---------------------------------------------------------------------------------------------

def top_k(scores, k: int) -> np.ndarray:
    """(N, min(k, classes)) class indices by decreasing score; ties go to the lower class index."""
    scores = np.asarray(scores)
    k = min(int(k), scores.shape[-1])
    return np.argsort(-scores, axis=-1, kind="stable")[:, :k]


def top_k_accuracy(scores, labels, k: int) -> float:
    """Share of rows whose label is among the k highest scores (k capped at the number of classes)."""
    labels = np.asarray(labels).reshape(-1)
    if not len(labels):
        return float("nan")
    return float(np.mean(np.any(top_k(scores, k) == labels[:, None], axis=1)))


def ten_crop_metrics(model, data) -> dict[str, float]:
    """The paper's 10-crop test: softmax averaged over 4 corners + centre and their reflections.

    {} unless `data.test_ten_crop` exists (data.recipe "paper" with ten_crop); else
    test_10crop_accuracy and test_10crop_top5_accuracy over `data.test_labels`.
    """
    if getattr(data, "test_ten_crop", None) is None:
        return {}
    probs = np.asarray(model.predict(data.test_ten_crop, verbose=0), np.float64)
    probs = probs.reshape(-1, 10, probs.shape[-1]).mean(axis=1)
    labels = np.asarray(data.test_labels)
    if len(probs) != len(labels):
        raise RuntimeError(f"10-crop test gave {len(probs)} predictions for {len(labels)} test images")
    return {"test_10crop_accuracy": top_k_accuracy(probs, labels, 1),
            "test_10crop_top5_accuracy": top_k_accuracy(probs, labels, 5)}


def model_metadata(data) -> dict:
    """What predict needs, stored with the logged model (MLmodel `metadata`) by train.py."""
    spec = dict(data.preprocessing)
    if data.mean_image is not None:
        spec["mean_image"] = MEAN_IMAGE_ARTIFACT
    return {METADATA_KEY: {"class_names": list(data.class_names), "preprocessing": spec}}


# ---------------------------------------------------------------------------------------------
# Loading a model with its preprocessing
# ---------------------------------------------------------------------------------------------

def save_model(model, path: str | os.PathLike, class_names: Sequence[str], preprocessing: dict,
               mean_image: np.ndarray | None = None) -> Path:
    """Save `model` as a .keras file with its preprocessing beside it, for `predict --model PATH`."""
    path = Path(path)
    if path.suffix != ".keras":
        raise DataError(f"save the model as a .keras file; got {str(path)!r}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    spec = dict(preprocessing)
    if mean_image is not None:
        np.save(_sidecar(path, "mean_image.npy"), np.asarray(mean_image, np.float32))
        spec["mean_image"] = _sidecar(path, "mean_image.npy").name
    _sidecar(path, "preprocessing.json").write_text(json.dumps(
        {"class_names": list(class_names), "preprocessing": spec}, indent=2))
    return path


def _sidecar(path: Path, suffix: str) -> Path:
    return path.with_name(f"{path.stem}.{suffix}")


def load_predictor(ref: str, tracking_uri: str | None = None) -> Predictor:
    """A Predictor from a run id, an MLflow model URI or folder, or a .keras file (see module doc)."""
    path = Path(ref).expanduser()
    if path.exists():
        if path.is_dir():
            if (path / "MLmodel").is_file():
                return _from_mlflow_dir(path, ref)
            raise DataError(f"{ref!r} is a folder without an MLmodel file; pass a .keras file, an MLflow "
                            "model folder, a run id or a runs:/ URI.")
        if path.suffix == ".keras":
            return _from_keras_file(path, ref)
        raise DataError(f"{ref!r} is not a .keras file; pass a .keras file, an MLflow model folder, a run id "
                        "or a runs:/<run id>/model URI.")
    if _RUN_ID.fullmatch(ref):
        uri = f"runs:/{ref}/model"
    elif "://" in ref or ref.startswith(("runs:/", "models:/")):
        uri = ref
    else:
        raise DataError(f"--model {ref!r} is neither an existing .keras file or MLflow model folder nor a run "
                        "id (32 hex digits) or an MLflow model URI (runs:/<run id>/model, models:/NAME/VERSION).")
    import mlflow

    from . import tracking

    tracking.configure(tracking_uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri,
                                                         dst_path=tempfile.mkdtemp(prefix="alexnet-keras-")))
    except Exception as err:  # noqa: BLE001 - unknown run, no such artifact, store unreachable
        raise DataError(f"could not fetch the model {uri!r} from {mlflow.get_tracking_uri()!r}: {err}. "
                        "Check the run id (and --tracking-uri), or pass a .keras file.") from None
    return _from_mlflow_dir(local, ref)


def _load_keras(path: Path):
    import keras

    from . import model as _model  # noqa: F401 - registers AlexNet and its layers for deserialization

    try:
        return keras.saving.load_model(path, safe_mode=True)
    except ValueError as err:
        if "safe_mode" not in str(err) and "Lambda" not in str(err):
            raise
        # A Lambda layer (or another unsafe object) would run arbitrary Python code on loading.
        raise DataError(f"refused to load {str(path)!r}: it holds a Lambda layer or other code that "
                        "would run on loading, and models are loaded with safe_mode=True. AlexNet models "
                        "saved by this package never contain one: use a model you trained, or one from a "
                        "source you trust re-saved without Lambda layers.") from None


def _from_mlflow_dir(folder: Path, ref: str) -> Predictor:
    from mlflow.models import Model

    mlmodel = Model.load(str(folder / "MLmodel"))
    keras_files = sorted(folder.rglob("*.keras"))
    if not keras_files:
        raise DataError(f"the MLflow model {ref!r} holds no .keras file (was it logged by alexnet-keras?).")
    meta = (mlmodel.metadata or {}).get(METADATA_KEY)
    run_id = mlmodel.run_id
    if meta is None and run_id:   # logged before models carried their metadata: the run's data.json
        meta = _run_json(run_id, "data.json")
    if meta is None:
        raise DataError(f"the MLflow model {ref!r} carries no alexnet-keras preprocessing metadata and no "
                        "training run with a data.json; predict cannot know how its inputs were prepared.")
    spec = _spec(meta, ref)
    mean_image = None
    if spec["pixel_mean"]:
        if not run_id:
            raise DataError(f"the model {ref!r} was trained with a per-pixel mean image, but its run is unknown.")
        mean_image = _run_array(run_id, spec.get("mean_image") or MEAN_IMAGE_ARTIFACT)
    return _checked(Predictor(_load_keras(keras_files[0]), list(meta["class_names"]), spec, mean_image, ref))


def _from_keras_file(path: Path, ref: str) -> Predictor:
    candidates = [_sidecar(path, "preprocessing.json"), path.parent / "data.json"]
    meta = None
    for candidate in candidates:
        if candidate.is_file():
            meta = json.loads(candidate.read_text())
            break
    if meta is None and (path.parent.parent / "MLmodel").is_file():   # inside an MLflow model folder
        return _from_mlflow_dir(path.parent.parent, ref)
    if meta is None:
        raise DataError(f"no preprocessing found for {str(path)!r}: expected "
                        f"{candidates[0].name} (written by alexnet_keras.predict.save_model) or data.json "
                        "(the training run's artifact) beside it. Or pass the run id / runs:/ URI instead.")
    spec = _spec(meta, ref)
    mean_image = None
    if spec["pixel_mean"]:
        mean_file = path.parent / Path(spec.get("mean_image") or _sidecar(path, "mean_image.npy").name).name
        if not mean_file.is_file():
            raise DataError(f"{str(path)!r} was trained with a per-pixel mean image; {str(mean_file)!r} is missing.")
        mean_image = np.load(mean_file)
    return _checked(Predictor(_load_keras(path), list(meta["class_names"]), spec, mean_image, ref))


def _spec(meta: dict, ref: str) -> dict:
    if "class_names" not in meta:
        raise DataError(f"the preprocessing metadata of {ref!r} has no class_names.")
    spec = meta.get("preprocessing")
    if not spec:
        # data.json of a run from before the recipes: always the simple recipe (squash to the input size).
        size = int(meta["image_size"])
        spec = {"recipe": "simple", "resize": "squash", "stored_size": size, "image_size": size,
                "pixel_mean": False}
    return dict(spec)


def _checked(predictor: Predictor) -> Predictor:
    shape = predictor.model.input_shape
    size, classes = predictor.preprocessing["image_size"], predictor.model.output_shape[-1]
    if tuple(shape[1:3]) != (size, size):
        raise DataError(f"{predictor.source!r}: the model takes {shape[1]}x{shape[2]} inputs but its "
                        f"preprocessing says {size}x{size}.")
    if classes != len(predictor.class_names):
        raise DataError(f"{predictor.source!r}: the model has {classes} outputs but "
                        f"{len(predictor.class_names)} class names.")
    return predictor


def _run_json(run_id: str, artifact: str) -> dict | None:
    import mlflow

    try:
        return json.loads(Path(mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact, dst_path=tempfile.mkdtemp(prefix="alexnet-keras-"))).read_text())
    except Exception:  # noqa: BLE001 - no such artifact (or run): the caller reports it
        return None


def _run_array(run_id: str, artifact: str) -> np.ndarray:
    import mlflow

    try:
        return np.load(mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact, dst_path=tempfile.mkdtemp(prefix="alexnet-keras-")))
    except Exception as err:  # noqa: BLE001
        raise DataError(f"could not fetch {artifact!r} of run {run_id}: {err}") from None


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Files as given; folders as every visible file under them, sorted."""
    files: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            for dirpath, dirnames, filenames in os.walk(item, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith("."))
        else:
            files.append(item)
    return files


def format_text(results: list[dict], crops: str) -> str:
    lines = []
    for result in results:
        lines.append(f"{result['file']}  ({'10 crops' if crops == 'ten' else 'centre crop'})")
        if "error" in result:
            lines.append(f"  error: {result['error']}")
            continue
        width = max(len(p["class"]) for p in result["predictions"])
        for p in result["predictions"]:
            lines.append(f"  {p['rank']}. {p['class']:<{width}}  {p['probability']:.4f}")
    return "\n".join(lines)


def run_cli(model: str, inputs: Sequence[str], *, crops: str = "center", top: int = 5, as_json: bool = False,
            batch_size: int = 32, tracking_uri: str | None = None) -> int:
    files = expand_inputs(inputs)
    if not files:
        raise DataError("no image files given (pass files or folders after --model).")
    predictor = load_predictor(model, tracking_uri)
    results = predictor.predict_files(files, crops=crops, top=top, batch_size=batch_size)
    if as_json:
        print(json.dumps({"model": model, "crops": crops, "preprocessing": predictor.preprocessing,
                          "results": results}, indent=2))
    else:
        print(format_text(results, crops))
    return 1 if any("error" in r for r in results) else 0
