"""A trained model with its preprocessing: raw images in, ranked classes out, as the training run prepared its
evaluation images (`Predictor`); a `.keras` file with its preprocessing sidecars (`save_model`,
`load_keras_predictor`, with safe_mode). The MLflow model is serving.py's."""

import dataclasses
import json
import os
import stat
import zipfile
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import pydantic
from pydantic import Field

from ..config import Options, validated
from ..data import RESIZE_POLICIES, DataError

METADATA_KEY = "alexnet_keras"       # key of the MLmodel `metadata` block of a logged model
CROPS = ("center", "ten")
NOT_AN_IMAGE = "not a readable image (JPEG, PNG, GIF or BMP)"
# Largest side of a pixel array accepted by predict_images (a 16k x 16k RGB image is 768 MB).
MAX_ARRAY_SIDE = 16384


def top_k(scores, k: int) -> np.ndarray:
    """(N, min(k, classes)) class indices by decreasing score; ties go to the lower class index (a copy: a
    slice would keep the whole (N, classes) ordering alive)."""
    scores = np.asarray(scores)
    k = min(int(k), scores.shape[-1])
    return np.argsort(-scores, axis=-1, kind="stable")[:, :k].copy()


def top_k_accuracy(scores, labels, k: int) -> float:
    """Share of rows whose label is among the k highest scores (k capped at the number of classes)."""
    labels = np.asarray(labels).reshape(-1)
    if not len(labels):
        return float("nan")
    return float(np.mean(np.any(top_k(scores, k) == labels[:, None], axis=1)))


