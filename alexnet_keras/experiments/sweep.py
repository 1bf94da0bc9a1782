"""Sweep files (experiments/sweep*.yaml): the tuner, its budget and the search space, checked
against the config before any trial runs."""

from __future__ import annotations

import hashlib
import json
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import keras_tuner

from ..config import SECTIONS, Config, ConfigError, leaf_fields, parse_value
from .specfile import SpecFile, check_keys, read_spec, spec_from_dict

TUNERS = ("random", "bayesian", "hyperband")
PARAM_TYPES = ("float", "int", "choice", "boolean")
FINAL_MODEL = ("auto", "retrain", "none")
OBJECTIVES = tuple(p + m for p in ("val_", "") for m in ("accuracy", "loss", "top5_accuracy"))
# The keys of a sweep file besides those every study and sweep file has (specfile.COMMON_KEYS).
SWEEP_KEYS = ("tuner", "objective", "budget", "seed", "directory", "search_space", "final_model")
BUDGET_KEYS = ("max_trials", "epochs", "factor", "hyperband_iterations", "max_failed_trials", "num_initial_points")
PARAM_KEYS = ("type", "min", "max", "step", "sampling", "values")
DEFAULT_DIRECTORY = "tuner"



# ---------------------------------------------------------------------------------------------
# The sweep file
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Param:
    """One dimension of the search space: a config option and the values it may take."""

    name: str
    type: str                       # float | int | choice | boolean
    min: float | int | None = None
    max: float | int | None = None
    step: float | int | None = None
    sampling: str = "linear"
    values: tuple = ()

    def declare(self, hp: keras_tuner.HyperParameters) -> Any:
        """Register the dimension on `hp` (first call) and return the trial's value."""
        if self.type == "float":
            return hp.Float(self.name, self.min, self.max, step=self.step, sampling=self.sampling)
        if self.type == "int":
            return hp.Int(self.name, self.min, self.max, step=self.step, sampling=self.sampling)
        if self.type == "boolean":
            return hp.Boolean(self.name)
        return hp.Choice(self.name, list(self.values))

    @property
    def numeric(self) -> bool:
        return self.type in ("float", "int")

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        if self.numeric:
            out.update(min=self.min, max=self.max, sampling=self.sampling)
            if self.step is not None:
                out["step"] = self.step
        elif self.type == "choice":
            out["values"] = list(self.values)
        return out

    def short(self) -> str:
        """A one-line form for the parent run's params: `float[0.001, 0.1] log`."""
        if self.numeric:
            step = f" step {self.step}" if self.step is not None else ""
            return f"{self.type}[{self.min}, {self.max}] {self.sampling}{step}"
        if self.type == "boolean":
            return "boolean"
        return "choice" + json.dumps(list(self.values))


@dataclass(frozen=True)
class Sweep:
    name: str
    tuner: str
    objective: str
    direction: str                  # "max" or "min"
    max_trials: int
    base: Config
    space: tuple[Param, ...]
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

    def param(self, name: str) -> Param:
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
            "base": self.base.outcome_values(),   # new config fields at their default change nothing
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


def _positive_int(where: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where} must be an integer >= {minimum}; got {value!r}.")
    return value


def _annotation(name: str) -> Any:
    section, _ = leaf_fields()[name]
    return typing.get_type_hints(SECTIONS[section] if section else Config)[name]


