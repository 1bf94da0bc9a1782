"""Sweep files (experiments/sweep*.yaml): the tuner, its budget and the search space (a discriminated
union of float, int, choice and boolean dimensions), checked against the config before any trial runs."""

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Mapping, Union

import keras_tuner
from pydantic import BeforeValidator, Field

from ..config import IGNORED_BY, Config, ConfigError, Float, Int, Options, check_read, leaf_fields, validated
from .specfile import SpecKeys, read_spec

OBJECTIVES = tuple(p + m for p in ("val_", "") for m in ("accuracy", "loss", "top5_accuracy"))


class _Range(Options):
    sampling: str = Field("linear", description="linear, log or reverse_log (keras-tuner's)")
    numeric: ClassVar[bool] = True


class FloatParam(_Range):
    type: Literal["float"]
    min: Float
    max: Float
    step: Float | None = Field(None, gt=0.0)


class IntParam(_Range):
    type: Literal["int"]
    min: Int
    max: Int
    step: Int | None = Field(None, gt=0)


class ChoiceParam(Options):
    type: Literal["choice"]
    values: tuple[Any, ...] = Field(description="the values to try")
    numeric: ClassVar[bool] = False


class BooleanParam(Options):
    type: Literal["boolean"]
    numeric: ClassVar[bool] = False


Param = Annotated[Union[FloatParam, IntParam, ChoiceParam, BooleanParam], Field(discriminator="type")]


def declare(hp: keras_tuner.HyperParameters, name: str, param: Any) -> Any:
    """Register the dimension on `hp` (first call) and return the trial's value."""
    if param.type == "choice":
        return hp.Choice(name, list(param.values))
    if param.type == "boolean":
        return hp.Boolean(name)
    return (hp.Float if param.type == "float" else hp.Int)(name, param.min, param.max, step=param.step,
                                                           sampling=param.sampling)


class Budget(Options):
    max_trials: Int = Field(10, ge=1, description="trials in all; a bigger value continues a finished sweep")
    epochs: Int | None = Field(None, ge=1, description="epochs per trial (hyperband: the most a trial gets)")
    factor: Int = Field(3, ge=2, description="hyperband's reduction factor")
    hyperband_iterations: Int = Field(1, ge=1, description="hyperband's brackets")
    max_failed_trials: Int = Field(3, ge=1, description="consecutive failed trials that stop the sweep")
    num_initial_points: Int | None = Field(None, ge=1, description="bayesian only: random trials first")


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
    tuner: Literal["random", "bayesian", "hyperband"] = "random"
    objective: Annotated[Objective, BeforeValidator(lambda v: {"name": v} if isinstance(v, str) else v)] = Objective()
    budget: Budget = Budget()
    seed: Int = Field(0, ge=0, description="the tuner's seed")
    directory: str = Field("tuner", description="keras-tuner state folder")
    search_space: Annotated[dict[str, Param], BeforeValidator(_shorthand)] = Field(
        min_length=1, description="config options mapped to ranges or choices, e.g. {learning_rate: {type: "
        "float, min: 1e-3, max: 1e-1, sampling: log}}")
    final_model: Literal["auto", "retrain", "none"] = "auto"


