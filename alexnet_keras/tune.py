"""Hyperparameter sweeps: keras-tuner over the project's own AlexNet, every trial a nested MLflow run.

`alexnet-keras tune SWEEP.yaml` (or `mlflow run . -e tune -P config=SWEEP.yaml`) reads a sweep file:

    name: cifar10-cpu            # the parent run's name and the tuner folder (<directory>/<name>)
    tuner: random                # random | bayesian | hyperband
    objective: {name: val_accuracy, direction: max}   # or just `val_accuracy`
    budget: {max_trials: 8, epochs: 3}                # hyperband: epochs = max_epochs, plus factor
    base_config: cifar10.yaml    # optional experiment YAML (relative to this file), applied first
    base: {model: {width: 0.25}, data: {train_limit: 10000}}   # experiment-YAML keys, nested or flat
    search_space:                # any config option
      learning_rate: {type: float, min: 1e-3, max: 1e-1, sampling: log}
      batch_size: {type: choice, values: [64, 128]}
      pool: [overlapping, non_overlapping]            # a list is a choice
      lrn: {type: boolean}

The `HyperModel` maps a trial's values onto `Config.override(...)` and builds the network with
`build_alexnet` + `compile_model` (no second model definition); `fit` rebuilds the tf.data pipeline
at the trial's batch size. MLflow: one parent run per sweep, one nested run per trial (the full
resolved config as params, per-epoch metrics, status), and on the parent the best trial's values
(`best.<name>` tags, `sweep/best_hyperparameters.json`), `best_<objective>`, the table of all trials
(`sweep/trials.csv`, `sweep/trials.md`), a figure (`sweep/objective.png`) and the best model.

Resuming: the tuner state in `<directory>/<name>` (keras-tuner, `overwrite=False`) plus
`sweep.json` there (the sweep file's digest and a sweep id). The parent run and the trial runs carry
the sweep id as a tag, so a second invocation reuses the parent and never logs a trial twice.
Distributed: keras-tuner's `KERASTUNER_TUNER_ID` / `KERASTUNER_ORACLE_IP` / `KERASTUNER_ORACLE_PORT`;
the chief serves the oracle and owns the parent run, workers find it through
`$ALEXNET_KERAS_PARENT_RUN_ID` (or `--parent-run-id`) or by the sweep's tags. See docs/sweeps.md.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import sys
import time
import typing
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import keras
import keras_tuner
import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from . import tracking
from .config import SECTIONS, Config, ConfigError, from_dict, leaf_fields, load_config, load_yaml, parse_value
from .data import Data, load_data
from .model import build_alexnet, summary_text
from .train import build_callbacks, compile_model, evaluate, log_evaluation, run_tags, set_global_state

TUNERS = ("random", "bayesian", "hyperband")
PARAM_TYPES = ("float", "int", "choice", "boolean")
SAMPLINGS = ("linear", "log", "reverse_log")
FINAL_MODEL = ("auto", "retrain", "none")
OBJECTIVES = tuple(p + m for p in ("val_", "") for m in ("accuracy", "loss", "top5_accuracy"))
SWEEP_KEYS = ("name", "description", "experiment", "tuner", "objective", "budget", "seed", "directory",
              "base_config", "base", "search_space", "final_model")
BUDGET_KEYS = ("max_trials", "epochs", "factor", "hyperband_iterations", "max_failed_trials")
PARAM_KEYS = ("type", "min", "max", "step", "sampling", "values")
DEFAULT_DIRECTORY = "tuner"
STATE_FILE = "sweep.json"

PARENT_ENV = "ALEXNET_KERAS_PARENT_RUN_ID"
TAG_SWEEP = tracking.TAG_PREFIX + "sweep"
TAG_DIGEST = tracking.TAG_PREFIX + "sweep_digest"
TAG_UID = tracking.TAG_PREFIX + "sweep_uid"
TAG_ROLE = tracking.TAG_PREFIX + "sweep_role"           # "parent" or "trial"
TAG_SESSION = tracking.TAG_PREFIX + "sweep_session"     # when a chief/standalone run last took the parent
TAG_SUMMARY = tracking.TAG_PREFIX + "sweep_summary"     # what the parent's summary was computed from
TAG_TRIAL = tracking.TAG_PREFIX + "trial_id"
TAG_TUNER_ID = tracking.TAG_PREFIX + "tuner_id"
TAG_ATTEMPT = tracking.TAG_PREFIX + "attempt"
TAG_SUPERSEDED = tracking.TAG_PREFIX + "sweep_superseded_by"
BEST_TAG = "best."


class SweepError(RuntimeError):
    """The sweep ran but cannot give a result (every trial failed, no chief, ...)."""


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
        """Identifies the search; `max_trials` is left out so a bigger budget continues the sweep."""
        text = json.dumps(self.describe(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {**self.describe(), "experiment": self.base.experiment, "final_model": self.final_model,
                "budget": {"max_trials": self.max_trials, "epochs": self.base.train.epochs,
                           "max_failed_trials": self.max_failed_trials},
                "directory": self.directory, "digest": self.digest()}


def _closest(key: str, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


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
    for key in spec:
        if key not in PARAM_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}.{_closest(str(key), PARAM_KEYS)} "
                              f"Known keys: {', '.join(PARAM_KEYS)}.")
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

    if ptype in ("choice", "boolean"):
        extra = sorted(set(spec) & {"min", "max", "step", "sampling"})
        if extra:
            raise ConfigError(f"{where}: {', '.join(extra)} only apply to type float or int.")
    if ptype == "boolean":
        if "values" in spec:
            raise ConfigError(f"{where}: type boolean takes no values (it tries true and false).")
        for value in (True, False):
            _check_value(base, name, value, where)
        return Param(name, "boolean")
    if ptype == "choice":
        raw = spec.get("values")
        if not isinstance(raw, list):
            raise ConfigError(f"{where}: values must be a list; got {raw!r}.")
        if not raw:
            raise ConfigError(f"{where}: values is empty; list at least one value (two or more to "
                              f"search).")
        values = []
        for item in raw:
            if item is None:
                raise ConfigError(f"{where}: null is not a searchable value (keras-tuner choices are "
                                  f"numbers, strings or booleans).")
            try:
                value = parse_value(full, item, annotation)
            except ConfigError as err:
                raise ConfigError(f"{where}: {item!r} is not a valid value: {err}") from None
            _check_value(base, name, value, where)
            if value in values:
                raise ConfigError(f"{where}: {value!r} is listed twice.")
            values.append(value)
        return Param(name, "choice", values=tuple(values))

    # float / int ranges
    number = float if ptype == "float" else int
    for key in ("min", "max"):
        if key not in spec:
            raise ConfigError(f"{where}: type {ptype} needs min and max.")
    try:
        # YAML reads `1e-3` (no dot) as a string: parse_value turns it into a number.
        low = parse_value(f"{where}.min", spec["min"], number)
        high = parse_value(f"{where}.max", spec["max"], number)
        step = None if spec.get("step") is None else parse_value(f"{where}.step", spec["step"], number)
    except ConfigError as err:
        raise ConfigError(str(err)) from None
    if low > high:
        raise ConfigError(f"{where}: min ({low}) is greater than max ({high}).")
    if low == high:
        raise ConfigError(f"{where}: min equals max ({low}); a fixed value belongs in `base`.")
    sampling = spec.get("sampling", "linear")
    if sampling not in SAMPLINGS:
        raise ConfigError(f"{where}: sampling must be one of {', '.join(SAMPLINGS)}; got {sampling!r}.")
    if sampling != "linear" and low <= 0:
        raise ConfigError(f"{where}: {sampling} sampling needs min > 0; got min {low}.")
    if step is not None and (step <= 0 or (sampling != "linear" and step <= 1)):
        raise ConfigError(f"{where}: step must be > 0 (with {sampling} sampling, a factor > 1); "
                          f"got {step}.")
    for value in (low, high):
        _check_value(base, name, value, where)
    return Param(name, ptype, min=low, max=high, step=step, sampling=sampling)


def _resolve_base_config(raw: Any, sweep_path: Path | None, source: str) -> Path:
    if not isinstance(raw, str) or not raw:
        raise ConfigError(f"{source}: base_config must be the path of an experiment YAML; got {raw!r}.")
    path = Path(raw).expanduser()
    candidates = [path] if path.is_absolute() else (
        ([sweep_path.parent / path] if sweep_path else []) + [Path.cwd() / path])
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{source}: base_config {raw!r} not found (looked at "
                      f"{', '.join(str(c) for c in candidates)}).")


def sweep_from_dict(data: Mapping[str, Any], *, source: str = "sweep", path: Path | None = None,
                    max_trials: int | None = None, directory: str | None = None) -> Sweep:
    """Validate a sweep mapping. Every choice value and range end is checked by building a Config."""
    for key in data:
        if key not in SWEEP_KEYS:
            raise ConfigError(f"{source}: unknown key {key!r}.{_closest(str(key), SWEEP_KEYS)} "
                              f"Known keys: {', '.join(SWEEP_KEYS)}.")
    name = data.get("name", path.stem if path else None)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ConfigError(f"{source}: name must be letters, digits, '.', '_' or '-' (it names a folder "
                          f"and the parent run); got {name!r}.")
    tuner = data.get("tuner", "random")
    if tuner not in TUNERS:
        raise ConfigError(f"{source}: tuner must be one of {', '.join(TUNERS)}; got {tuner!r}.")

    objective = data.get("objective", "val_accuracy")
    direction = None
    if isinstance(objective, Mapping):
        unknown = set(objective) - {"name", "direction"}
        if unknown:
            raise ConfigError(f"{source}: objective takes name and direction; got {sorted(unknown)}.")
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
    for key in budget:
        if key not in BUDGET_KEYS:
            raise ConfigError(f"{source}: unknown budget key {key!r}.{_closest(str(key), BUDGET_KEYS)} "
                              f"Known keys: {', '.join(BUDGET_KEYS)}.")
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

    base = Config()
    if data.get("base_config") is not None:
        base = load_config(_resolve_base_config(data["base_config"], path, source))
    raw_base = data.get("base") or {}
    if not isinstance(raw_base, Mapping):
        raise ConfigError(f"{source}: base must be a mapping of experiment options (model/data/train or "
                          f"flat names); got {raw_base!r}.")
    base = from_dict(raw_base, base=base, source=f"{source}: base")
    if data.get("experiment") is not None:
        base = base.override({"experiment": str(data["experiment"])})
    searched = data.get("search_space") or {}
    if getattr(base.train, "distribute", "none") != "none" or "distribute" in searched:
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
    return Sweep(name=name, tuner=tuner, objective=objective, direction=direction, max_trials=trials,
                 base=base, space=space, seed=seed, directory=directory, factor=factor,
                 hyperband_iterations=iterations, max_failed_trials=max_failed, final_model=final_model,
                 description=str(data.get("description") or "").strip(), source=source)


def load_sweep(path: str | Path, *, max_trials: int | None = None, directory: str | None = None) -> Sweep:
    """Read and validate a sweep file; nothing is built, read or logged."""
    path = Path(path)
    return sweep_from_dict(load_yaml(path), source=str(path), path=path, max_trials=max_trials,
                           directory=directory)


# ---------------------------------------------------------------------------------------------
# The HyperModel: the project's AlexNet, built from a Config
# ---------------------------------------------------------------------------------------------

class AlexNetHyperModel(keras_tuner.HyperModel):
    """`build(hp)` = `Config.override(hp values)` -> `build_alexnet` -> `compile_model`.

    `fit` feeds the trial its own tf.data pipelines (a batch size in the search space rebuilds them).
    Pipelines are cached per (data options, image size, batch size, seed).
    """

    def __init__(self, sweep: Sweep):
        super().__init__(name="alexnet", tunable=True)
        self.sweep = sweep
        self._data: dict[tuple, Data] = {}

    def values(self, hp: keras_tuner.HyperParameters) -> dict[str, Any]:
        return {p.name: p.declare(hp) for p in self.sweep.space}

    def data_for(self, config: Config) -> Data:
        key = (config.data, config.model.input_size, config.train.batch_size, config.train.seed)
        if key not in self._data:
            if len(self._data) >= 4:
                self._data.pop(next(iter(self._data)))
            self._data[key] = load_data(config.data, image_size=config.model.input_size,
                                        batch_size=config.train.batch_size, seed=config.train.seed)
        return self._data[key]

    def build(self, hp: keras_tuner.HyperParameters) -> keras.Model:
        config = self.sweep.trial_config(self.values(hp))
        set_global_state(config.train)
        data = self.data_for(config)
        model = build_alexnet(config.model, num_classes=data.num_classes, input_mean=data.mean,
                              input_std=data.std)
        return compile_model(model, config, data.steps_per_epoch)

    def fit(self, hp, model, *args, callbacks=None, epochs=None, initial_epoch=0, **kwargs):
        config = self.sweep.trial_config(self.values(hp))
        data = self.data_for(config)
        tracked = mlflow.active_run() is not None   # the trial's run (see _TrackedTrials.run_trial)
        own_callbacks = [c for c in build_callbacks(config)
                         if tracked or not tracking.is_epoch_metrics_callback(c)]  # it needs a run
        if tracked:
            mlflow.set_tags(run_tags(config, data, model))
            tracking.log_metrics({"num_params": model.count_params()})
            tracking.log_text(summary_text(model), "model/summary.txt")
        epochs = epochs or config.train.epochs
        verbose = 1 if sys.stdout.isatty() else 2
        start = time.perf_counter()
        history = model.fit(data.train, validation_data=data.val, epochs=epochs, initial_epoch=initial_epoch,
                            callbacks=[*own_callbacks, *(callbacks or [])], verbose=verbose,
                            shuffle=False)
        seconds = time.perf_counter() - start
        loss = history.history.get("loss", [float("nan")])[-1]
        if len(history.epoch) < epochs - initial_epoch or not np.isfinite(loss):
            raise FloatingPointError(f"training diverged (loss {loss}) at epoch "
                                     f"{initial_epoch + len(history.epoch)} with learning_rate "
                                     f"{config.train.learning_rate}.")
        if tracked:
            tracking.log_metrics({"train_time_s": seconds,
                                  "epoch_time_s": seconds / max(1, len(history.epoch))})
        return history


# ---------------------------------------------------------------------------------------------
# The tuner: one nested MLflow run per trial
# ---------------------------------------------------------------------------------------------

@dataclass
class _Context:
    """What a tuner needs to log its trials: set once the parent run is known."""

    sweep: Sweep
    hypermodel: AlexNetHyperModel
    uid: str = ""
    parent_run_id: str | None = None
    experiment: str = ""
    fatal: BaseException | None = None
    trial_runs: dict[str, str] = field(default_factory=dict)   # trial id -> run id (this process)


def _is_tracking_error(err: BaseException) -> bool:
    """MLflow/store errors stop the sweep; keras-tuner would only mark the trial failed."""
    for e in (err, err.__cause__, err.__context__):
        if e is None:
            continue
        module = type(e).__module__ or ""
        if isinstance(e, tracking.TrackingError) or module.split(".")[0] in ("mlflow", "sqlalchemy",
                                                                              "sqlite3"):
            return True
    return False


def _runs(filter_string: str, max_results: int = 1000) -> list:
    """Runs matching `filter_string` in every experiment of the store (deleted runs excluded)."""
    client = MlflowClient()
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, filter_string=filter_string, max_results=max_results) if ids else []


def _trial_runs(uid: str) -> dict[str, Any]:
    """{trial id: run} for the sweep `uid` (the newest run if a store somehow holds two)."""
    out: dict[str, Any] = {}
    for run in _runs(f"tags.`{TAG_UID}` = '{uid}' and tags.`{TAG_ROLE}` = 'trial'"):
        trial_id = run.data.tags.get(TAG_TRIAL)
        newer = trial_id not in out or run.info.start_time > out[trial_id].info.start_time
        if trial_id is not None and newer:
            out[trial_id] = run
    return out


def _best_epoch(results: Any, objective: str, direction: str) -> tuple[float, int]:
    history = results[0] if isinstance(results, list) else results
    if isinstance(history, dict):
        return float(history[objective]), 0
    values = np.asarray(history.history[objective], dtype=float)
    index = int(np.nanargmax(values) if direction == "max" else np.nanargmin(values))
    return float(values[index]), index + int(history.epoch[0] if history.epoch else 0)


class _TrackedTrials:
    """Mixed into a keras-tuner Tuner: each trial runs inside its own nested MLflow run."""

    sweep_context: _Context

    def run_trial(self, trial, *args, **kwargs):
        ctx = self.sweep_context
        sweep = ctx.sweep
        best_key = f"best_{sweep.objective}"
        run_name = f"{sweep.name}-trial-{trial.trial_id}"
        config = sweep.trial_config(trial.hyperparameters.values, run_name=run_name,
                                    experiment=ctx.experiment)
        try:
            existing = _trial_runs(ctx.uid).get(trial.trial_id)
        except Exception as err:
            ctx.fatal = err
            raise keras_tuner.errors.FatalError(f"MLflow: {err}") from err
        if existing is not None and existing.info.status == "FINISHED" and best_key in existing.data.metrics:
            # Finished in MLflow, but the tuner state did not record it (stopped in between): reuse it.
            print(f"trial {trial.trial_id}: already finished as MLflow run {existing.info.run_id}; "
                  f"reusing its result", flush=True)
            ctx.trial_runs[trial.trial_id] = existing.info.run_id
            return {sweep.objective: existing.data.metrics[best_key]}
        attempt = 1 if existing is None else int(existing.data.tags.get(TAG_ATTEMPT, "1")) + 1
        tags = {TAG_SWEEP: sweep.name, TAG_DIGEST: sweep.digest(), TAG_UID: ctx.uid, TAG_ROLE: "trial",
                TAG_TRIAL: str(trial.trial_id), TAG_TUNER_ID: str(self.tuner_id), TAG_ATTEMPT: str(attempt)}
        try:
            with tracking.run(ctx.experiment, run_name=run_name, params=config.flat(), tags=tags, nested=True,
                              parent_run_id=ctx.parent_run_id,
                              run_id=existing.info.run_id if existing is not None else None) as active:
                ctx.trial_runs[trial.trial_id] = active.info.run_id
                results = super().run_trial(trial, *args, **kwargs)
                score, epoch = _best_epoch(results, sweep.objective, sweep.direction)
                tracking.log_metrics({best_key: score, "best_epoch": epoch})
            return results
        except Exception as err:
            if _is_tracking_error(err):
                ctx.fatal = err
                raise keras_tuner.errors.FatalError(f"MLflow: {err}") from err
            tracking.stderr(f"trial {trial.trial_id} failed: {type(err).__name__}: {err}")
            raise keras_tuner.errors.FailedTrialError(f"{type(err).__name__}: {err}") from err


_TUNER_CLASSES = {"random": keras_tuner.RandomSearch, "bayesian": keras_tuner.BayesianOptimization,
                  "hyperband": keras_tuner.Hyperband}


def make_tuner(sweep: Sweep, hypermodel: AlexNetHyperModel, ctx: _Context) -> keras_tuner.Tuner:
    base_cls = _TUNER_CLASSES[sweep.tuner]
    cls = type(f"Tracked{base_cls.__name__}", (_TrackedTrials, base_cls), {})
    kwargs: dict[str, Any] = dict(
        hypermodel=hypermodel, objective=keras_tuner.Objective(sweep.objective, sweep.direction),
        seed=sweep.seed, max_consecutive_failed_trials=sweep.max_failed_trials,
        directory=str(sweep.directory), project_name=sweep.name, overwrite=False)
    if sweep.tuner == "hyperband":
        kwargs.update(max_epochs=sweep.base.train.epochs, factor=sweep.factor,
                      hyperband_iterations=sweep.hyperband_iterations)
    else:
        kwargs.update(max_trials=sweep.max_trials)
    tuner = cls(**kwargs)
    tuner.sweep_context = ctx
    return tuner


# ---------------------------------------------------------------------------------------------
# Running a sweep: standalone, chief or worker
# ---------------------------------------------------------------------------------------------

@dataclass
class SweepResult:
    role: str                                   # "single", "chief" or "worker"
    parent_run_id: str | None
    rows: list[dict[str, Any]] = field(default_factory=list)   # every trial, best first
    best: dict[str, Any] | None = None


def role() -> str:
    """keras-tuner's distribution mode, from its environment variables."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return "single"
    missing = [v for v in ("KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID") if not os.environ.get(v)]
    if missing:
        raise ConfigError(f"KERASTUNER_ORACLE_IP is set, so this is a distributed sweep, but "
                          f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: set "
                          f"KERASTUNER_TUNER_ID=chief on the chief and a unique id (tuner1, ...) on each "
                          f"worker, and the same KERASTUNER_ORACLE_PORT everywhere.")
    return "chief" if "chief" in os.environ["KERASTUNER_TUNER_ID"] else "worker"


