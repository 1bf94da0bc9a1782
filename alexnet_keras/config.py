"""The one home of every default: a validated tree of frozen dataclasses.

`Config` = `ModelConfig` (what the network is) + `DataConfig` (what it sees) + `TrainConfig` (how it
learns) + tracking fields. Every leaf field has a unique name across the tree, so it is at once
  * a CLI flag (`--lrn false`, `--batch-size 128`),
  * an MLproject parameter and an MLflow param (`lrn`, `batch_size`),
  * a key in an experiment YAML (`model: {lrn: false}`; flat `lrn: false` is accepted too).
Values are checked when an object is built, so a bad value fails before any data is read or any
MLflow run is created, with a message that names the field, the allowed values and the value given.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

VARIANTS = ("paper", "cifar")
POOLS = ("overlapping", "non_overlapping")
ACTIVATIONS = ("relu", "tanh", "sigmoid")
INITS = ("paper", "keras")
DATASETS = ("cifar10", "folder", "synthetic")
# Input recipes (alexnet_keras/data.py): "simple" squashes to the input size; "paper" is Krizhevsky et al.'s.
RECIPES = ("simple", "paper")
SCHEDULES = ("plateau", "cosine", "constant")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
JIT = ("auto", "true", "false")
# Multi-device data parallelism engines (alexnet_keras/distribute.py): none; TF mirrored / multi_worker; JAX.
DISTRIBUTE = ("none", "mirrored", "multi_worker", "data_parallel")

# Native input side of each variant, used when `image_size` is left unset.
NATIVE_IMAGE_SIZE = {"paper": 227, "cifar": 32}


class ConfigError(ValueError):
    """A configuration value is wrong. The message says which field, what is allowed, and what came."""


def _choice(section: str, name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(
            f"{section}.{name} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}. "
            f"Fix it with --{name.replace('_', '-')} {allowed[0]} (or `{name}: {allowed[0]}` in YAML)."
        )


def _range(section: str, name: str, value: float, lo: float, hi: float, *, hi_open: bool = False,
           lo_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"{section}.{name} must be a number; got {value!r}.")
    bad_lo = value <= lo if lo_open else value < lo
    bad_hi = value >= hi if hi_open else value > hi
    if bad_lo or bad_hi:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ConfigError(f"{section}.{name} must be in {interval}; got {value!r}.")


@dataclass(frozen=True)
class ModelConfig:
    """AlexNet's design choices, each an independent toggle. Defaults are the 2012 paper's."""

    variant: str = "paper"          # "paper": 227x227 ImageNet net; "cifar": same topology for 32x32
    image_size: int | None = None   # input side in pixels; None = the variant's native size
    width: float = 1.0              # multiplies every conv's filters and the hidden FC units
    groups: int = 1                 # 2 = the paper's two-GPU split of conv2, conv4, conv5
    lrn: bool = True                # LocalResponseNormalization after the ReLU of conv1 and conv2
    lrn_size: int = 5               # n, channels in the window
    lrn_alpha: float = 1e-4
    lrn_beta: float = 0.75
    lrn_k: float = 2.0
    batchnorm: bool = False         # BatchNormalization between each conv and its activation
    dropout: float = 0.5            # before FC6 and FC7; 0 removes the layers
    pool: str = "overlapping"       # "overlapping" 3x3/2 (paper) or "non_overlapping" 2x2/2
    activation: str = "relu"
    init: str = "paper"             # "paper": N(0, 0.01), bias 1 in conv2/4/5 + hidden FC; "keras"
    weight_decay: float = 5e-4      # L2 on kernels, as the paper's update rule (see model.py)

    def __post_init__(self) -> None:
        s = "model"
        _choice(s, "variant", self.variant, VARIANTS)
        _choice(s, "pool", self.pool, POOLS)
        _choice(s, "activation", self.activation, ACTIVATIONS)
        _choice(s, "init", self.init, INITS)
        _range(s, "dropout", self.dropout, 0.0, 1.0, hi_open=True)
        _range(s, "width", self.width, 0.0, 16.0, lo_open=True)
        _range(s, "weight_decay", self.weight_decay, 0.0, 1.0)
        _range(s, "lrn_alpha", self.lrn_alpha, 0.0, math.inf)
        _range(s, "lrn_beta", self.lrn_beta, 0.0, math.inf)
        _range(s, "lrn_k", self.lrn_k, 0.0, math.inf)
        if not isinstance(self.lrn_size, int) or self.lrn_size < 1 or self.lrn_size % 2 == 0:
            raise ConfigError(f"model.lrn_size must be a positive odd integer (the paper uses 5); "
                              f"got {self.lrn_size!r}.")
        if self.groups not in (1, 2):
            raise ConfigError(f"model.groups must be one of 1, 2; got {self.groups!r}.")
        if self.image_size is not None:
            # Smallest sides whose pool5 map is not empty (model.py checks every layer's size).
            minimum = {"paper": 67 if self.pool == "overlapping" else 39}.get(self.variant, 8)
            if not isinstance(self.image_size, int) or self.image_size < minimum:
                raise ConfigError(f"model.image_size must be an integer >= {minimum} for variant "
                                  f"{self.variant!r} (or unset); got {self.image_size!r}.")

    @property
    def input_size(self) -> int:
        return self.image_size or NATIVE_IMAGE_SIZE[self.variant]


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are split and augmented."""

    dataset: str = "cifar10"
    # A folder (train/<class>/*, test/<class>/* or cifar-10-batches-py/), a .tar.gz of one, or None:
    # then $ALEXNET_KERAS_DATA_DIR, then keras.datasets (needs the network).
    data_dir: str | None = None
    val_fraction: float = 0.1       # carved from the training set, stratified, seeded by split_seed
    split_seed: int = 0             # fixed apart from `seed`, so every run of a study sees one split
    augment: bool = True            # random crop (pad 4 / scale) + horizontal flip, training only
    train_limit: int | None = None  # keep a stratified subset of this many training images (smoke runs)
    synthetic_samples: int = 512    # size of the `synthetic` dataset (train+val; test is a quarter)
    synthetic_classes: int = 10
    # --- The paper's ImageNet recipe (data.py, "Recipes"). `augment` stays the master switch of training
    # augmentation (false = none, in either recipe); random_crop / random_flip / pca_color pick its pieces.
    recipe: str = "simple"          # "simple": squash to the input size; "paper": shorter side to
                                    # stored_size + centre crop, mean subtraction, 10-crop test
    stored_size: int = 256          # paper recipe: side of the stored square images crops are cut from
    random_crop: bool = True        # simple: shift by up to 1/8 of the side; paper: random input-size crop
    random_flip: bool = True        # random horizontal reflection (both recipes)
    pca_color: bool = True          # paper recipe only: "fancy PCA" colour shift per image
    pca_std: float = 0.1            # std of the fancy-PCA coefficients alpha (paper: 0.1)
    pixel_mean: bool = False        # paper recipe: subtract the per-pixel mean image in the pipeline;
                                    # false: per-channel mean/std inside the model (self-contained)
    ten_crop: bool = True           # paper recipe: also report the 10-crop test metrics
    max_memory_mb: int = 4096       # image folders whose decoded images need more are streamed from files
    test_limit: int | None = field(default=None, metadata={"digest": "omit_default"})
                                    # score a stratified subset of this many test images (CPU-sized runs)

    def __post_init__(self) -> None:
        _choice("data", "dataset", self.dataset, DATASETS)
        _range("data", "val_fraction", self.val_fraction, 0.0, 0.5, lo_open=True)
        if self.dataset == "folder" and not self.data_dir:
            raise ConfigError("data.dataset 'folder' needs a folder: pass --data-dir PATH "
                              "(class sub-folders, or train/ and test/ each with class sub-folders).")
        if self.train_limit is not None and self.train_limit < 2:
            raise ConfigError(f"data.train_limit must be at least 2 (or unset); got {self.train_limit!r}.")
        if self.synthetic_samples < 16:
            raise ConfigError(f"data.synthetic_samples must be at least 16; got {self.synthetic_samples!r}.")
        if not 2 <= self.synthetic_classes <= 1000:
            raise ConfigError(f"data.synthetic_classes must be in [2, 1000]; got {self.synthetic_classes!r}.")
        _choice("data", "recipe", self.recipe, RECIPES)
        for name, lowest in (("stored_size", 8), ("max_memory_mb", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise ConfigError(f"data.{name} must be an integer >= {lowest}; got {value!r}.")
        _range("data", "pca_std", self.pca_std, 0.0, 10.0)
        if self.test_limit is not None and self.test_limit < 2:
            raise ConfigError(f"data.test_limit must be at least 2 (or unset); got {self.test_limit!r}.")


@dataclass(frozen=True)
class TrainConfig:
    """How the network learns. Defaults follow the paper: SGD, momentum 0.9, lr 0.01, /10 on plateau."""

    epochs: int = 30
    batch_size: int = 128
    learning_rate: float = 0.01
    momentum: float = 0.9
    schedule: str = "plateau"       # "plateau": lr/10 when val loss stalls (paper); "cosine"; "constant"
    plateau_patience: int = 3
    seed: int = 0
    precision: str = "float32"
    jit_compile: str = "auto"       # XLA: "auto" lets Keras decide per backend; "true"; "false"
    distribute: str = "none"        # data parallelism (distribute.py); batch_size is the global batch
    # Bit-identical reruns: seeds plus the backends' deterministic kernels (train.py, docs/reliability.md).
    deterministic: bool = field(default=False, metadata={"digest": "omit_default"})

    def __post_init__(self) -> None:
        s = "train"
        _choice(s, "schedule", self.schedule, SCHEDULES)
        _choice(s, "precision", self.precision, PRECISIONS)
        _choice(s, "jit_compile", self.jit_compile, JIT)
        _choice(s, "distribute", self.distribute, DISTRIBUTE)
        for name in ("epochs", "batch_size", "plateau_patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"train.{name} must be a positive integer; got {value!r}.")
        _range(s, "learning_rate", self.learning_rate, 0.0, 10.0, lo_open=True)
        _range(s, "momentum", self.momentum, 0.0, 1.0, hi_open=True)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    experiment: str = "alexnet-keras"   # MLflow experiment name
    run_name: str | None = None
    # An interrupted run (killed, or RUNNING from a dead process) with the same config and data is
    # continued from its last completed epoch, in the same MLflow run (train.py, "Resuming").
    resume: bool = True
    checkpoint_dir: str = "checkpoints"  # per-run training checkpoints, CHECKPOINT_DIR/<run id>/

    # --- flat view: one name per leaf -------------------------------------------------------
    def flat(self) -> dict[str, Any]:
        """Every leaf as {name: value}: the MLflow params and the CLI flags."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                out.update(dataclasses.asdict(value))
            else:
                out[f.name] = value
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def outcome_values(self) -> dict[str, Any]:
        """The leaves that change a run's outcome, as {name: value}: what digest() hashes.

        Tracking fields are left out; so is a field marked "omit_default" while it holds its default:
        such fields came after runs were logged, and at their default they change nothing, so adding
        one keeps the digests (and the resumability) of older runs, studies and sweeps."""
        leaves = leaf_fields()
        return {k: v for k, v in self.flat().items()
                if leaves[k][0] is not None   # experiment, run_name, resume, checkpoint_dir
                and not (leaves[k][1].metadata.get("digest") == "omit_default" and v == leaves[k][1].default)}

    def digest(self) -> str:
        """A stable hash of everything that changes a run's outcome (used to skip finished runs and to
        find the run to resume)."""
        return hashlib.sha256(json.dumps(self.outcome_values(), sort_keys=True).encode()).hexdigest()[:16]

    def override(self, values: Mapping[str, Any], *, source: str = "overrides") -> "Config":
        """A copy with `values` applied; keys are leaf names or `section.name`, values typed or strings."""
        return from_dict(values, base=self, source=source)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
TOP_LEVEL = ("experiment", "run_name", "resume", "checkpoint_dir")


def leaf_fields() -> dict[str, tuple[str | None, dataclasses.Field]]:
    """{leaf name: (section or None, field)} for every leaf of `Config`."""
    out: dict[str, tuple[str | None, dataclasses.Field]] = {}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            assert f.name not in out, f"duplicate leaf name {f.name}"  # names must stay unique
            out[f.name] = (section, f)
    for f in fields(Config):
        if f.name in TOP_LEVEL:
            out[f.name] = (None, f)
    return out


_TRUE = {"true", "1", "yes", "on", "t", "y"}
_FALSE = {"false", "0", "no", "off", "f", "n"}


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def parse_value(name: str, raw: Any, annotation: Any) -> Any:
    """Turn `raw` (a string from the CLI/MLproject, or a YAML value) into the field's type."""
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0]
    if raw is None or (optional and isinstance(raw, str) and raw.strip().lower() in ("", "none", "null")):
        if optional:
            return None
        raise ConfigError(f"{name} needs a value.")
    try:
        if annotation is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError
        if annotation is int:
            if isinstance(raw, bool):
                raise ValueError
            if isinstance(raw, float):
                if not raw.is_integer():
                    raise ValueError
                return int(raw)
            return int(str(raw).strip())
        if annotation is float:
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if isinstance(raw, bool):  # YAML `jit_compile: true` for a string-valued choice
            return "true" if raw else "false"
        return str(raw)
    except ValueError:
        kind = {bool: "true or false", int: "an integer", float: "a number"}.get(annotation, "a string")
        raise ConfigError(f"{name} must be {kind}; got {raw!r}.") from None


def from_dict(values: Mapping[str, Any], *, base: Config | None = None, source: str = "config") -> Config:
    """Build a Config from nested ({model: {lrn: false}}) and/or flat ({lrn: "false"}) keys."""
    base = base or Config()
    leaves = leaf_fields()
    updates: dict[str | None, dict[str, Any]] = {None: {}, **{s: {} for s in SECTIONS}}

    def put(key: str, raw: Any, expected_section: str | None = None) -> None:
        if "." in key:
            expected_section, key = key.split(".", 1)
        if key not in leaves or (expected_section and leaves[key][0] != expected_section):
            where = f"{expected_section}." if expected_section else ""
            raise ConfigError(_unknown_key_message(f"{where}{key}", source))
        section, f = leaves[key]
        cls = SECTIONS[section] if section else Config
        full = f"{section}.{key}" if section else key
        updates[section][key] = parse_value(full, raw, _field_types(cls)[key])

    for key, raw in values.items():
        if key in SECTIONS and isinstance(raw, Mapping):
            for sub_key, sub_raw in raw.items():
                put(str(sub_key), sub_raw, key)
        elif key in SECTIONS:
            raise ConfigError(f"{source}: '{key}' must be a mapping of {key} options; got {raw!r}.")
        else:
            put(str(key), raw)

    sections = {s: replace(getattr(base, s), **updates[s]) for s in SECTIONS}
    return replace(base, **sections, **updates[None])


def _unknown_key_message(key: str, source: str) -> str:
    import difflib

    names = sorted(leaf_fields())
    close = difflib.get_close_matches(key.split(".")[-1], names, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return f"{source}: unknown option {key!r}.{hint} Known options: {', '.join(names)}."


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read an experiment YAML file into a mapping, with clear errors for missing or malformed files."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist. Pass the path of a YAML file, "
                          f"e.g. experiments/cifar10.yaml.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of options; got {type(data).__name__}.")
    return data


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file at `path` (if any), then `overrides` (CLI flags)."""
    config = Config()
    if path:
        config = from_dict(load_yaml(path), base=config, source=str(path))
    if overrides:
        config = from_dict(overrides, base=config, source="command line")
    return config
