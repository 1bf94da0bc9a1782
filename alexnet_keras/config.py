"""Every default and all validation: `Config` (model, data, train sections + tracking fields), `MAIN_JOB`,
`Options` (the base of every other validated file or flag set), the network's geometry, the memory check
and `load_yaml`. A leaf name is at once a CLI flag, an MLflow param and a YAML key (nested or flat)."""

import dataclasses
import hashlib
import json
import math
import os
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Sequence, TypeVar

import pydantic
from pydantic import BeforeValidator, Field

VARIANTS = ("paper", "cifar", "cifar_convnet4")
POOLS = ("overlapping", "non_overlapping")
ACTIVATIONS = ("relu", "tanh", "sigmoid")
DATASETS = ("cifar10", "folder", "synthetic")
SCHEDULES = ("plateau", "cosine", "step", "constant")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
JIT = ("auto", "true", "false")
DISTRIBUTE = ("none", "mirrored", "multi_worker", "data_parallel")   # training/distribute.py
NATIVE_IMAGE_SIZE = {"paper": 227, "cifar": 32, "cifar_convnet4": 24}   # the input side when `image_size` is unset

# The network's geometry: model/alexnet.py builds its layers from it, the memory check counts with it.
# cifar_convnet4: the paper's four-layer CIFAR-10 net (cuda-convnet's layers-conv-local-11pct.cfg; 13pct
# without LRN): conv1, conv2, then locally connected local3, local4 (unshared weights), fc straight to the classes.
CONV_FILTERS = {"paper": (96, 256, 384, 384, 256), "cifar_convnet4": (64, 64, 32, 32)}   # before `width`
CONV_KERNELS = {"paper": (11, 5, 3, 3, 3), "cifar": (3, 3, 3, 3, 3), "cifar_convnet4": (5, 5, 3, 3)}
LOCAL_CONVS = {"cifar_convnet4": (3, 4)}                          # locally connected, not convolutions
HIDDEN_UNITS = 4096                                               # fc6 and fc7, before `width`
GROUPED_CONVS = (2, 4, 5)                                         # the paper's two-GPU split: half the maps
LRN_CONVS = (1, 2)                                                # LRN after these convs' activation
POOLED_CONVS = (1, 2, 5)                                          # max-pooling after these convs
POOL_SIZES = {"overlapping": 3, "non_overlapping": 2}

# The data options that a data set or recipe does not read (data/sources.py, data/pipeline.py).
IGNORED_BY = {("dataset", "synthetic"): ("data_dir", "max_memory_mb"),
              **{("dataset", name): ("synthetic_samples", "synthetic_classes") for name in ("cifar10", "folder")},
              ("recipe", "simple"): ("stored_size", "pca_color", "pca_std", "pixel_mean", "ten_crop")}

# Ranges of the integer leaves that have no natural upper end: far beyond any sensible run, but finite.
MAX_SIDE = 32768                 # image_size, stored_size (pixels)
MAX_COUNT = 2 ** 31 - 1          # image counts (train_limit, test_limit, synthetic_samples)
MAX_EPOCHS = 100_000             # epochs, plateau_patience
MAX_SEED = 2 ** 32 - 1           # NumPy's and Keras' seeds are unsigned 32-bit integers
_FLOAT_BYTES = 4                 # per float32 weight, gradient or activation (see memory_estimate)
_SYNTHETIC_PEAK_BYTES = 16       # per pixel value generating synthetic images (tracemalloc: 16.04)
YAML_MAX_BYTES = 2 ** 20         # an experiment, study or sweep file is a page of options
YAML_MAX_NODES = 100_000         # values after alias expansion ("billion laughs" files expand to 10^9)


class ConfigError(ValueError):
    """A configuration value is wrong. The message says where, what is allowed, and what came."""


def none_text(value: Any) -> Any:
    """"", "none" and "null" (an empty MLproject parameter, `--register none`) mean None."""
    return None if isinstance(value, str) and value.strip().lower() in ("", "none", "null") else value


Unset = BeforeValidator(none_text)
Choice = BeforeValidator(lambda v: str(v).lower() if isinstance(v, bool) else v)   # YAML `jit_compile: true`