def _open_state(sweep: Sweep, overwrite: bool) -> str:
    """The sweep id of `<directory>/<name>`, creating it for a new sweep; refuse a changed sweep file."""
    folder = sweep.project_dir
    state = folder / STATE_FILE
    if overwrite and folder.exists():
        shutil.rmtree(folder)
    if state.is_file():
        saved = json.loads(state.read_text())
        if saved.get("digest") != sweep.digest():
            raise ConfigError(
                f"the tuner state in {str(folder)!r} belongs to another version of sweep {sweep.name!r} "
                f"(digest {saved.get('digest')}, this file gives {sweep.digest()}); keras-tuner would "
                f"ignore the changed search space. Pass --overwrite to start the sweep again, or give the "
                f"changed sweep another `name` (or --tuner-dir).")
        return saved["uid"]
    if folder.exists() and any(folder.iterdir()):
        raise ConfigError(f"{str(folder)!r} holds files but no {STATE_FILE}: not a sweep of this "
                          f"project. Pass --overwrite to replace it, or choose another --tuner-dir.")
    folder.mkdir(parents=True, exist_ok=True)
    uid = uuid.uuid4().hex
    state.write_text(json.dumps({"name": sweep.name, "digest": sweep.digest(), "uid": uid,
                                 "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2) + "\n")
    return uid


def _find_parent(uid: str) -> str | None:
    runs = _runs(f"tags.`{TAG_UID}` = '{uid}' and tags.`{TAG_ROLE}` = 'parent'")
    runs.sort(key=lambda r: r.info.start_time, reverse=True)
    return runs[0].info.run_id if runs else None


def _adopt(uid: str, parent_run_id: str) -> None:
    """Nest every trial of sweep `uid` under `parent_run_id`; earlier parents become "superseded".

    A second `mlflow run . -e tune` makes a new parent run (MLflow creates it): the trials of the
    earlier invocations move under it, so one parent always holds the whole sweep.
    """
    client = MlflowClient()
    for run in _runs(f"tags.`{TAG_UID}` = '{uid}'"):
        tags, run_id = run.data.tags, run.info.run_id
        if tags.get(TAG_ROLE) == "trial" and tags.get("mlflow.parentRunId") != parent_run_id:
            client.set_tag(run_id, "mlflow.parentRunId", parent_run_id)
        elif tags.get(TAG_ROLE) == "parent" and run_id != parent_run_id:
            client.set_tag(run_id, TAG_ROLE, "superseded")
            client.set_tag(run_id, TAG_SUPERSEDED, parent_run_id)


def _wait_for_parent(sweep: Sweep, timeout: float) -> str:
    """A worker's parent: the RUNNING parent of this sweep (name and digest) that a chief took last."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            runs = _runs(f"tags.`{TAG_SWEEP}` = '{sweep.name}' and tags.`{TAG_DIGEST}` = '{sweep.digest()}' "
                         f"and tags.`{TAG_ROLE}` = 'parent' and attributes.status = 'RUNNING'")
        except Exception as err:   # the chief may still be creating a new store: ask again
            if time.monotonic() >= deadline:
                raise tracking.TrackingError(f"MLflow store {mlflow.get_tracking_uri()!r}: {err}") from err
            runs = []
        if runs:
            runs.sort(key=lambda r: float(r.data.tags.get(TAG_SESSION, "0")), reverse=True)
            return runs[0].info.run_id
        if time.monotonic() >= deadline:
            raise SweepError(f"no running parent run of sweep {sweep.name!r} (digest {sweep.digest()}) in "
                             f"{mlflow.get_tracking_uri()!r} after {timeout:.0f} s: start the chief first, "
                             f"or give the parent's id with --parent-run-id / ${PARENT_ENV}.")
        time.sleep(1.0)


def _serve(tuner: keras_tuner.Tuner, poll: float = 0.5) -> None:
    """The chief: serve the oracle to the workers until every trial is done.

    keras-tuner's own `search()` on the chief does the same but polls the end every 20 s.
    """
    from concurrent import futures

    import grpc
    from keras_tuner.src import protos
    from keras_tuner.src.distribute import oracle_chief

    address = f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"
    tuner.save()
    servicer = oracle_chief.OracleServicer(tuner.oracle)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    if server.add_insecure_port(address) == 0:
        raise SweepError(f"the chief cannot listen on {address} (port in use, or not an address of this "
                         f"machine?).")
    server.start()
    print(f"chief: serving the oracle on {address}", flush=True)
    try:
        while not (servicer.stop_triggered and oracle_chief.exit_chief(tuner.oracle)):
            time.sleep(poll)
    finally:
        server.stop(grace=2)


def _search(tuner: keras_tuner.Tuner, ctx: _Context, serve: bool) -> None:
    try:
        _serve(tuner) if serve else tuner.search()
    except keras_tuner.errors.FatalError as err:
        if ctx.fatal is None:
            raise
    except RuntimeError as err:
        if "consecutive failures" in str(err):
            raise SweepError(f"sweep {ctx.sweep.name!r} stopped: {str(err).splitlines()[0]} (see the FAILED "
                             f"trial runs' `error` tag).") from err
        raise
    if ctx.fatal is not None:   # keras-tuner would have marked the trial failed and gone on
        if isinstance(ctx.fatal, tracking.TrackingError):
            raise ctx.fatal
        raise tracking.TrackingError(f"MLflow failed during a trial of sweep {ctx.sweep.name!r} "
                                     f"({mlflow.get_tracking_uri()!r}): {type(ctx.fatal).__name__}: "
                                     f"{ctx.fatal}") from ctx.fatal


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_sweep(sweep: Sweep, *, overwrite: bool = False, parent_run_id: str | None = None,
              worker_wait: float = 600.0) -> SweepResult:
    """Run (or continue) `sweep` into the configured MLflow store; see the module docstring."""
    mode = role()
    # Under `mlflow run`, MLFLOW_RUN_ID is the project's run: the parent. Take it out of the
    # environment so that no trial's start_run() resumes it.
    project_run = os.environ.pop("MLFLOW_RUN_ID", None)
    explicit_parent = parent_run_id or os.environ.get(PARENT_ENV) or None
    hypermodel = AlexNetHyperModel(sweep)
    hypermodel.data_for(sweep.base)        # a missing dataset fails here, before any run or state
    ctx = _Context(sweep=sweep, hypermodel=hypermodel)

    if mode == "worker":
        parent = explicit_parent or _wait_for_parent(sweep, worker_wait)
        run = tracking.get_run(parent)
        if run.data.tags.get(TAG_DIGEST) != sweep.digest():
            raise ConfigError(f"parent run {parent} belongs to another sweep file (digest "
                              f"{run.data.tags.get(TAG_DIGEST)}, this file gives {sweep.digest()}): give "
                              f"every worker the chief's sweep file.")
        ctx.uid, ctx.parent_run_id = run.data.tags[TAG_UID], parent
        ctx.experiment = MlflowClient().get_experiment(run.info.experiment_id).name
        tuner = make_tuner(sweep, hypermodel, ctx)
        print(f"worker {os.environ['KERASTUNER_TUNER_ID']}: trials go under parent run {parent}", flush=True)
        with _sigterm_as_interrupt():
            _search(tuner, ctx, serve=False)
        return SweepResult(role=mode, parent_run_id=parent)

    ctx.uid = _open_state(sweep, overwrite)
    tuner = make_tuner(sweep, hypermodel, ctx)
    tuner.save()   # keras-tuner reloads only if its tuner file exists: an interrupted first trial resumes too
    parent = explicit_parent or project_run or _find_parent(ctx.uid)
    tags = {**tracking.environment_tags(), TAG_SWEEP: sweep.name, TAG_DIGEST: sweep.digest(),
            TAG_UID: ctx.uid, TAG_ROLE: "parent", TAG_SESSION: f"{time.time():.3f}",
            tracking.TAG_PREFIX + "max_trials": str(sweep.max_trials)}
    params = {"sweep_name": sweep.name, "sweep_tuner": sweep.tuner, "sweep_objective": sweep.objective,
              "sweep_direction": sweep.direction, "sweep_seed": sweep.seed,
              **{f"space.{p.name}": p.short() for p in sweep.space}}
    if sweep.description:
        tags["mlflow.note.content"] = sweep.description
    if parent is not None:
        # start_run(run_id=...) refuses a run of another experiment than the last set_experiment().
        mlflow.set_experiment(experiment_id=tracking.get_run(parent).info.experiment_id)
    with tracking.run(sweep.base.experiment, run_name=sweep.name, params=params, tags=tags,
                      run_id=parent) as active:
        ctx.parent_run_id = active.info.run_id
        ctx.experiment = MlflowClient().get_experiment(active.info.experiment_id).name
        if active.info.run_name != sweep.name:   # a run made by `mlflow run` has a random name
            mlflow.set_tag("mlflow.runName", sweep.name)
        _adopt(ctx.uid, ctx.parent_run_id)
        tracking.log_dict(sweep.to_dict(), "sweep/sweep.yaml")
        if mode == "chief":
            print(f"chief: parent run {ctx.parent_run_id}; workers find it by its tags or with "
                  f"{PARENT_ENV}={ctx.parent_run_id}", flush=True)
        _search(tuner, ctx, serve=(mode == "chief"))
        rows, best = summarize(tuner, ctx, active.info.run_id)
    print(f"sweep {sweep.name!r}: parent run {ctx.parent_run_id}; best trial {best['trial']} "
          f"{sweep.objective}={best[sweep.objective]:.4g}", flush=True)
    return SweepResult(role=mode, parent_run_id=ctx.parent_run_id, rows=rows, best=best)


# ---------------------------------------------------------------------------------------------
# The parent's summary: table, figure, best values, best model
# ---------------------------------------------------------------------------------------------

def trial_rows(tuner: keras_tuner.Tuner, ctx: _Context) -> list[dict[str, Any]]:
    """One row per trial the oracle knows, best first (trials without a score last)."""
    sweep = ctx.sweep
    runs = _trial_runs(ctx.uid)
    rows = []
    for order, trial_id in enumerate(tuner.oracle.start_order or sorted(tuner.oracle.trials)):
        trial = tuner.oracle.trials[trial_id]
        run = runs.get(trial_id)
        score = trial.score if trial.score is not None and np.isfinite(trial.score) else None
        rows.append({"order": order + 1, "trial": trial_id, "status": str(trial.status),
                     sweep.objective: score,
                     "best_epoch": trial.best_step if score is not None else None,
                     **{name: trial.hyperparameters.values.get(name) for name in sweep.names},
                     "run_id": run.info.run_id if run is not None else "",
                     "run_status": run.info.status if run is not None else ""})
    sign = -1.0 if sweep.direction == "max" else 1.0
    rows.sort(key=lambda r: (r[sweep.objective] is None, sign * (r[sweep.objective] or 0.0), r["order"]))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank if row[sweep.objective] is not None else None
    return rows


def importance(rows: list[dict[str, Any]], sweep: Sweep) -> dict[str, float]:
    """A rough 0..1 importance per dimension over the completed trials: |Spearman rank correlation|
    with the objective for numbers, the share of variance explained by the groups (eta squared) for
    choices and booleans. Zero with fewer than three completed trials."""
    done = [r for r in rows if r[sweep.objective] is not None]
    scores = np.array([r[sweep.objective] for r in done], dtype=float)
    out = {}
    for p in sweep.space:
        values = [r[p.name] for r in done]
        value = 0.0
        if len(done) >= 3 and len(set(map(str, values))) > 1 and np.ptp(scores) > 0:
            if p.numeric or all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                x = np.argsort(np.argsort(np.asarray(values, dtype=float))).astype(float)
                y = np.argsort(np.argsort(scores)).astype(float)
                value = abs(float(np.corrcoef(x, y)[0, 1]))
            else:
                total = float(np.sum((scores - scores.mean()) ** 2))
                between = sum(len(g) * (np.mean(g) - scores.mean()) ** 2 for g in (
                    scores[[str(v) == key for v in values]] for key in set(map(str, values))))
                value = float(between / total) if total > 0 else 0.0
        out[p.name] = 0.0 if not np.isfinite(value) else round(value, 4)
    return out


def _text(value: Any) -> str:
    """A value as MLflow params show it (true/false for booleans, full precision for numbers)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def trials_table(rows: list[dict[str, Any]], sweep: Sweep) -> tuple[str, str]:
    """(CSV, Markdown) of the trials, in the order of `rows` (best first)."""
    columns = ["rank", "trial", "status", sweep.objective, "best_epoch", *sweep.names, "run_id"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else _fmt(row[k]) if isinstance(row[k], bool)
                             else row[k]) for k in columns})
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(k)) for k in columns) + " |" for row in rows]
    direction = "higher" if sweep.direction == "max" else "lower"
    header = (f"# Sweep {sweep.name}: {len(rows)} trials, sorted by {sweep.objective} ({direction} is "
              f"better)\n\n")
    return buffer.getvalue(), header + "\n".join(lines) + "\n"