@dataclass(frozen=True)
class Sweep:
    """A sweep file as validated (`spec`, with the flags and derived defaults applied) and its base config."""

    spec: SweepKeys
    base: Config
    source: str = "sweep"

    name = property(lambda self: self.spec.name)
    objective = property(lambda self: self.spec.objective.name)
    direction = property(lambda self: self.spec.objective.direction)
    max_trials = property(lambda self: self.spec.budget.max_trials)
    names = property(lambda self: tuple(self.spec.search_space))
    project_dir = property(lambda self: Path(self.spec.directory) / self.spec.name)

    def param(self, name: str) -> Any:
        return self.spec.search_space[name]

    def trial_config(self, values: Mapping[str, Any], **extra: Any) -> Config:
        """The base config with a trial's values (hyperband's `tuner/...` entries are ignored)."""
        chosen = {k: v for k, v in values.items() if k in self.names}
        return self.base.override({**chosen, **extra}, source=f"sweep {self.name!r}")

    def digest(self) -> str:
        """Identifies the search: not the budget (hyperband's shape aside), so a bigger one continues it."""
        search = self.spec.model_dump(include={"name", "tuner", "objective", "seed", "search_space"},
                                      exclude_none=True)
        if self.spec.tuner == "hyperband":
            search.update(self.spec.budget.model_dump(include={"factor", "hyperband_iterations"}))
        text = json.dumps({**search, "base": self.base.outcome_values()}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:   # what `--dry-run` prints and the parent logs as sweep/sweep.yaml
        return {**self.spec.model_dump(exclude={"base", "base_config"}), "base": self.base.outcome_values(),
                "digest": self.digest()}


def _check_param(name: str, param: Any, base: Config, tuner: str, source: str) -> Any:
    """A dimension checked: its option exists, can be searched, fits; keras-tuner takes it; its values are valid."""
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
    kind = _kind(name)
    allowed = {bool: ("boolean", "choice"), int: ("int", "choice"), float: ("float", "choice")}.get(kind, ("choice",))
    if param.type not in allowed:
        kind_name = {bool: "true/false", int: "an integer", float: "a number"}.get(kind, "a string")
        raise ConfigError(f"{where}: type {param.type!r} does not fit {section}.{name}, which is {kind_name}; use "
                          f"type {' or '.join(allowed)}.")
    if param.type == "choice":   # each value parsed as the option parses it; every one makes a valid config
        values = [base.override({name: v}, source=f"{where}: {v!r} is not a valid value").flat()[name]
                  for v in param.values]
        repeated = next((v for i, v in enumerate(values) if v in values[:i]), None)
        if repeated is not None:
            raise ConfigError(f"{where}: {repeated!r} is listed twice.")
        param = param.model_copy(update={"values": tuple(values)})
    elif param.numeric and param.min == param.max:
        raise ConfigError(f"{where}: min equals max ({param.min}); a fixed value belongs in `base`.")
    try:   # keras-tuner's own checks: empty choices, min > max, log sampling from 0, steps ...
        declare(keras_tuner.HyperParameters(), name, param)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where}: {err}") from None
    for value in (param.min, param.max) if param.numeric else ():
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
    space = {name: _check_param(name, p, base, spec.tuner, source) for name, p in spec.search_space.items()}
    for name in space if not {key for key, _ in IGNORED_BY} & set(space) else ():   # none searched: all fixed
        check_read(base, [name], f"{source}: search_space.{name}")
    # The points of a finite space, counted (float and log-stepped dimensions count as unbounded).
    sizes = [len(p.values) if p.type == "choice" else 2 if p.type == "boolean" else (p.max - p.min) // (
        p.step or 1) + 1 if p.type == "int" and p.sampling == "linear" else math.inf for p in space.values()]
    if spec.tuner != "hyperband" and (points := math.prod(sizes)) < budget.max_trials:
        raise ConfigError(f"{source}: the search space has {points} distinct points ({' x '.join(map(str, sizes))}) "
                          f"but budget.max_trials is {budget.max_trials}: keras-tuner would stop after {points} "
                          f"trials. Set max_trials (or --max-trials) to at most {points}, or widen the search space.")
    # Bayesian optimisation's random start: keras-tuner's default (3 x dimensions) can reach max_trials,
    # and then the model never chooses a trial; the default here stays below.
    where, initial = f"{source}: budget.num_initial_points", budget.num_initial_points
    if spec.tuner != "bayesian" and initial is not None:
        raise ConfigError(f"{where} applies to tuner: bayesian only (this sweep's tuner is {spec.tuner}).")
    if spec.tuner == "bayesian":
        initial = initial if initial is not None else max(2, min(3 * len(space), budget.max_trials // 2))
        if initial >= budget.max_trials:
            raise ConfigError(f"{where} is {initial}, but budget.max_trials is {budget.max_trials}: every trial "
                              f"would be one of the random initial points, so the search would be random, not "
                              f"Bayesian. Raise max_trials above num_initial_points (or lower it), or set `tuner: "
                              f"random` if a random search is what you want.")
    objective = spec.objective.model_copy(update={"direction": spec.objective.direction or (
        "min" if spec.objective.name.endswith("loss") else "max")})
    spec = spec.model_copy(update={
        "experiment": base.experiment, "search_space": space, "objective": objective, "directory": directory
        or spec.directory, "budget": budget.model_copy(update={"num_initial_points": initial})})
    return Sweep(spec, base, source)