def _not_bool(kind: str) -> BeforeValidator:
    def check(value: Any) -> Any:
        if isinstance(value, bool):   # pydantic's lax mode would read YAML's `yes` as 1
            raise ValueError(f"must be {kind}")
        return value
    return BeforeValidator(check)


Int, Float = Annotated[int, _not_bool("an integer")], Annotated[float, _not_bool("a number")]
OptionalInt = Annotated[int | None, Unset, _not_bool("an integer")]
Seed = Annotated[Int, Field(ge=0, le=MAX_SEED)]


_RULES = {"bool_parsing": "must be true or false", "bool_type": "must be true or false",
          "int_parsing": "must be an integer", "int_type": "must be an integer", "int_from_float": "must be an integer",
          "float_parsing": "must be a number", "float_type": "must be a number",
          "finite_number": "must be a finite number", "string_type": "must be a string",
          "too_short": "must not be empty", "dict_type": "must be a mapping", "list_type": "must be a list",
          "model_type": "must be a mapping", "model_attributes_type": "must be a mapping",
          "union_tag_not_found": "needs a `type`"}


def _rule(error: Mapping[str, Any], info: Any) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind in ("literal_error", "union_tag_invalid"):
        return f"must be one of {ctx.get('expected', ctx.get('expected_tags', '')).replace(' or ', ', ')}"
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", error["msg"]))
    if not kind.startswith(("greater", "less")):
        return _RULES.get(kind, f"is wrong: {error['msg']}")
    b = {type(m).__name__.lower(): getattr(m, type(m).__name__.lower()) for m in getattr(info, "metadata", ())
         if type(m).__name__ in ("Ge", "Gt", "Le", "Lt")} or ctx
    lo, hi = b.get("ge", b.get("gt")), b.get("le", b.get("lt"))
    if lo is None or hi is None:
        return f"must be {'an integer ' if isinstance(lo or hi, int) else ''}" + (
            f"{'>=' if 'ge' in b else '>'} {lo}" if hi is None else f"{'<=' if 'le' in b else '<'} {hi}")
    if isinstance(lo, int) and isinstance(hi, int) and "ge" in b and "le" in b:
        return f"must be a positive integer (at most {hi})" if lo == 1 else f"must be an integer >= {lo} (at most {hi})"
    return f"must be in {'[' if 'ge' in b else '('}{float(lo)}, {float(hi)}{']' if 'le' in b else ')'}"


def shown(value: Any) -> str:
    """A value as the user wrote it: a number given as text (a flag) unquoted, other text quoted."""
    try:
        return value if isinstance(value, str) and float(value) is not None else repr(value)
    except ValueError:
        return repr(value)


def _fields(owner: Any) -> dict[str, Any]:
    return getattr(owner, "model_fields", None) or getattr(owner, "__pydantic_fields__", None) or {}


def _walk(model: Any, loc: list[str]) -> tuple[list[str], Any]:
    path, owner = [], model
    for part in loc[:-1]:
        if part in _fields(owner):
            path.append(part)
            owner = _fields(owner)[part].annotation
            continue
        members = [m for a in typing.get_args(owner) for m in (typing.get_args(a) or (a,)) if _fields(m)]
        tagged = [m for m in members if "type" in _fields(m) and part in typing.get_args(_fields(m)["type"].annotation)]
        if tagged:   # the union member the tag chose
            owner = tagged[0]
        else:        # a key of a dict or an index of a list: its values' type
            path.append(part)
            owner = (typing.get_args(owner) or (None,))[-1]
    return path + loc[-1:], owner