def sweep_figure(rows: list[dict[str, Any]], sweep: Sweep, weights: Mapping[str, float], top: int = 3):
    """Objective per trial (with the best so far), then objective against the `top` most important
    dimensions."""
    from . import figures  # noqa: F401  (selects the headless Agg backend)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, NullFormatter

    names = sorted(sweep.names, key=lambda n: (-weights.get(n, 0.0), sweep.names.index(n)))[:top]
    fig, axes = plt.subplots(1, 1 + len(names), figsize=(4.2 * (1 + len(names)), 3.6), squeeze=False)
    objective = sweep.objective
    ordered = sorted(rows, key=lambda r: r["order"])
    done = [r for r in ordered if r[objective] is not None]
    ax = axes[0][0]
    if done:
        ax.plot([r["order"] for r in done], [r[objective] for r in done], "o", label="trial")
        pick = max if sweep.direction == "max" else min
        best_so_far = [pick(r[objective] for r in done[:i + 1]) for i in range(len(done))]
        ax.step([r["order"] for r in done], best_so_far, where="post", color="C1", label="best so far")
    failed = [r["order"] for r in ordered if r[objective] is None]
    if failed:
        ax.plot(failed, [min((r[objective] for r in done), default=0.0)] * len(failed), "x", color="C3",
                label="failed")
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(objective)
    ax.set_title(f"{objective} per trial")
    ax.grid(alpha=0.3)
    ax.legend()
    rng = np.random.default_rng(0)
    for ax, name in zip(axes[0][1:], names):
        param = sweep.param(name)
        values = [r[name] for r in done]
        scores = [r[objective] for r in done]
        if param.numeric:
            ax.plot(values, scores, "o")
            if param.sampling == "log":
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())
        else:
            labels = [_fmt(v) for v in (param.values if param.type == "choice" else (False, True))]
            position = {label: i for i, label in enumerate(labels)}
            xs = [position[_fmt(v)] + rng.uniform(-0.08, 0.08) for v in values]
            ax.plot(xs, scores, "o")
            ax.set_xticks(range(len(labels)), labels)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        ax.set_xlabel(name)
        ax.set_title(f"{name} (importance {weights.get(name, 0.0):.2f})")
        ax.grid(alpha=0.3)
    fig.suptitle(f"sweep {sweep.name}: {objective} ({sweep.direction})")
    fig.tight_layout()
    return fig


