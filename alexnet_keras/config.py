"""The one home of every default: a validated tree of frozen dataclasses.

`Config` = `ModelConfig` (what the network is) + `DataConfig` (what it sees) + `TrainConfig` (how it
learns) + tracking fields. Every leaf field has a unique name across the tree, so it is at once
  * a CLI flag (`--lrn false`, `--batch-size 128`),
  * an MLproject parameter and an MLflow param (`lrn`, `batch_size`),
  * a key in an experiment YAML (`model: {lrn: false}`; flat `lrn: false` is accepted too).
Values are checked when an object is built, so a bad value fails before any data is read or any
MLflow run is created, with a message that names the field, the allowed values and the value given.
Every numeric leaf has a range. A config built from user-given values (`from_dict`: flags, YAML files,
MLproject parameters, study variants, sweep trials) is also checked as a whole against this machine's
memory (`check_memory`), so a size that would exhaust it is refused before anything is allocated.

Also here: the network's geometry as arithmetic on a ModelConfig (filters, feature-map sides, parameter
and activation counts; model.py builds its layers from it), and `load_yaml`, the one reader of every
YAML file the package takes (experiments, studies, sweeps): bounded in size and alias expansion, UTF-8.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping, TypeVar

import pydantic

VARIANTS = ("paper", "cifar")
POOLS = ("overlapping", "non_overlapping")
ACTIVATIONS = ("relu", "tanh", "sigmoid")
INITS = ("paper", "keras")
DATASETS = ("cifar10", "folder", "synthetic")
# Input recipes (alexnet_keras/data/pipeline.py): "simple" squashes to the input size; "paper" is Krizhevsky et al.'s.
RECIPES = ("simple", "paper")
SCHEDULES = ("plateau", "cosine", "step", "constant")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
JIT = ("auto", "true", "false")
# Multi-device data parallelism engines (alexnet_keras/distribute.py): none; TF mirrored / multi_worker; JAX.
DISTRIBUTE = ("none", "mirrored", "multi_worker", "data_parallel")

# Native input side of each variant, used when `image_size` is left unset.
NATIVE_IMAGE_SIZE = {"paper": 227, "cifar": 32}
# What the model's first layer does to the 0..255 pixels (model.py): "standardize" divides the
# mean-subtracted pixels by the per-channel std; "center" only subtracts the mean, the paper's regime,
# in which LRN sees activations large enough against k to normalise (issue 16).
INPUT_NORMS = ("standardize", "center")

# --- The network's geometry: model.py builds its layers from these, and the config uses them to refuse
# a network that cannot be built or would not fit in memory, before anything is built.
CONV_FILTERS = (96, 256, 384, 384, 256)                           # conv1..conv5, before `width`
CONV_KERNELS = {"paper": (11, 5, 3, 3, 3), "cifar": (3, 3, 3, 3, 3)}
HIDDEN_UNITS = 4096                                               # fc6 and fc7, before `width`
# The paper's two-GPU split: only these convs see just the half of the previous layer's maps that
# lives on their own GPU (conv3 and the FC layers connect across GPUs).
GROUPED_CONVS = (2, 4, 5)
LRN_CONVS = (1, 2)                                                # LRN after these convs' activation
POOLED_CONVS = (1, 2, 5)                                          # max-pooling after these convs
POOL_SIZES = {"overlapping": 3, "non_overlapping": 2}

# Ranges of the integer leaves that have no natural upper end: far beyond any sensible run, but finite.
MAX_SIDE = 32768                 # image_size, stored_size (pixels)
MAX_COUNT = 2 ** 31 - 1          # image counts (train_limit, test_limit, synthetic_samples)
MAX_EPOCHS = 100_000             # epochs, plateau_patience
MAX_BATCH_SIZE = 2 ** 20
MAX_SEED = 2 ** 32 - 1           # NumPy's and Keras' seeds are unsigned 32-bit integers
# Memory the training process holds per value (see memory_estimate).
_FLOAT_BYTES = 4                 # float32 weights, gradients, activations (an upper estimate under mixed precision)
_SYNTHETIC_PEAK_BYTES = 16       # per pixel value while data/sources.py generates synthetic images (float64 noise,
                                 # float32 sums; measured with tracemalloc: 16.04)
# An experiment, study or sweep file is a page of options: anything bigger is a mistake (or an attack).
YAML_MAX_BYTES = 2 ** 20
YAML_MAX_NODES = 100_000         # values after alias expansion ("billion laughs" files expand to 10^9)


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


def _integer(section: str, name: str, value: Any, lo: int, hi: int, *, optional: bool = False,
             what: str | None = None) -> None:
    """`value` is an integer in [lo, hi] (or None when `optional`); `what` words the rule instead."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        rule = what or f"an integer in [{lo}, {hi}]"
        unset = " (or unset)" if optional else ""
        raise ConfigError(f"{section}.{name} must be {rule}{unset}; got {value!r}.")


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
    # What the first layer does to the 0..255 pixels: "standardize" = (x - mean) / std per channel;
    # "center" = x - mean, the paper's regime (with init "paper", LRN then sees activations of the
    # paper's size). Added after runs were logged: at its default it leaves their digests alone.
    input_norm: str = field(default="standardize", metadata={"digest": "omit_default"})

    def __post_init__(self) -> None:
        s = "model"
        _choice(s, "variant", self.variant, VARIANTS)
        _choice(s, "pool", self.pool, POOLS)
        _choice(s, "activation", self.activation, ACTIVATIONS)
        _choice(s, "init", self.init, INITS)
        _choice(s, "input_norm", self.input_norm, INPUT_NORMS)
        _range(s, "dropout", self.dropout, 0.0, 1.0, hi_open=True)
        _range(s, "width", self.width, 0.0, 16.0, lo_open=True)
        _range(s, "weight_decay", self.weight_decay, 0.0, 1.0)
        _range(s, "lrn_alpha", self.lrn_alpha, 0.0, 1000.0)
        _range(s, "lrn_beta", self.lrn_beta, 0.0, 10.0)
        # k > 0: with k = 0 a window of zero activations (dead ReLUs) gives 0 / 0.
        _range(s, "lrn_k", self.lrn_k, 0.0, 1e6, lo_open=True)
        if (isinstance(self.lrn_size, bool) or not isinstance(self.lrn_size, int) or not 1 <= self.lrn_size <= 1023
                or self.lrn_size % 2 == 0):
            raise ConfigError(f"model.lrn_size must be a positive odd integer up to 1023 (the paper uses 5); "
                              f"got {self.lrn_size!r}.")
        if self.groups not in (1, 2) or isinstance(self.groups, bool):
            raise ConfigError(f"model.groups must be one of 1, 2; got {self.groups!r}.")
        if self.image_size is not None:
            # Smallest side whose every feature map (up to pool5) is not empty; the cifar variant's
            # 'same' layers never empty a map, but fewer than 8 px leave nothing to learn from.
            minimum = max(8, next(side for side in range(1, MAX_SIDE)
                                  if min(self.feature_sides(side).values()) >= 1))
            _integer(s, "image_size", self.image_size, minimum, MAX_SIDE, optional=True,
                     what=f"an integer >= {minimum} for variant {self.variant!r} (at most {MAX_SIDE})")

    @property
    def input_size(self) -> int:
        return self.image_size or NATIVE_IMAGE_SIZE[self.variant]

    # --- geometry (model.py builds the layers from these; tests/test_model.py checks them against it)
    @property
    def conv_filters(self) -> tuple[int, ...]:
        """Filters of conv1..conv5 after `width` (a multiple of 2 with groups=2, so each group gets
        whole channels)."""
        multiple = 2 if self.groups == 2 else 1
        return tuple(scaled_units(f, self.width, multiple) for f in CONV_FILTERS)

    @property
    def hidden_units(self) -> int:
        """Units of fc6 and fc7 after `width`."""
        return scaled_units(HIDDEN_UNITS, self.width)

    def feature_sides(self, size: int | None = None) -> dict[str, int]:
        """The side of the feature map after conv1 and each pool for inputs of `size` px (default: the
        input size); 0 where a map would be empty."""
        size = self.input_size if size is None else size
        pool = POOL_SIZES[self.pool]
        sides = {}
        if self.variant == "paper":
            # conv1 'valid' 11x11 stride 4; pools 'valid' stride 2; the other convs keep the size.
            size = (size - 11) // 4 + 1 if size >= 11 else 0
            sides["conv1"] = size
            for name in ("pool1", "pool2", "pool5"):
                size = (size - pool) // 2 + 1 if size >= pool else 0
                sides[name] = size
        else:
            # All 'same': only the stride-2 pools shrink the map, to ceil(size / 2).
            sides["conv1"] = size
            for name in ("pool1", "pool2", "pool5"):
                size = -(-size // 2)
                sides[name] = size
        return sides

    def parameter_count(self, num_classes: int) -> int:
        """The number of weights of the AlexNet this config builds (what `model.count_params()` says,
        BatchNormalization's moving statistics included)."""
        sides = self.feature_sides()
        channels, total = 3, 0
        for i, (filters, kernel) in enumerate(zip(self.conv_filters, CONV_KERNELS[self.variant]), start=1):
            groups = self.groups if i in GROUPED_CONVS else 1
            total += kernel * kernel * (channels // groups) * filters
            total += 4 * filters if self.batchnorm else filters   # BN: gamma, beta, mean, variance
            channels = filters
        hidden, flat = self.hidden_units, sides["pool5"] ** 2 * channels
        return total + (flat + 1) * hidden + (hidden + 1) * hidden + (hidden + 1) * num_classes

    def activation_count(self, num_classes: int) -> int:
        """Values the layers output for one image: the sum of every layer's output size."""
        sides = self.feature_sides()
        map_side = {1: sides["conv1"], 2: sides["pool1"], 3: sides["pool2"], 4: sides["pool2"], 5: sides["pool2"]}
        pooled = {1: sides["pool1"], 2: sides["pool2"], 5: sides["pool5"]}
        total = self.input_size ** 2 * 3                                   # preprocess
        for i, filters in enumerate(self.conv_filters, start=1):
            layers = 2 + self.batchnorm + (self.lrn and i in LRN_CONVS)    # conv, *bn, act, *lrn
            total += layers * map_side[i] ** 2 * filters
            if i in POOLED_CONVS:
                total += pooled[i] ** 2 * filters
        flat, hidden = sides["pool5"] ** 2 * self.conv_filters[-1], self.hidden_units
        total += flat                                                      # flatten
        if self.dropout > 0:
            total += flat + hidden                                         # dropout6, dropout7
        return total + 4 * hidden + 2 * num_classes                        # fc6/7 + act, fc8, softmax


def scaled_units(units: int, width: float, multiple: int = 1) -> int:
    """`units * width`, rounded half up (not Python's banker's rounding) to a multiple of `multiple`,
    at least one multiple."""
    return max(multiple, multiple * int(math.floor(units * width / multiple + 0.5)))


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
    # --- The paper's ImageNet recipe (data/pipeline.py). `augment` stays the master switch of training
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
        _integer("data", "split_seed", self.split_seed, 0, MAX_SEED)
        for name in ("train_limit", "test_limit"):
            _integer("data", name, getattr(self, name), 2, MAX_COUNT, optional=True,
                     what=f"at least 2 (at most {MAX_COUNT})")
        _integer("data", "synthetic_samples", self.synthetic_samples, 16, MAX_COUNT,
                 what=f"at least 16 (at most {MAX_COUNT})")
        _integer("data", "synthetic_classes", self.synthetic_classes, 2, 1000)
        _choice("data", "recipe", self.recipe, RECIPES)
        _integer("data", "stored_size", self.stored_size, 8, MAX_SIDE, what=f"an integer >= 8 (at most {MAX_SIDE})")
        _integer("data", "max_memory_mb", self.max_memory_mb, 0, 2 ** 24,   # 16 TiB
                 what=f"an integer >= 0 (at most {2 ** 24}, 16 TiB)")
        _range("data", "pca_std", self.pca_std, 0.0, 10.0)


@dataclass(frozen=True)
class TrainConfig:
    """How the network learns. Defaults follow the paper: SGD, momentum 0.9, lr 0.01, /10 on plateau."""

    epochs: int = 30
    batch_size: int = 128
    learning_rate: float = 0.01
    momentum: float = 0.9
    # "plateau": lr/10 when val loss stalls (paper); "cosine"; "step": lr/10 after half and again after
    # three quarters of the epochs (the paper's /10 steps on a fixed timetable); "constant"
    schedule: str = "plateau"
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
        for name, most in (("epochs", MAX_EPOCHS), ("batch_size", MAX_BATCH_SIZE), ("plateau_patience", MAX_EPOCHS)):
            _integer(s, name, getattr(self, name), 1, most, what=f"a positive integer (at most {most})")
        _integer(s, "seed", self.seed, 0, MAX_SEED)
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
    # `train --register NAME`: the run's model becomes a new version of registered model NAME, alias
    # `champion` (serving.register_model), once the run has FINISHED. Ignored by a study's children and
    # a sweep's trials (`ablate` / `tune --register` register the best one).
    register: str | None = None
    # CPU, memory, disk, network (and GPU, with nvidia-ml-py) as `system/...` metrics of every training
    # run, through MLflow's own monitor (tracking.py, "System metrics").
    system_metrics: bool = True

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
                if leaves[k][0] is not None   # TOP_LEVEL: naming, resuming, registering, monitoring
                and not (leaves[k][1].metadata.get("digest") == "omit_default" and v == leaves[k][1].default)}

    def digest(self) -> str:
        """A stable hash of everything that changes a run's outcome (used to skip finished runs and to
        find the run to resume)."""
        return hashlib.sha256(json.dumps(self.outcome_values(), sort_keys=True).encode()).hexdigest()[:16]

    def override(self, values: Mapping[str, Any], *, source: str = "overrides") -> "Config":
        """A copy with `values` applied; keys are leaf names or `section.name`, values typed or strings."""
        return from_dict(values, base=self, source=source)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
TOP_LEVEL = ("experiment", "run_name", "resume", "checkpoint_dir", "register", "system_metrics")


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
    config = replace(base, **sections, **updates[None])
    check_memory(config)
    return config


def _unknown_key_message(key: str, source: str) -> str:
    names = sorted(leaf_fields())
    return f"{source}: unknown option {key!r}.{did_you_mean(key.split('.')[-1], names)} Known options: {', '.join(names)}."


# --- memory ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a training run of a config holds at least (see `memory_estimate`)."""

    parameters: int     # weights of the model
    weights: int        # bytes of the weights, their gradients and SGD's momentum
    activations: int    # bytes of one batch's layer outputs and their gradients
    images: int         # bytes of the images held in memory (synthetic: the peak while generating them)
    batch_size: int

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.images


def memory_estimate(config: Config) -> MemoryEstimate:
    """What a training run of `config` needs in memory, from the config alone (nothing is built).

    weights: 3 float32 copies of every parameter (the weights, their gradients, SGD's momentum);
    activations: every layer's output for one batch, twice (kept for the backward pass, and its
    gradient), in float32; images: the synthetic dataset, which data/sources.py generates in memory at about 16
    bytes per pixel value (float64 noise, float32 sums), or CIFAR-10 held at its native 32 px. Image
    folders are left out: above `max_memory_mb` they are streamed from the files. An estimate, not a
    measurement: the frameworks add their own memory, while fused kernels (XLA) and mixed precision keep
    less per activation; it is checked against the whole machine's memory, so what it refuses is far
    out of reach (an image side of 20,000 px, 10^8 synthetic images), not a run that nearly fits."""
    model, data = config.model, config.data
    num_classes = {"synthetic": data.synthetic_classes, "cifar10": 10}.get(data.dataset, 1000)
    parameters = model.parameter_count(num_classes)
    batch = config.train.batch_size
    activations = 2 * _FLOAT_BYTES * batch * model.activation_count(num_classes)
    if data.dataset == "synthetic":
        side = data.stored_size if data.recipe == "paper" else model.input_size
        images = _SYNTHETIC_PEAK_BYTES * data.synthetic_samples * side * side * 3
    elif data.dataset == "cifar10":
        images = 60_000 * 32 * 32 * 3
    else:
        images = 0
    return MemoryEstimate(parameters=parameters, weights=3 * _FLOAT_BYTES * parameters,
                          activations=activations, images=images, batch_size=batch)


def memory_bound() -> int | None:
    """Bytes of memory this process can have: the machine's physical memory (os.sysconf), or its
    cgroup's limit (containers) when that is lower; None where neither can be read."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):   # not a POSIX system
        return None
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if limit.isdigit():
            total = min(total, int(limit))
    return total


def check_memory(config: Config, bound: int | None = None) -> None:
    """Refuse `config` when `memory_estimate` exceeds `bound` (default: `memory_bound()`), with the
    estimate, its largest part and the option that shrinks it."""
    bound = memory_bound() if bound is None else bound
    estimate = memory_estimate(config)
    if bound is None or estimate.total <= bound:
        return
    parts = {"weights": estimate.weights, "activations": estimate.activations, "images": estimate.images}
    largest = max(parts, key=parts.get)
    room = bound - (estimate.total - parts[largest])   # what the largest part may take
    if largest == "images":
        per_image = estimate.images / config.data.synthetic_samples
        fits = int(room // per_image) if room > 0 else 0
        fix = (f"use --synthetic-samples {fits} or fewer" if fits >= 16 else "use fewer --synthetic-samples")
        fix += ", or a smaller --stored-size" if config.data.recipe == "paper" else ", or a smaller --image-size"
    elif largest == "activations":
        per_image = estimate.activations / estimate.batch_size
        fits = int(room // per_image) if room > 0 else 0
        fix = (f"use --batch-size {fits} or less" if fits >= 1 else "use a smaller --batch-size") + \
            ", a smaller --image-size or a smaller --width"
    else:
        native = NATIVE_IMAGE_SIZE[config.model.variant]
        fix = (f"use a smaller --image-size (fc6's weights grow with its square; the {config.model.variant} "
               f"variant's own is {native}) or a smaller --width")
    raise ConfigError(
        f"this run would need about {_bytes_text(estimate.total)} of memory, more than the "
        f"{_bytes_text(bound)} this machine has (physical memory, or the cgroup limit if lower): "
        f"weights, gradients and momentum of {estimate.parameters:,} parameters {_bytes_text(estimate.weights)}, "
        f"activations of a batch of {estimate.batch_size} {_bytes_text(estimate.activations)}, "
        f"images {_bytes_text(estimate.images)}. Fix: {fix}.")


def _bytes_text(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if count < 1024 or unit == "PiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


# --- YAML ----------------------------------------------------------------------------------------

def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML file (experiment, study or sweep) into a mapping, with one clear error for a path
    that is not a regular file, a file over YAML_MAX_BYTES, text that is not UTF-8, malformed YAML,
    aliases that expand beyond YAML_MAX_NODES values (or into themselves), and a non-mapping.
    Only plain YAML is read (yaml.SafeLoader: no Python objects)."""
    import yaml

    path = Path(path)
    where = f"config file {str(path)!r}"
    if path.is_dir():
        raise ConfigError(f"{where} is a folder, not a file. Pass the path of a YAML file in it, e.g. "
                          f"experiments/cifar10.yaml.")
    if not path.exists():
        raise ConfigError(f"{where} does not exist. Pass the path of a YAML file, e.g. experiments/cifar10.yaml.")
    if not path.is_file():   # a FIFO or device would block the read, or never end
        raise ConfigError(f"{where} is not a regular file. Pass the path of a YAML file.")
    try:
        with path.open("rb") as file:
            raw = file.read(YAML_MAX_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"{where} cannot be read ({err.strerror or err}).") from None
    if len(raw) > YAML_MAX_BYTES:
        raise ConfigError(f"{where} is larger than {YAML_MAX_BYTES // 2 ** 10} KiB; an experiment, study or "
                          f"sweep file is a page of options. Check that it is the file you meant.")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{where} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}). "
                          f"Save it as UTF-8.") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}
        _check_yaml_size(node, where)
        data = loader.construct_document(node)
    except yaml.YAMLError as err:
        # One line (PyYAML's own text spans several, with a caret under the spot).
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        context = getattr(err, "context", None)
        raise ConfigError(f"{where} is not valid YAML{at}: {problem}" + (f" ({context})" if context else "")
                          ) from None
    except RecursionError:
        raise ConfigError(f"{where} is nested too deeply to be an options file.") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a mapping of options; got {type(data).__name__}.")
    return data