def explain(err: pydantic.ValidationError, prefix: str, model: Any) -> ConfigError:
    """One line per pydantic error: `prefix` (a section or file), the value's path, what is allowed, what came."""
    lines, errors = [], err.errors()
    nested = {tuple(map(str, e["loc"][:-1])) for e in errors}
    for e in errors:
        if e["type"] == "too_short" and tuple(map(str, e["loc"])) in nested:
            continue   # pydantic also calls a list short once its one item failed: that item's line says it
        loc, owner = _walk(model, [str(part) for part in e["loc"]])
        fields, path = _fields(owner), ".".join(loc)
        if e["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            lines.append(f"{prefix}{'.'.join(loc[:-1]) + ': ' if loc[:-1] else ''}unknown key {loc[-1]!r}."
                         f"{did_you_mean(loc[-1], list(fields))} Known keys: {', '.join(fields)}.")
            continue
        info = fields.get(loc[-1]) if loc else None
        if e["type"] == "missing":
            hint = f"; {info.description}" if info is not None and info.description else ""
            lines.append(f"{prefix}`{path}` is missing{hint}.")
        elif not loc:   # a validator of the whole: its message names the values
            lines.append(f"{prefix}{_rule(e, info)}.")
        elif e["type"] in ("value_error", "assertion_error") and "got " in _rule(e, info):
            lines.append(f"{prefix}`{path}`: {_rule(e, info).rstrip('.')}.")   # the validator named the value
        else:
            fix = (f" Fix it with --{path.replace('_', '-')} {typing.get_args(info.annotation)[0]}."
                   if e["type"] == "literal_error" and prefix.endswith(".") else "")
            hint = f" ({info.description})" if e["type"] == "too_short" and getattr(info, "description", None) else ""
            path = f"`{path}`" if prefix.endswith(": ") else path   # a key in a file, or a config leaf
            lines.append(f"{prefix}{path} {_rule(e, info)}{hint}; got {shown(e.get('input'))}.{fix}")
    return ConfigError("\n".join(lines))


def section(name: str):
    def wrap(cls):
        cls = pydantic.dataclasses.dataclass(frozen=True, config=pydantic.ConfigDict(
            extra="forbid", allow_inf_nan=False))(cls)
        init = cls.__init__

        def __init__(self, *args, **kwargs):
            try:
                init(self, *args, **kwargs)
            except pydantic.ValidationError as err:
                raise explain(err, f"{name}." if name else "", cls) from None
        cls.__init__ = __init__
        return cls
    return wrap