def _history(run_id: str) -> dict[str, list[float]]:
    """A trial's per-epoch metrics from MLflow (the last value logged at each step)."""
    client = MlflowClient()
    out = {}
    for key in ("loss", "accuracy", "top5_accuracy", "val_loss", "val_accuracy", "val_top5_accuracy"):
        by_step: dict[int, tuple[int, float]] = {}
        for m in client.get_metric_history(run_id, key):
            if m.step not in by_step or m.timestamp >= by_step[m.step][0]:
                by_step[m.step] = (m.timestamp, m.value)
        if by_step:
            out[key] = [by_step[s][1] for s in sorted(by_step)]
    return out


def _final_model(tuner, ctx: _Context, trial, config: Config, data: Data) -> tuple[keras.Model | None, str]:
    """The best trial's network: its best-epoch checkpoint if this machine has it, else re-trained."""
    mode = ctx.sweep.final_model
    if mode == "none":
        return None, "none"
    checkpoint = Path(tuner._get_checkpoint_fname(trial.trial_id))
    if mode == "auto" and checkpoint.is_file():
        import warnings

        with warnings.catch_warnings():   # "Skipping variable loading for optimizer": weights are enough
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            return tuner.load_model(trial), "checkpoint"
    print(f"re-training the best trial {trial.trial_id} ({config.train.epochs} epochs) for the sweep's model",
          flush=True)
    model = tuner.hypermodel.build(trial.hyperparameters)
    callbacks = [c for c in build_callbacks(config) if not tracking.is_epoch_metrics_callback(c)]
    model.fit(data.train, validation_data=data.val, epochs=config.train.epochs, callbacks=callbacks,
              verbose=2, shuffle=False)
    return model, "retrained"


