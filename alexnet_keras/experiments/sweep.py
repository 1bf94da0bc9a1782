"""Sweep files (experiments/sweep*.yaml): the tuner, its budget and the search space (a discriminated
union of float, int, choice and boolean dimensions), checked against the config before any trial runs."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Union

import keras_tuner
from pydantic import BeforeValidator, Field, PrivateAttr

from ..config import Config, ConfigError, Options, leaf_fields, parse_value, validated
from .specfile import SpecKeys, read_spec

TUNERS = ("random", "bayesian", "hyperband")
FINAL_MODEL = ("auto", "retrain", "none")
OBJECTIVES = tuple(p + m for p in ("val_", "") for m in ("accuracy", "loss", "top5_accuracy"))
DEFAULT_DIRECTORY = "tuner"


class _Dimension(Options):
    _name: str = PrivateAttr("")   # the search_space key, set once read

    @property
    def name(self) -> str:
        return self._name

    @property
    def numeric(self) -> bool:
        return self.type in ("float", "int")

    def describe(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)

    def short(self) -> str:
        """A one-line form for the parent run's params: `float[0.001, 0.1] log`."""
        return self.type


class _Range(_Dimension):
    sampling: str = Field("linear", description="linear, log or reverse_log (keras-tuner's)")

    def declare(self, hp: keras_tuner.HyperParameters) -> Any:
        """Register the dimension on `hp` (first call) and return the trial's value."""
        kind = hp.Float if self.type == "float" else hp.Int
        return kind(self.name, self.min, self.max, step=self.step, sampling=self.sampling)

    def short(self) -> str:
        step = f" step {self.step}" if self.step is not None else ""
        return f"{self.type}[{self.min}, {self.max}] {self.sampling}{step}"


class FloatParam(_Range):
    type: Literal["float"]
    min: float
    max: float
    step: float | None = Field(None, gt=0.0)


class IntParam(_Range):
    type: Literal["int"]
    min: int
    max: int
    step: int | None = Field(None, gt=0)


class ChoiceParam(_Dimension):
    type: Literal["choice"]
    values: tuple[Any, ...] = Field(description="the values to try")

    def declare(self, hp: keras_tuner.HyperParameters) -> Any:
        return hp.Choice(self.name, list(self.values))

    def short(self) -> str:
        return "choice" + json.dumps(list(self.values))


class BooleanParam(_Dimension):
    type: Literal["boolean"]

    def declare(self, hp: keras_tuner.HyperParameters) -> Any:
        return hp.Boolean(self.name)


Param = Annotated[Union[FloatParam, IntParam, ChoiceParam, BooleanParam], Field(discriminator="type")]


class Budget(Options):
    max_trials: int = Field(10, ge=1, description="trials in all; a bigger value continues a finished sweep")
    epochs: int | None = Field(None, ge=1, description="epochs per trial (hyperband: the most a trial gets)")
    factor: int = Field(3, ge=2, description="hyperband's reduction factor")
    hyperband_iterations: int = Field(1, ge=1, description="hyperband's brackets")
    max_failed_trials: int = Field(3, ge=1, description="consecutive failed trials that stop the sweep")
    num_initial_points: int | None = Field(None, ge=1, description="bayesian only: random trials first")


class Objective(Options):
    name: Literal[OBJECTIVES] = "val_accuracy"
    direction: Literal["min", "max"] | None = None


def _kind(name: str) -> Any:
    """bool, int, float or a Literal/str: the type of a config leaf, with `X | None` unwrapped."""
    annotation = leaf_fields()[name][1].annotation
    return next((a for a in getattr(annotation, "__args__", ()) if a is not type(None)), annotation) \
        if type(annotation).__name__ == "UnionType" else annotation


def _shorthand(space: Any) -> Any:
    """`name: [a, b]` is a choice; a dimension without `type` takes its option's (or choice, with values)."""
    if not isinstance(space, Mapping):
        return space
    default = {bool: "boolean", int: "int", float: "float"}
    return {name: {"type": "choice", "values": spec} if isinstance(spec, list) else
            {"type": "choice" if "values" in spec else default.get(_kind(name) if name in leaf_fields() else str,
                                                                   "choice"), **spec}
            if isinstance(spec, Mapping) and "type" not in spec else spec for name, spec in space.items()}