@section("model")
class ModelConfig:
    """AlexNet's design choices, each an independent toggle. Defaults are the 2012 paper's."""

    variant: Literal[VARIANTS] = Field("paper", description="paper: the 227-px ImageNet net; cifar: for 32 px; "
                                       "cifar_convnet4: the paper's four-layer CIFAR-10 net, 24 px")
    image_size: OptionalInt = Field(None, description="input side in px (none: the variant's own)")
    width: Float = Field(1.0, gt=0.0, le=16.0, description="multiplies every conv's filters and the hidden units")
    groups: Int = Field(1, ge=1, le=2, description="2: the paper's two-GPU split of conv2, conv4, conv5")
    lrn: bool = Field(True, description="local response normalization after conv1 and conv2")
    lrn_size: Int = Field(5, ge=1, le=1023, description="LRN window n, in channels (odd)")
    lrn_alpha: Float = Field(1e-4, ge=0.0, le=1000.0, description="LRN alpha")
    lrn_beta: Float = Field(0.75, ge=0.0, le=10.0, description="LRN beta")
    # k > 0: with k = 0 a window of zero activations (dead ReLUs) gives 0 / 0.
    lrn_k: Float = Field(2.0, gt=0.0, le=1e6, description="LRN k")
    batchnorm: bool = Field(False, description="batch normalization between each conv and its activation")
    dropout: Float = Field(0.5, ge=0.0, lt=1.0, description="dropout before fc6 and fc7 (0: no dropout layers)")
    pool: Literal[POOLS] = Field("overlapping", description="overlapping 3x3/2 (paper) or non_overlapping 2x2/2")
    activation: Literal[ACTIVATIONS] = Field("relu", description="every hidden layer's activation")
    init: Literal["paper", "keras"] = Field("paper", description="paper: N(0, 0.01), bias 1 in conv2/4/5, fc6/7; keras")
    weight_decay: Float = Field(5e-4, ge=0.0, le=1.0, description="L2 on kernels, as the paper's update rule")
    input_norm: Literal["standardize", "center"] = Field("standardize", description="(x-mean)/std, or x-mean (paper)")

    @pydantic.field_validator("lrn_size")
    @classmethod
    def _odd(cls, size: int) -> int:
        if size % 2 == 0:
            raise ValueError("must be a positive odd integer up to 1023 (the paper uses 5)")
        return size

    @pydantic.model_validator(mode="after")
    def _buildable(self) -> "ModelConfig":
        # The smallest side that leaves every map up to pool5 non-empty, and at least 8 px to learn from.
        if self.image_size is not None:
            minimum = max(8, next(side for side in range(1, MAX_SIDE) if min(self.feature_sides(side).values())))
            if not minimum <= self.image_size <= MAX_SIDE:
                raise ValueError(f"image_size must be an integer >= {minimum} for variant {self.variant!r} "
                                 f"(at most {MAX_SIDE}); got {self.image_size}")
        return self

    @property
    def input_size(self) -> int:
        return self.image_size or NATIVE_IMAGE_SIZE[self.variant]

    @property
    def conv_filters(self) -> tuple[int, ...]:   # a multiple of 2 with groups=2: whole channels per group
        multiple = 2 if self.groups == 2 else 1
        filters = CONV_FILTERS.get(self.variant, CONV_FILTERS["paper"])
        return tuple(scaled_units(f, self.width, multiple) for f in filters)

    @property
    def hidden_units(self) -> int:
        return scaled_units(HIDDEN_UNITS, self.width)

    def feature_sides(self, size: int | None = None) -> dict[str, int]:
        """The side after conv1 and each pool for `size`-px inputs (0: empty). paper: 'valid' conv1 11x11/4
        and pools; cifar: all 'same', the pools halve it."""
        pool, paper = POOL_SIZES[self.pool], self.variant == "paper"
        side = self.input_size if size is None else size
        side = ((side - 11) // 4 + 1 if side >= 11 else 0) if paper else side
        sides = {"conv1": side}
        for name in [f"pool{i}" for i in POOLED_CONVS if i <= len(self.conv_filters)]:
            side = sides[name] = ((side - pool) // 2 + 1 if side >= pool else 0) if paper else -(-side // 2)
        return sides

    def parameter_count(self, num_classes: int) -> int:
        """`model.count_params()` of the AlexNet this config builds."""
        sides, local = self.feature_sides(), LOCAL_CONVS.get(self.variant, ())
        channels, total = 3, 0
        for i, (filters, kernel) in enumerate(zip(self.conv_filters, CONV_KERNELS[self.variant]), start=1):
            groups = self.groups if i in GROUPED_CONVS and i not in local else 1
            # A locally connected layer: a kernel and a bias per output position (BN's stay per channel).
            positions = sides["pool2"] ** 2 if i in local else 1
            total += positions * kernel * kernel * (channels // groups) * filters
            total += 4 * filters if self.batchnorm else positions * filters   # BN: gamma, beta, mean, variance
            channels = filters
        flat, hidden = list(sides.values())[-1] ** 2 * channels, self.hidden_units   # after the last pool
        if local:   # fc straight to the classes
            return total + (flat + 1) * num_classes
        return total + (flat + 1) * hidden + (hidden + 1) * hidden + (hidden + 1) * num_classes

    def activation_count(self, num_classes: int) -> int:
        sides = self.feature_sides()
        map_side = {1: sides["conv1"], 2: sides["pool1"], 3: sides["pool2"], 4: sides["pool2"], 5: sides["pool2"]}
        total = self.input_size ** 2 * 3                                   # preprocess
        for i, filters in enumerate(self.conv_filters, start=1):
            layers = 2 + self.batchnorm + (self.lrn and i in LRN_CONVS)    # conv, *bn, act, *lrn
            total += layers * map_side[i] ** 2 * filters
            if i in POOLED_CONVS:
                total += sides[f"pool{i}"] ** 2 * filters
        hidden, local = self.hidden_units, self.variant in LOCAL_CONVS
        flat = list(sides.values())[-1] ** 2 * self.conv_filters[-1]
        total += flat + 2 * num_classes                                    # flatten, fc8, softmax
        if self.dropout > 0:
            total += flat + (0 if local else hidden)                       # dropout6, dropout7
        return total + (0 if local else 4 * hidden)                        # fc6/7 + act


def scaled_units(units: int, width: float, multiple: int = 1) -> int:
    """`units * width` rounded half up (not banker's rounding) to a multiple of `multiple`, at least one."""
    return max(multiple, multiple * int(math.floor(units * width / multiple + 0.5)))


@section("data")
class DataConfig:
    """Where images come from and how they are split and augmented."""

    dataset: Literal[DATASETS] = Field("cifar10", description="cifar10, an image folder, or synthetic noise")
    data_dir: Annotated[str | None, Unset] = Field(None, description="image folder or .tar.gz (none: "
                                                   "$ALEXNET_KERAS_DATA_DIR, then keras.datasets)")
    val_fraction: Float = Field(0.1, gt=0.0, le=0.5, description="validation share of the training set")
    split_seed: Seed = Field(0, description="the split's seed, apart from `seed`: a study's runs share a split")
    augment: bool = Field(True, description="training augmentation at all (random_crop, random_flip, pca_color)")
    train_limit: OptionalInt = Field(None, ge=2, le=MAX_COUNT, description="training images kept")
    synthetic_samples: Int = Field(512, ge=16, le=MAX_COUNT, description="synthetic train + val images")
    synthetic_classes: Int = Field(10, ge=2, le=1000, description="classes of the synthetic dataset")
    recipe: Literal["simple", "paper"] = Field("simple", description="squash to the input size, or the paper's crops")
    stored_size: Int = Field(256, ge=8, le=MAX_SIDE, description="paper recipe: side crops are cut from")
    random_crop: bool = Field(True, description="simple: shift by up to 1/8 of the side; paper: random crop")
    random_flip: bool = Field(True, description="random horizontal reflection")
    pca_color: bool = Field(True, description="paper recipe: the fancy-PCA colour shift per image")
    pca_std: Float = Field(0.1, ge=0.0, le=10.0, description="std of the fancy-PCA coefficients (paper: 0.1)")
    pixel_mean: bool = Field(False, description="paper recipe: subtract the per-pixel mean image")
    ten_crop: bool = Field(True, description="paper recipe: also report the 10-crop test metrics")
    max_memory_mb: Int = Field(4096, ge=0, le=2 ** 24, description="larger image folders are streamed")
    test_limit: OptionalInt = Field(None, ge=2, le=MAX_COUNT, description="test images scored")
    train_eval_images: Int = Field(0, ge=0, le=MAX_COUNT, description="training images (fixed, un-augmented) scored "
                                   "in inference mode each epoch, as train_eval_* (0: none)")

    @pydantic.model_validator(mode="after")
    def _folder(self) -> "DataConfig":
        if self.dataset == "folder" and not self.data_dir:
            raise ValueError("dataset 'folder' needs a folder: pass --data-dir PATH (class sub-folders, or "
                             "train/ and test/ each with class sub-folders)")
        return self


@section("train")
class TrainConfig:
    """How the network learns. Defaults follow the paper: SGD, momentum 0.9, lr 0.01, /10 on plateau."""

    epochs: Int = Field(30, ge=1, le=MAX_EPOCHS, description="passes over the training set")
    batch_size: Int = Field(128, ge=1, le=2 ** 20, description="images per step (global when distributed)")
    learning_rate: Float = Field(0.01, gt=0.0, le=10.0, description="SGD's initial learning rate")
    momentum: Float = Field(0.9, ge=0.0, lt=1.0, description="SGD's momentum")
    schedule: Literal[SCHEDULES] = Field("plateau", description="lr/10 on a plateau (paper) or at 1/2, 3/4 (step)")
    plateau_patience: Int = Field(3, ge=1, le=MAX_EPOCHS, description="epochs without progress before lr/10")
    seed: Seed = Field(0, description="the seed of weights, augmentation and shuffling")
    precision: Literal[PRECISIONS] = Field("float32", description="Keras dtype policy")
    jit_compile: Annotated[Literal[JIT], Choice] = Field("auto", description="XLA (auto: as Keras decides)")
    distribute: Literal[DISTRIBUTE] = Field("none", description="data parallelism engine")
    deterministic: bool = Field(False, description="bit-identical reruns: the backends' deterministic kernels")


@section("")
class Config:
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    experiment: str = Field("alexnet-keras", description="MLflow experiment name")
    run_name: Annotated[str | None, Unset] = Field(None, description="MLflow run name")
    resume: bool = Field(True, description="continue an interrupted run of the same config and data")
    checkpoint_dir: str = Field("checkpoints", description="per-run checkpoints, CHECKPOINT_DIR/<run id>/")
    register: Annotated[str | None, Unset] = Field(None, description="register the model as NAME@champion")
    system_metrics: bool = Field(True, description="CPU, memory, disk, network (and GPU) as system/... metrics")

    def flat(self) -> dict[str, Any]:
        """Every leaf as {name: value}: the MLflow params and the CLI flags."""
        return {**dataclasses.asdict(self.model), **dataclasses.asdict(self.data), **dataclasses.asdict(self.train),
                **{name: getattr(self, name) for name in TOP_LEVEL}}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def outcome_values(self) -> dict[str, Any]:   # not naming, resuming, registering, monitoring
        # train_eval_images only adds metrics: off (0, the default), it leaves earlier runs' digests as they were.
        return {k: v for k, v in self.flat().items() if k not in TOP_LEVEL and (k != "train_eval_images" or v)}

    def digest(self) -> str:
        """A hash of what changes a run's outcome: finished runs are skipped and interrupted ones resumed by it."""
        return hashlib.sha256(json.dumps(self.outcome_values(), sort_keys=True).encode()).hexdigest()[:16]

    def override(self, values: Mapping[str, Any], *, source: str = "overrides") -> "Config":
        """A copy with `values` applied; keys are leaf names or `section.name`, values typed or strings."""
        return from_dict(values, base=self, source=source)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
# The main job (`alexnet-keras train` without --config, `mlflow run .`, experiments/cifar10.yaml): the paper's
# toggles at 32 px on CIFAR-10 but Glorot init and a cosine schedule, which few-epoch runs need (docs/results.md).
MAIN_JOB = Config(model=ModelConfig(variant="cifar", init="keras"), train=TrainConfig(schedule="cosine",
                                                                                      learning_rate=0.02))
TOP_LEVEL = ("experiment", "run_name", "resume", "checkpoint_dir", "register", "system_metrics")


def leaf_fields() -> dict[str, tuple[str | None, Any]]:
    """{leaf name: (section or None, its pydantic FieldInfo: annotation, default, description)}."""
    out = {name: (section, info) for section, cls in SECTIONS.items()
           for name, info in cls.__pydantic_fields__.items()}
    return {**out, **{name: (None, Config.__pydantic_fields__[name]) for name in TOP_LEVEL}}


def check_read(config: Config, options: Sequence[str], where: str) -> None:
    """Refuse a study axis or sweep dimension (`where`) over `options` that the data of `config` never read."""
    unread = {option: f"{key} {value!r}" for (key, value), names in IGNORED_BY.items()
              if getattr(config.data, key) == value for option in names}
    if options and all(option in unread for option in options):
        why = unread[options[0]]
        raise ConfigError(f"{where} varies {', '.join(options)}, which {why} does not read: its values would train "
                          f"identical runs. Drop it, or set `{why.split()[0]}` in `base` to one that reads it.")


def from_dict(values: Mapping[str, Any], *, base: Config | None = None, source: str = "config") -> Config:
    """Build a Config from nested ({model: {lrn: false}}) and/or flat ({lrn: "false"}) keys."""
    base = base or Config()
    leaves = leaf_fields()
    updates: dict[str | None, dict[str, Any]] = {None: {}, **{s: {} for s in SECTIONS}}
    flat = []
    for key, raw in values.items():
        if key in SECTIONS and not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: '{key}' must be a mapping of {key} options; got {raw!r}.")
        flat += [(f"{key}.{k}", v) for k, v in raw.items()] if key in SECTIONS else [(str(key), raw)]
    for key, raw in flat:
        section, _, name = key.rpartition(".")
        if name not in leaves or (section and leaves[name][0] != section):
            names = sorted(leaves)
            raise ConfigError(f"{source}: unknown option {key!r}.{did_you_mean(name, names)} Known options: "
                              f"{', '.join(names)}.")
        updates[leaves[name][0]][name] = raw
    try:
        sections = {s: dataclasses.replace(getattr(base, s), **updates[s]) for s in SECTIONS}
        config = dataclasses.replace(base, **sections, **updates[None])
    except ConfigError as err:
        raise ConfigError("\n".join(f"{source}: {line}" for line in str(err).splitlines())) from None
    check_memory(config)
    return config


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    parameters: int     # weights of the model
    weights: int        # bytes of the weights, their gradients and SGD's momentum
    activations: int    # bytes of one batch's layer outputs and their gradients
    images: int         # bytes of the images held in memory (synthetic: the peak while generating them)
    batch_size: int

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.images


def memory_estimate(config: Config) -> MemoryEstimate:
    """What a training run needs at least: 3 float32 copies of the weights (gradients, momentum), one batch's
    layer outputs and their gradients, the images held in memory (folders are streamed)."""
    model, data = config.model, config.data
    num_classes = {"synthetic": data.synthetic_classes, "cifar10": 10}.get(data.dataset, 1000)
    parameters, batch = model.parameter_count(num_classes), config.train.batch_size
    side = data.stored_size if data.recipe == "paper" else model.input_size
    images = {"synthetic": _SYNTHETIC_PEAK_BYTES * data.synthetic_samples * side * side * 3,
              "cifar10": 60_000 * 32 * 32 * 3}.get(data.dataset, 0)
    return MemoryEstimate(parameters=parameters, weights=3 * _FLOAT_BYTES * parameters, images=images,
                          activations=2 * _FLOAT_BYTES * batch * model.activation_count(num_classes),
                          batch_size=batch)


def memory_bound() -> int | None:
    """Bytes of memory this process can have: physical memory, or its cgroup's limit when lower."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):   # not a POSIX system
        return None
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        limit = Path(limit_file).read_text().strip() if Path(limit_file).is_file() else ""
        total = min(total, int(limit)) if limit.isdigit() else total
    return total


def check_memory(config: Config, bound: int | None = None) -> None:
    """Refuse `config` beyond `bound` (default: `memory_bound()`), naming its largest part and the fix."""
    bound = memory_bound() if bound is None else bound
    est = memory_estimate(config)
    if bound is None or est.total <= bound:
        return
    parts = {"weights": est.weights, "activations": est.activations, "images": est.images}
    largest = max(parts, key=parts.get)
    room = max(0, bound - (est.total - parts[largest]))   # what the largest part may take
    if largest == "images":
        fits = int(room // (est.images / config.data.synthetic_samples))
        fix = (f"use --synthetic-samples {fits} or fewer" if fits >= 16 else "use fewer --synthetic-samples") + (
            ", or a smaller --stored-size" if config.data.recipe == "paper" else ", or a smaller --image-size")
    elif largest == "activations":
        fits = int(room // (est.activations / est.batch_size))
        fix = (f"use --batch-size {fits} or less" if fits >= 1 else "use a smaller --batch-size") + \
            ", a smaller --image-size or a smaller --width"
    else:
        fix = (f"use a smaller --image-size (fc6's weights grow with its square; the {config.model.variant} "
               f"variant's own is {NATIVE_IMAGE_SIZE[config.model.variant]}) or a smaller --width")
    raise ConfigError(
        f"this run would need about {_bytes(est.total)} of memory, more than the {_bytes(bound)} this machine "
        f"has (physical memory, or the cgroup limit if lower): weights, gradients and momentum of "
        f"{est.parameters:,} parameters {_bytes(est.weights)}, activations of a batch of {est.batch_size} "
        f"{_bytes(est.activations)}, images {_bytes(est.images)}. Fix: {fix}.")


def _bytes(count: float) -> str:
    unit = 0
    while count >= 1024 and unit < 5:
        count, unit = count / 1024, unit + 1
    return f"{count:.0f} B" if unit == 0 else f"{count:.1f} {('KiB', 'MiB', 'GiB', 'TiB', 'PiB')[unit - 1]}"


def load_yaml(path: str | Path, kind: str = "config") -> dict[str, Any]:
    """An experiment (config), study or sweep file as a mapping, bounded in size, nesting and alias expansion."""
    import yaml

    path = Path(path)
    where = f"{kind} file {str(path)!r}"
    if path.is_dir() or not path.is_file():   # a FIFO or device would block the read, or never end
        raise ConfigError(f"{where} " + ("is a folder, not a file" if path.is_dir() else "does not exist"
                                         if not path.exists() else "is not a regular file")
                          + ". Pass the path of a YAML file, e.g. experiments/cifar10.yaml.")
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
        _yaml_values(node, {}, set(), where)
        data = loader.construct_document(node)
    except yaml.YAMLError as err:   # in one line (PyYAML's own text spans several)
        mark, context = getattr(err, "problem_mark", None), getattr(err, "context", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise ConfigError(f"{where} is not valid YAML{at}: {problem}" + (f" ({context})" if context else "")
                          ) from None
    except RecursionError:
        raise ConfigError(f"{where} is nested too deeply to be an options file.") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a mapping of options; got {type(data).__name__}.")
    return data


def _yaml_values(node: Any, memo: dict[int, int], open_nodes: set[int], where: str) -> int:
    """The values under `node` with its aliases expanded, counted once per node; repeated keys refused."""
    if id(node) in memo:
        return memo[id(node)]
    if id(node) in open_nodes:
        raise ConfigError(f"{where} has an alias (*name) inside the value it names, which would expand "
                          f"forever. Remove it.")
    open_nodes.add(id(node))
    children = node.value if isinstance(node.value, list) else []
    seen: set[tuple[str, str]] = set()
    for key in [key for key, _ in children if key.id == "scalar"] if node.id == "mapping" else []:
        if (key.tag, key.value) in seen:   # PyYAML would keep the last one without a word
            raise ConfigError(f"{where} has the key {key.value!r} twice in one mapping (again at line "
                              f"{key.start_mark.line + 1}). Keep one.")
        seen.add((key.tag, key.value))
    children = [part for child in children for part in (child if isinstance(child, tuple) else (child,))]
    memo[id(node)] = 1 + sum(_yaml_values(child, memo, open_nodes, where) for child in children)
    open_nodes.discard(id(node))
    if memo[id(node)] > YAML_MAX_NODES:
        raise ConfigError(f"{where} holds more than {YAML_MAX_NODES:,} values once its aliases (*name) are "
                          f"expanded; an options file needs a few hundred. Remove the aliases that repeat "
                          f"other aliases.")
    return memo[id(node)]


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """What `train [--config path]` trains: the main job, or the paper's defaults then `path`; then `overrides`."""
    config = from_dict(load_yaml(path), source=str(path)) if path else MAIN_JOB
    return from_dict(overrides or {}, base=config, source="command line")


def did_you_mean(word: str, known: list[str] | tuple[str, ...], n: int = 3) -> str:
    """" Did you mean a, b?" with the names of `known` closest to `word`, or "": every unknown name's hint."""
    import difflib

    close = difflib.get_close_matches(word, list(known), n=n)
    return f" Did you mean {', '.join(close)}?" if close else ""


OptionsT = TypeVar("OptionsT", bound="Options")


class Options(pydantic.BaseModel):
    """Base of every validated model outside the Config tree: unknown keys refused, frozen."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def validated(model: type[OptionsT], data: Mapping[str, Any], where: str) -> OptionsT:
    """`model` built from `data`; errors as one ConfigError naming each value's path under `where`."""
    try:
        return model.model_validate(dict(data))
    except pydantic.ValidationError as err:
        raise explain(err, f"{where}: ", model) from None