def summarize(tuner, ctx: _Context, parent_run_id: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Log the sweep's results on the (active) parent run; skipped when nothing changed since last time."""
    sweep = ctx.sweep
    rows = trial_rows(tuner, ctx)
    done = [r for r in rows if r[sweep.objective] is not None]
    if not done:
        raise SweepError(f"no trial of sweep {sweep.name!r} completed ({len(rows)} failed); see the FAILED "
                         f"trial runs' `error` tag.")
    best = done[0]
    key = f"{len(done)}/{len(rows)}:{best['trial']}"
    if tracking.get_run(parent_run_id).data.tags.get(TAG_SUMMARY) == key:
        print(f"sweep {sweep.name!r}: no new trials since the last summary", flush=True)
        return rows, best
    step = len(done)
    best_values = {name: best[name] for name in sweep.names}
    mlflow.set_tags({**{BEST_TAG + k: _text(v) for k, v in best_values.items()},
                     tracking.TAG_PREFIX + "best_trial": best["trial"],
                     tracking.TAG_PREFIX + "best_run_id": best["run_id"]})
    tracking.log_metrics({f"best_{sweep.objective}": best[sweep.objective], "completed_trials": len(done),
                          "failed_trials": len(rows) - len(done)}, step=step)
    tracking.log_dict({"trial": best["trial"], "run_id": best["run_id"],
                       sweep.objective: best[sweep.objective], "hyperparameters": best_values},
                      "sweep/best_hyperparameters.json")
    csv_text, markdown = trials_table(rows, sweep)
    tracking.log_text(csv_text, "sweep/trials.csv")
    tracking.log_text(markdown, "sweep/trials.md")
    weights = importance(rows, sweep)
    tracking.log_dict(weights, "sweep/importance.json")
    tracking.log_figure(sweep_figure(rows, sweep, weights), "sweep/objective.png")

    trial = tuner.oracle.trials[best["trial"]]
    config = sweep.trial_config(trial.hyperparameters.values)
    data = ctx.hypermodel.data_for(config)
    model, source = _final_model(tuner, ctx, trial, config, data)
    if model is not None:
        test_metrics, predictions = evaluate(model, data)
        tracking.log_metrics(test_metrics, step=step)
        history = _history(best["run_id"]) if best["run_id"] else {}
        log_evaluation(data, predictions, history, title=f"{sweep.name}: best trial {best['trial']}")
        tracking.log_dict(config.to_dict(), "config.yaml")
        tracking.log_text(summary_text(model), "model/summary.txt")
        example = next(iter(data.val.take(1)))[0].numpy()[:4]
        tracking.log_keras_model(model, example)
    mlflow.set_tags({tracking.TAG_PREFIX + "model_source": source, TAG_SUMMARY: key})
    tracking.flush()
    return rows, best


# ---------------------------------------------------------------------------------------------
# Command line (`alexnet-keras tune`, wired in cli.py)
# ---------------------------------------------------------------------------------------------

def cmd_tune(args) -> int:
    sweep = load_sweep(args.sweep, max_trials=args.max_trials, directory=args.tuner_dir)
    if args.dry_run:
        print(tracking.dumps(sweep.to_dict()))
        state = sweep.project_dir / STATE_FILE
        print(f"tuner state: {sweep.project_dir} ({'resumes' if state.is_file() else 'new sweep'})")
        return 0
    tracking.configure(args.tracking_uri)
    try:
        run_sweep(sweep, overwrite=args.overwrite, parent_run_id=args.parent_run_id,
                  worker_wait=args.worker_wait)
    except SweepError as err:
        print(f"alexnet-keras tune: error: {err}", file=sys.stderr)
        return 1
    return 0