class SweepKeys(SpecKeys):
    tuner: Literal[TUNERS] = "random"
    objective: Annotated[Objective, BeforeValidator(lambda v: {"name": v} if isinstance(v, str) else v)] = Objective()
    budget: Budget = Budget()
    seed: int = Field(0, ge=0, description="the tuner's seed")
    directory: str = Field(DEFAULT_DIRECTORY, description="keras-tuner state folder")
    search_space: Annotated[dict[str, Param], BeforeValidator(_shorthand)] = Field(min_length=1, description="config options mapped to ranges or "
                                           "choices, e.g. {learning_rate: {type: float, min: 1e-3, max: 1e-1, "
                                           "sampling: log}}")
    final_model: Literal[FINAL_MODEL] = "auto"


@dataclass(frozen=True)
class Sweep:
    name: str
    tuner: str
    objective: str
    direction: str                  # "max" or "min"
    max_trials: int
    base: Config
    space: tuple[Any, ...]
    seed: int = 0
    directory: str = DEFAULT_DIRECTORY
    factor: int = 3
    hyperband_iterations: int = 1
    max_failed_trials: int = 3
    num_initial_points: int | None = None   # bayesian only: random trials before the model guides
    final_model: str = "auto"
    description: str = ""
    source: str = "sweep"

    @property
    def project_dir(self) -> Path:
        return Path(self.directory) / self.name

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.space)

    def param(self, name: str) -> Any:
        return next(p for p in self.space if p.name == name)

    def trial_config(self, values: Mapping[str, Any], **extra: Any) -> Config:
        """The base config with a trial's values (hyperband's `tuner/...` entries are ignored)."""
        chosen = {k: v for k, v in values.items() if k in self.names}
        return self.base.override({**chosen, **extra}, source=f"sweep {self.name!r}")

    def describe(self) -> dict[str, Any]:
        """Everything that defines the search (not the budget): what the digest is computed from."""
        out = {
            "name": self.name, "tuner": self.tuner,
            "objective": {"name": self.objective, "direction": self.direction}, "seed": self.seed,
            "base": self.base.outcome_values(),
            "search_space": {p.name: p.describe() for p in self.space},
        }
        if self.tuner == "hyperband":
            out.update(factor=self.factor, hyperband_iterations=self.hyperband_iterations)
        return out

    def digest(self) -> str:
        """Identifies the search; the budget (`max_trials`, `num_initial_points`: keras-tuner keeps the
        latter in its state) is left out so a bigger budget continues the sweep."""
        text = json.dumps(self.describe(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {**self.describe(), "experiment": self.base.experiment, "final_model": self.final_model,
                "budget": {"max_trials": self.max_trials, "epochs": self.base.train.epochs,
                           "max_failed_trials": self.max_failed_trials,
                           **({"num_initial_points": self.num_initial_points} if self.tuner == "bayesian" else {})},
                "directory": self.directory, "digest": self.digest()}


def _check_param(name: str, param: Any, base: Config, tuner: str, source: str) -> Any:
    """A dimension of the search space: the option exists, can be searched, fits the dimension's type,
    keras-tuner takes the dimension (its message gets the YAML path), and every value it can take
    makes a valid config."""
    where = f"{source}: search_space.{name}"
    if name not in leaf_fields():
        base.override({name: None}, source=f"{source}: search_space")   # raises "unknown option ..."
    section = leaf_fields()[name][0]
    if section is None:
        raise ConfigError(f"{where}: {name!r} names the run, not the network or its training; it cannot "
                          f"be searched.")
    if tuner == "hyperband" and name == "epochs":
        raise ConfigError(f"{where}: hyperband chooses the epochs itself (budget.epochs is its maximum); "
                          f"remove epochs from the search space.")
    kind, full = _kind(name), f"{section}.{name}"
    allowed = {bool: ("boolean", "choice"), int: ("int", "choice"), float: ("float", "choice")}.get(kind, ("choice",))
    if param.type not in allowed:
        kind_name = {bool: "true/false", int: "an integer", float: "a number"}.get(kind, "a string")
        raise ConfigError(f"{where}: type {param.type!r} does not fit {full}, which is {kind_name}; use type "
                          f"{' or '.join(allowed)}.")
    if param.type == "choice":
        values = [parse_value(f"{where}: {item!r} is not a valid value: {full}", item, kind) for item in param.values]
        repeated = next((v for i, v in enumerate(values) if v in values[:i]), None)
        if repeated is not None:
            raise ConfigError(f"{where}: {repeated!r} is listed twice.")
        param = param.model_copy(update={"values": tuple(values)})
    elif param.numeric and param.min == param.max:
        raise ConfigError(f"{where}: min equals max ({param.min}); a fixed value belongs in `base`.")
    param = param.model_copy()
    param._name = name
    try:   # keras-tuner's own checks: empty choices, min > max, log sampling from 0, steps ...
        param.declare(keras_tuner.HyperParameters())
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where}: {err}") from None
    for value in param.values if param.type == "choice" else (True, False) if param.type == "boolean" else (
            param.min, param.max):
        base.override({name: value}, source=f"{where}: {value!r} is not a valid value")
    return param


def load_sweep(path: str | Path, *, max_trials: int | None = None, directory: str | None = None) -> Sweep:
    """Read and validate a sweep file; nothing is built, read or logged."""
    spec, base = read_spec(path, SweepKeys, "sweep")
    source = str(path)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", spec.name):
        raise ConfigError(f"{source}: name must be letters, digits, '.', '_' or '-' (it names a folder "
                          f"and the parent run); got {spec.name!r}.")
    budget = spec.budget if max_trials is None else validated(   # --max-trials instead of the file's
        Budget, {**spec.budget.model_dump(exclude_unset=True), "max_trials": max_trials}, f"{source} (--max-trials)")
    if base.train.distribute != "none" or "distribute" in spec.search_space:
        raise ConfigError(f"{source}: sweeps train each trial on one device; leave `distribute` at none "
                          f"(run several workers instead, see docs/sweeps.md).")
    base = base.override({"experiment": spec.experiment or base.experiment, "epochs": budget.epochs or
                          base.train.epochs})
    space = tuple(_check_param(name, p, base, spec.tuner, source) for name, p in spec.search_space.items())
    objective = spec.objective
    return Sweep(name=spec.name, tuner=spec.tuner, objective=objective.name, max_trials=budget.max_trials,
                 direction=objective.direction or ("min" if objective.name.endswith("loss") else "max"),
                 base=base, space=space, seed=spec.seed, directory=directory or spec.directory,
                 factor=budget.factor, hyperband_iterations=budget.hyperband_iterations,
                 max_failed_trials=budget.max_failed_trials, final_model=spec.final_model,
                 num_initial_points=_initial_points(budget, spec.tuner, len(space), source),
                 description=spec.description, source=source)


def _initial_points(budget: Budget, tuner: str, dimensions: int, source: str) -> int | None:
    """Bayesian optimisation's random start. keras-tuner's default (3 x dimensions) can exceed
    max_trials, and then no trial is ever chosen by the model: the default here stays below."""
    where, points = f"{source}: budget.num_initial_points", budget.num_initial_points
    if tuner != "bayesian":
        if points is not None:
            raise ConfigError(f"{where} applies to tuner: bayesian only (this sweep's tuner is {tuner}).")
        return None
    points = points if points is not None else max(2, min(3 * dimensions, budget.max_trials // 2))
    if points >= budget.max_trials:
        raise ConfigError(f"{where} is {points}, but budget.max_trials is {budget.max_trials}: every trial would "
                          f"be one of the random initial points, so the search would be random, not Bayesian. "
                          f"Raise max_trials above num_initial_points (or lower it), or set `tuner: random` "
                          f"if a random search is what you want.")
    return points