def ten_crop_metrics(model, data) -> dict[str, float]:
    """The paper's 10-crop test (softmax averaged over the ten views) when `data` has it ({} if not):
    test_10crop_accuracy and test_10crop_top5_accuracy over `data.test_labels`. Batch by batch, keeping
    the top 5 classes of each image: the whole (views, classes) matrix of ImageNet's 50,000 test images
    would be 4 GB."""
    if data.test_ten_crop is None:
        return {}
    ranked = []
    for views in data.test_ten_crop:
        probs = np.asarray(model.predict_on_batch(np.asarray(views)), np.float64)
        ranked.append(top_k(probs.reshape(len(probs) // 10, 10, -1).mean(axis=1), 5))
    hits = np.concatenate(ranked) == np.asarray(data.test_labels).reshape(-1, 1)
    return {"test_10crop_accuracy": float(hits[:, 0].mean()),
            "test_10crop_top5_accuracy": float(hits.any(axis=1).mean())}


@dataclasses.dataclass(frozen=True)
class ModelMetadata:
    """Class names, the training run's `preprocessing` and its mean image when pixel_mean is set."""

    class_names: list[str]
    preprocessing: dict
    mean_image: np.ndarray | None = None   # (stored, stored, 3) float32

    def to_dict(self, mean_image_file: str | None = None) -> dict:
        """The JSON form (the sidecar, the MLmodel metadata); `mean_image_file`: where the mean image is."""
        has_file = self.mean_image is not None and mean_image_file
        return {"class_names": list(self.class_names),
                "preprocessing": {**self.preprocessing, **({"mean_image": mean_image_file} if has_file else {})}}


def model_metadata(data) -> ModelMetadata:
    """What a model trained on `data` (data.Data) needs to classify raw images."""
    return ModelMetadata(list(data.class_names), dict(data.preprocessing), data.mean_image)


class Preprocessing(Options):
    """`data.Data.preprocessing` as a model carries it (MLflow metadata, the .keras file's sidecar)."""

    recipe: Literal["simple", "paper"]
    resize: Literal[RESIZE_POLICIES]
    stored_size: int = Field(ge=1, le=MAX_ARRAY_SIDE)
    image_size: int = Field(ge=1, le=MAX_ARRAY_SIDE)
    pixel_mean: bool
    native_size: int | None = Field(None, ge=1, le=MAX_ARRAY_SIDE)
    mean_image: str | None = None   # where the mean image is stored, beside the model

    @pydantic.model_validator(mode="after")
    def crop_fits(self):
        if self.image_size > self.stored_size:
            raise ValueError(f"image_size {self.image_size} is larger than stored_size {self.stored_size}")
        return self


class Sidecar(Options):
    class_names: list[str] = Field(min_length=1)
    preprocessing: Preprocessing

    @pydantic.field_validator("class_names")
    @classmethod
    def distinct(cls, names):
        if len(set(names)) != len(names):
            raise ValueError("class names must be distinct")
        return names


def check_options(crops: str = "center", top: int = 5, batch_size: int = 32, top_name: str = "top") -> None:
    """The prediction options, or a DataError saying which one is wrong (`top_name`: the caller's name for `top`)."""
    if crops not in CROPS:
        raise DataError(f"crops must be one of {', '.join(CROPS)}; got {crops!r}.")
    for name, value in ((top_name, top), ("batch size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise DataError(f"{name} must be a whole number of at least 1; got {value!r}.")


@dataclasses.dataclass
class Predictor:
    model: Any                      # keras.Model: float (B,S,S,3) pixels in 0..255 -> probabilities
    class_names: list[str]
    preprocessing: dict             # data.Data.preprocessing of the training run
    mean_image: np.ndarray | None   # (stored, stored, 3) when the run subtracted a per-pixel mean

    def predict_files(self, files: Sequence[str], *, crops: str = "center", top: int = 5,
                      batch_size: int = 32) -> list[dict]:
        """One entry per file: {"file", "predictions": [{"rank", "class", "index", "probability"}]} or
        {"file", "error"}. Only regular files are opened (a FIFO would block forever)."""
        import tensorflow as tf

        regular = [i for i, f in enumerate(files) if _is_regular_file(f)]
        ranked = self._rank(_indexed(regular, [str(files[i]) for i in regular])
                            .map(lambda i, path: (i, tf.io.read_file(path))), len(files), crops, top, batch_size)
        readable = set(regular)
        return [{"file": f, "predictions": r} if r is not None else
                {"file": f, "error": NOT_AN_IMAGE if i in readable else "not a regular file"}
                for i, (f, r) in enumerate(zip(files, ranked))]

    def predict_images(self, images: Sequence, *, crops: str = "center", top: int = 5,
                       batch_size: int = 32) -> list[dict]:
        """One entry per image, {"predictions": [...]} or {"error": ...}. An image is the encoded bytes
        of an image file, or an HxWx3 array of integers in 0..255 (the decoded pixels, RGB)."""
        contents, errors = [], {}
        for i, image in enumerate(images):
            try:
                contents.append((i, _encoded(image)))
            except DataError as err:
                errors[i] = str(err)
        ranked = self._rank(_indexed([i for i, _ in contents], [c for _, c in contents]), len(images), crops,
                            top, batch_size)
        return [{"predictions": r} if r is not None else {"error": errors.get(i, NOT_AN_IMAGE)}
                for i, r in enumerate(ranked)]

    def _rank(self, indexed_contents, count: int, crops: str, top: int, batch_size: int) -> list:
        """The ranked classes of each (index, encoded bytes) pair, decoded as in training; None where the
        bytes are not an image."""
        import tensorflow as tf

        from ..data import decode_image, model_views

        spec = self.preprocessing
        side, policy = spec["stored_size"], spec["resize"]
        if spec.get("native_size"):   # trained on small in-memory images (CIFAR) resized per batch
            side, policy = spec["native_size"], "squash"
        ranked: list = [None] * count
        ds = (indexed_contents
              .map(lambda i, contents: (i, decode_image(contents, side, policy)),
                   num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
              .ignore_errors()
              .batch(max(1, batch_size // (10 if crops == "ten" else 1))))
        for index, images in ds.as_numpy_iterator():   # softmax averaged over the views of each image
            views = model_views(images, image_size=spec["image_size"], stored_size=spec["stored_size"],
                                mean_image=self.mean_image, crops=crops).numpy()
            probs = np.asarray(self.model.predict_on_batch(views), np.float64)   # predict(): ~0.2 s of set-up a call
            probs = probs.reshape(len(images), -1, probs.shape[-1]).mean(axis=1)
            for i, row in zip(index, probs):
                ranked[i] = [{"rank": r + 1, "class": self.class_names[c], "index": int(c),
                              "probability": float(row[c])} for r, c in enumerate(top_k(row[None], top)[0])]
        return ranked


def _indexed(indices: list[int], strings: list) -> Any:
    """A tf.data.Dataset of (index, string) pairs (paths or encoded bytes)."""
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices((tf.constant(indices, tf.int64, shape=[len(indices)]),
                                               tf.constant(strings, tf.string, shape=[len(strings)])))


def _is_regular_file(path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def _encoded(image) -> bytes:
    """An image as encoded bytes: bytes as given; a pixel array checked and encoded as PNG (lossless)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        if not len(image):
            raise DataError("empty image (0 bytes)")
        return bytes(image)
    if isinstance(image, str):
        raise DataError("a string, not an image: pass the file's bytes (base64 only in JSON requests)")
    try:
        pixels = np.asarray(image)
    except (ValueError, TypeError):
        raise DataError("not an image: neither bytes nor an HxWx3 array (rows of unequal length?)") from None
    if pixels.ndim != 3 or pixels.shape[-1] != 3 or 0 in pixels.shape:
        raise DataError(f"pixel arrays must have shape (height, width, 3), RGB; got {pixels.shape}")
    if max(pixels.shape[:2]) > MAX_ARRAY_SIDE:
        raise DataError(f"pixel array of {pixels.shape[0]}x{pixels.shape[1]} is larger than {MAX_ARRAY_SIDE} on a side")
    if pixels.dtype != np.uint8:
        numeric = np.issubdtype(pixels.dtype, np.integer) or np.issubdtype(pixels.dtype, np.floating)
        if not (numeric and np.all(np.isfinite(pixels)) and np.all(pixels == np.round(pixels))
                and pixels.min() >= 0 and pixels.max() <= 255):
            raise DataError(f"pixel values must be integers in 0..255; got {pixels.dtype} values")
        pixels = pixels.astype(np.uint8)
    import tensorflow as tf

    return tf.io.encode_png(pixels).numpy()


def sidecar(path: Path, suffix: str) -> Path:
    """`net.keras` -> `net.<suffix>`: the files save_model writes beside a model."""
    return path.with_name(f"{path.stem}.{suffix}")


def save_model(model, path: str | os.PathLike, class_names: Sequence[str], preprocessing: dict,
               mean_image: np.ndarray | None = None) -> Path:
    """Save `model` as a .keras file with its preprocessing beside it, for `predict --model PATH`."""
    path = Path(path)
    if path.suffix != ".keras":
        raise DataError(f"save the model as a .keras file; got {str(path)!r}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    metadata = ModelMetadata(list(class_names), dict(preprocessing), mean_image)
    if mean_image is not None:
        np.save(sidecar(path, "mean_image.npy"), np.asarray(mean_image, np.float32))
    sidecar(path, "preprocessing.json").write_text(
        json.dumps(metadata.to_dict(sidecar(path, "mean_image.npy").name), indent=2), encoding="utf-8")
    return path


def load_keras_predictor(path: Path, source: str | None = None) -> Predictor:
    """A Predictor from a .keras file and the `<name>.preprocessing.json` save_model wrote beside it."""
    path = Path(path)
    source = source or str(path)
    found = sidecar(path, "preprocessing.json")
    if not found.is_file():
        raise DataError(f"no preprocessing found for {str(path)!r}: expected {found.name} (written by "
                        "alexnet_keras.model.inference.save_model) beside it. Or pass the run id / runs:/ URI "
                        "instead.")
    try:
        meta = json.loads(found.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"cannot read {str(found)!r} as JSON ({err}); re-save the model or use its run id.") from None
    if not isinstance(meta, dict):
        raise DataError(f"{str(found)!r} holds a JSON {type(meta).__name__}, not the object save_model writes.")
    meta = validated(Sidecar, meta, str(found))
    spec = meta.preprocessing.model_dump(exclude_none=True)
    mean_image = None
    if spec["pixel_mean"]:
        mean_file = sidecar(path, "mean_image.npy")
        try:
            mean_image = np.load(mean_file, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise DataError(f"cannot read the mean image {str(mean_file)!r} ({err}); re-save the model or use its "
                            "run id.") from None
        side = spec["stored_size"]
        if mean_image.shape != (side, side, 3) or not np.issubdtype(mean_image.dtype, np.number) \
                or not np.all(np.isfinite(mean_image)):
            raise DataError(f"the mean image {str(mean_file)!r} has shape {mean_image.shape} and dtype "
                            f"{mean_image.dtype}; the preprocessing needs finite numbers of shape ({side}, {side}, 3).")
        mean_image = mean_image.astype(np.float32)
    import keras

    from .alexnet import AlexNet  # noqa: F401 - registers AlexNet and its layers for deserialization

    if not _is_regular_file(path) or not zipfile.is_zipfile(path):
        raise DataError(f"{str(path)!r} is not a .keras model file (a .keras file is a zip archive written by "
                        "model.save); was it truncated or renamed? Pass a model trained with alexnet-keras.")
    try:
        model = keras.saving.load_model(path, safe_mode=True)
    except Exception as err:  # noqa: BLE001 - Keras raises TypeError/ValueError/KeyError/OSError here
        reason = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        raise DataError(f"refused to load {str(path)!r}: {reason}. Models are loaded with safe_mode=True: no Lambda "
                        "layers and nothing outside Keras and alexnet-keras. Use a model you trained, or one from a "
                        "source you trust re-saved without such code.") from None
    size, names = spec["image_size"], list(meta.class_names)
    if tuple(model.input_shape[1:3]) != (size, size) or model.output_shape[-1] != len(names):
        raise DataError(f"{source!r}: the model takes {model.input_shape[1]}x{model.input_shape[2]} inputs and has "
                        f"{model.output_shape[-1]} outputs, but its preprocessing says {size}x{size} and "
                        f"{len(names)} class names.")
    return Predictor(model, names, spec, mean_image)