def _check_yaml_size(root, where: str) -> None:
    """Refuse a YAML node graph whose aliases expand beyond YAML_MAX_NODES values or into themselves.
    Counting shared nodes once per use, with a memo per node, takes time linear in the file."""
    import yaml

    expanded: dict[int, int] = {}   # id(node) -> values under it, aliases expanded
    stack: list[tuple[Any, bool]] = [(root, False)]
    open_nodes: set[int] = set()
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            open_nodes.discard(key)
            children = _yaml_children(node, yaml)
            expanded[key] = 1 + sum(expanded[id(child)] for child in children)
            if expanded[key] > YAML_MAX_NODES:
                raise ConfigError(f"{where} holds more than {YAML_MAX_NODES:,} values once its aliases (*name) "
                                  f"are expanded; an options file needs a few hundred. Remove the aliases "
                                  f"that repeat other aliases.")
            continue
        if key in expanded:
            continue
        if key in open_nodes:
            raise ConfigError(f"{where} has an alias (*name) inside the value it names, which would "
                              f"expand forever. Remove it.")
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _yaml_children(node, yaml) if id(child) not in expanded)


def _yaml_children(node, yaml) -> list:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file at `path` (if any), then `overrides` (CLI flags)."""
    config = Config()
    if path:
        config = from_dict(load_yaml(path), base=config, source=str(path))
    if overrides:
        config = from_dict(overrides, base=config, source="command line")
    check_memory(config)
    return config


def did_you_mean(word: str, known: list[str] | tuple[str, ...], n: int = 3) -> str:
    """" Did you mean a, b?" with the names of `known` closest to `word`, or "" when none is close: the
    one hint every unknown option, key or axis gets (configs, study and sweep files)."""
    import difflib

    close = difflib.get_close_matches(word, list(known), n=n)
    return f" Did you mean {', '.join(close)}?" if close else ""


OptionsT = TypeVar("OptionsT", bound="Options")


class Options(pydantic.BaseModel):
    """Base of every validated options model outside the Config tree (study and sweep files, the
    benchmark's flags): unknown keys are refused, values are not coerced across types."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


def validated(model: type[OptionsT], data: Mapping[str, Any], where: str) -> OptionsT:
    """`model` built from `data`; pydantic's errors become one ConfigError whose lines each name the
    value's path under `where` (a YAML file and key path, or a command's flags), what is allowed and
    what came (unknown keys with "did you mean")."""
    try:
        return model.model_validate(dict(data))
    except pydantic.ValidationError as err:
        lines = []
        for e in err.errors():
            path = ".".join(str(part) for part in e["loc"])
            if e["type"] == "extra_forbidden":
                known = [name for name in model.model_fields]
                lines.append(f"{where}: unknown key {path!r}.{did_you_mean(str(e['loc'][-1]), known)} "
                             f"Known keys: {', '.join(known)}.")
            else:
                lines.append(f"{where}: {path}: {e['msg']}; got {e.get('input')!r}.")
        raise ConfigError("\n".join(lines)) from None