def _kind(annotation: Any) -> type:
    """bool, int, float or str: the type of a leaf, with `X | None` unwrapped."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def _check_value(base: Config, name: str, value: Any, where: str) -> None:
    try:
        base.override({name: value})
    except ConfigError as err:
        raise ConfigError(f"{where}: {value!r} is not a valid value: {err}") from None


def _parse_param(name: str, spec: Any, base: Config, tuner: str, source: str) -> Param:
    """One search-space entry: which option, of which type; keras-tuner checks the dimension itself
    (its message gets the YAML path), and every value it can take must make a valid config."""
    where = f"{source}: search_space.{name}"
    leaves = leaf_fields()
    if name not in leaves:
        base.override({name: None}, source=f"{source}: search_space")   # raises "unknown option ..."
    section, _ = leaves[name]
    if section is None:
        raise ConfigError(f"{where}: {name!r} names the run, not the network or its training; it cannot "
                          f"be searched.")
    if tuner == "hyperband" and name == "epochs":
        raise ConfigError(f"{where}: hyperband chooses the epochs itself (budget.epochs is its maximum); "
                          f"remove epochs from the search space.")
    annotation = _annotation(name)
    kind = _kind(annotation)
    full = f"{section}.{name}"
    if isinstance(spec, list):
        spec = {"type": "choice", "values": spec}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where} must be a mapping such as {{type: choice, values: [a, b]}} or "
                          f"{{type: float, min: 0.001, max: 0.1, sampling: log}}, or a list of values; "
                          f"got {spec!r}.")
    check_keys(spec, PARAM_KEYS, where)
    allowed = {bool: ("boolean", "choice"), int: ("int", "choice"), float: ("float", "choice")}.get(
        kind, ("choice",))
    kind_name = {bool: "true/false", int: "an integer", float: "a number"}.get(kind, "a string")
    ptype = spec.get("type")
    if ptype is None:
        ptype = "choice" if "values" in spec else allowed[0]
    if ptype not in PARAM_TYPES:
        raise ConfigError(f"{where}: type must be one of {', '.join(PARAM_TYPES)}; got {ptype!r}.")
    if ptype not in allowed:
        raise ConfigError(f"{where}: type {ptype!r} does not fit {full}, which is {kind_name}; use type "
                          f"{' or '.join(allowed)}.")
    extra = sorted(set(spec) - ({"type", "min", "max", "step", "sampling"} if ptype in ("float", "int")
                                else {"type", "values"} if ptype == "choice" else {"type"}))
    if extra:
        raise ConfigError(f"{where}: {', '.join(extra)} cannot be used with type {ptype}.")

    if ptype == "boolean":
        param = Param(name, "boolean")
        values: list[Any] = [True, False]
    elif ptype == "choice":
        raw = spec.get("values")
        if not isinstance(raw, list):
            raise ConfigError(f"{where}: values must be a list; got {raw!r}.")
        values = []
        for item in raw:
            if item is None:
                raise ConfigError(f"{where}: null is not a searchable value (keras-tuner choices are "
                                  f"numbers, strings or booleans).")
            try:
                value = parse_value(full, item, annotation)
            except ConfigError as err:
                raise ConfigError(f"{where}: {item!r} is not a valid value: {err}") from None
            if value in values:
                raise ConfigError(f"{where}: {value!r} is listed twice.")
            values.append(value)
        param = Param(name, "choice", values=tuple(values))
    else:
        number = float if ptype == "float" else int
        missing = [key for key in ("min", "max") if key not in spec]
        if missing:
            raise ConfigError(f"{where}: type {ptype} needs min and max.")
        # YAML reads `1e-3` (no dot) as a string: parse_value turns it into a number.
        low = parse_value(f"{where}.min", spec["min"], number)
        high = parse_value(f"{where}.max", spec["max"], number)
        step = None if spec.get("step") is None else parse_value(f"{where}.step", spec["step"], number)
        if low == high:
            raise ConfigError(f"{where}: min equals max ({low}); a fixed value belongs in `base`.")
        if step is not None and step <= 0:   # keras-tuner would take it and never move
            raise ConfigError(f"{where}: step must be > 0; got {step}.")
        param = Param(name, ptype, min=low, max=high, step=step, sampling=spec.get("sampling", "linear"))
        values = [low, high]
    try:   # keras-tuner's own checks: empty choices, min > max, log sampling from 0, steps ...
        param.declare(keras_tuner.HyperParameters())
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where}: {err}") from None
    for value in values:
        _check_value(base, name, value, where)
    return param


def sweep_from_dict(data: Mapping[str, Any], *, source: str = "sweep", path: Path | None = None,
                    max_trials: int | None = None, directory: str | None = None) -> Sweep:
    """Validate a sweep mapping. Every choice value and range end is checked by building a Config."""
    spec = spec_from_dict(data, kind="sweep", keys=SWEEP_KEYS, source=source, path=path)
    return _sweep(spec, max_trials=max_trials, directory=directory)


def load_sweep(path: str | Path, *, max_trials: int | None = None, directory: str | None = None) -> Sweep:
    """Read and validate a sweep file; nothing is built, read or logged."""
    return _sweep(read_spec(path, kind="sweep", keys=SWEEP_KEYS), max_trials=max_trials, directory=directory)


def _sweep(spec: SpecFile, *, max_trials: int | None, directory: str | None) -> Sweep:
    data, source = spec.data, spec.source
    name = spec.name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ConfigError(f"{source}: name must be letters, digits, '.', '_' or '-' (it names a folder "
                          f"and the parent run); got {name!r}.")
    tuner = data.get("tuner", "random")
    if tuner not in TUNERS:
        raise ConfigError(f"{source}: tuner must be one of {', '.join(TUNERS)}; got {tuner!r}.")

    objective = data.get("objective", "val_accuracy")
    direction = None
    if isinstance(objective, Mapping):
        check_keys(objective, ("name", "direction"), f"{source}: objective")
        direction = objective.get("direction")
        objective = objective.get("name")
    if objective not in OBJECTIVES:
        raise ConfigError(f"{source}: objective must be one of {', '.join(OBJECTIVES)} (a metric of "
                          f"every epoch); got {objective!r}.")
    direction = direction or ("min" if objective.endswith("loss") else "max")
    if direction not in ("min", "max"):
        raise ConfigError(f"{source}: objective direction must be min or max; got {direction!r}.")

    budget = data.get("budget") or {}
    if not isinstance(budget, Mapping):
        raise ConfigError(f"{source}: budget must be a mapping such as {{max_trials: 8, epochs: 3}}; "
                          f"got {budget!r}.")
    check_keys(budget, BUDGET_KEYS, f"{source}: budget")
    trials = _positive_int(f"{source}: budget.max_trials",
                           max_trials if max_trials is not None else budget.get("max_trials", 10))
    factor = _positive_int(f"{source}: budget.factor", budget.get("factor", 3), 2)
    iterations = _positive_int(f"{source}: budget.hyperband_iterations",
                               budget.get("hyperband_iterations", 1))
    max_failed = _positive_int(f"{source}: budget.max_failed_trials", budget.get("max_failed_trials", 3))
    seed = _positive_int(f"{source}: seed", data.get("seed", 0), 0)
    final_model = data.get("final_model", "auto")
    if final_model not in FINAL_MODEL:
        raise ConfigError(f"{source}: final_model must be one of {', '.join(FINAL_MODEL)}; got "
                          f"{final_model!r}.")
    directory = directory or data.get("directory") or DEFAULT_DIRECTORY
    if not isinstance(directory, str):
        raise ConfigError(f"{source}: directory must be a folder path; got {directory!r}.")

    base = spec.base.override({"experiment": spec.experiment})
    searched = data.get("search_space") or {}
    if base.train.distribute != "none" or "distribute" in searched:
        raise ConfigError(f"{source}: sweeps train each trial on one device; leave `distribute` at none "
                          f"(run several workers instead, see docs/sweeps.md).")
    if budget.get("epochs") is not None:
        base = base.override({"epochs": _positive_int(f"{source}: budget.epochs", budget["epochs"])})

    raw_space = data.get("search_space")
    if not isinstance(raw_space, Mapping) or not raw_space:
        raise ConfigError(f"{source}: search_space must map config options to ranges or choices, e.g. "
                          f"{{learning_rate: {{type: float, min: 1e-3, max: 1e-1, sampling: log}}}}; "
                          f"got {raw_space!r}.")
    space = tuple(_parse_param(str(k), v, base, tuner, source) for k, v in raw_space.items())
    initial = _initial_points(budget.get("num_initial_points"), tuner, trials, len(space), source)
    return Sweep(name=name, tuner=tuner, objective=objective, direction=direction, max_trials=trials,
                 base=base, space=space, seed=seed, directory=directory, factor=factor,
                 hyperband_iterations=iterations, max_failed_trials=max_failed, num_initial_points=initial,
                 final_model=final_model, description=spec.description, source=source)


def _initial_points(raw: Any, tuner: str, max_trials: int, dimensions: int, source: str) -> int | None:
    """Bayesian optimisation's random start. keras-tuner's default (3 x dimensions) can exceed
    max_trials, and then no trial is ever chosen by the model: the default here stays below."""
    where = f"{source}: budget.num_initial_points"
    if tuner != "bayesian":
        if raw is not None:
            raise ConfigError(f"{where} applies to tuner: bayesian only (this sweep's tuner is {tuner}).")
        return None
    points = (_positive_int(where, raw) if raw is not None
              else max(2, min(3 * dimensions, max_trials // 2)))
    if points >= max_trials:
        raise ConfigError(f"{where} is {points}, but budget.max_trials is {max_trials}: every trial would be "
                          f"one of the random initial points, so the search would be random, not Bayesian. "
                          f"Raise max_trials above num_initial_points (or lower it), or set `tuner: random` "
                          f"if a random search is what you want.")
    return points
