"""Study files (experiments/ablation*.yaml): read and checked, their runs counted, then expanded into every
child's Config before any run exists; `plan_text` says what a study will run."""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

from pydantic import AfterValidator, Field, ValidationInfo, field_validator

from ..config import SECTIONS, Config, ConfigError, Seed, did_you_mean, leaf_fields
from ..tables import value_text
from .specfile import SpecKeys, read_spec

DESIGNS = {"one_factor_at_a_time": "one_factor_at_a_time", "ofat": "one_factor_at_a_time",
           "grid": "grid", "factorial": "grid"}
# Axes may not vary these: seeds have their own key, the split must be the same for every child,
# and naming is the study's job.
RESERVED_AXES = {"seed": "use `seeds:` to list the seeds", "split_seed": "every child must see the same split",
                 "experiment": "set `experiment:` at the top of the study", "run_name": "children are named "
                 "after their variant", "register": "the study registers its best variant: `alexnet-keras "
                 "ablate --register NAME`"}
MAX_RUNS = 1000   # more is rarely meant (seeds: 1000000) and would take minutes just to plan


class StudyError(ConfigError):
    """The study file is wrong; raised before any MLflow run exists."""


class StudyIncomplete(RuntimeError):
    """Some children failed; the report was written with the others and the parent ends FAILED."""


def _unique(seeds: list[int]) -> list[int]:
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"lists a seed twice: {seeds}")
    return seeds


def over_limit(runs: int, limit: int) -> str:
    return (f"plans {runs:,} runs, more than max_runs ({limit:,}); list fewer seeds or values, or allow them "
            f"with `max_runs: {runs}` in the study file")


class StudyKeys(SpecKeys):
    """A study file's keys besides those every study and sweep file has."""

    design: Literal[tuple(DESIGNS)] = Field("one_factor_at_a_time", description="one factor at a time "
                                            "(ofat) or grid (factorial)")
    axes: dict[str, Any] = Field(min_length=1, description="each axis maps to its values, e.g. axes: "
                                 "{lrn: [true, false]}, or value names to options (a composite axis)")
    baseline: dict[str, Any] = Field({}, description="an axis' baseline value (default: the base config's)")
    max_runs: int = Field(MAX_RUNS, ge=1, description="the most runs the study may plan")   # before seeds
    seeds: Annotated[list[Seed], AfterValidator(_unique)] = Field(
        min_length=1, description="list the training seeds, e.g. seeds: [0, 1, 2] (or a count, seeds: 3)")
    nuisance: list[Literal[tuple(leaf_fields())]] = Field([], description="options that are nuisance "
                                                          "hyperparameters (always: seed)")
    fixed: list[Literal[tuple(leaf_fields())]] = Field([], description="options held fixed (default: the rest)")
    nuisance_grid: dict[str, Annotated[list[Any], Field(min_length=1)]] | None = Field(
        None, description="options mapped to the values tried per arm, e.g. {learning_rate: [0.01, 0.02]}")

    @field_validator("seeds", mode="before")
    @classmethod
    def _count(cls, value: Any, info: ValidationInfo) -> Any:
        """`seeds: 3` is [0, 1, 2]; a count over max_runs is refused before its list is made."""
        if type(value) is not int or value < 1:
            return value
        if value > info.data.get("max_runs", MAX_RUNS):
            raise ValueError(over_limit(value, info.data.get("max_runs", MAX_RUNS)).replace("plans", "alone plans"))
        return list(range(value))


def _value_name(raw: Any) -> str:
    """How a value is named in variant names, labels and tags: `true`, `0.5`, `none` for null."""
    return value_text(raw) or "none"


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, (bool, int, float, str)) or value is None else str(value)


@dataclass(frozen=True)
class Axis:
    name: str
    values: tuple[str, ...]                        # value names, in the file's order
    overrides: dict[str, dict[str, Any]]           # value name -> options it sets
    baseline: str
    composite: bool


@dataclass(frozen=True)
class Variant:
    name: str                                      # "baseline", "lrn=false", "pool=x,dropout=0"
    factors: dict[str, str]                        # every axis -> its value name here
    overrides: dict[str, Any]                      # options set on top of the base config
    config: Config                                 # base + overrides (seed and names set per child)
    is_baseline: bool


@dataclass(frozen=True)
class GridPoint:
    """One value of a study's nuisance grid: the options it sets and its label in the spec (report.py):
    the value as text ("0.01"), or "k1=v1,k2=v2" when the grid has several keys."""
    label: str
    options: dict[str, Any]

    @property
    def assignment(self) -> str:
        """"learning_rate=0.01": how child labels and run names show it."""
        return ",".join(f"{k}={_value_name(v)}" for k, v in self.options.items())


@dataclass(frozen=True)
class Child:
    variant: Variant
    seed: int
    config: Config
    grid_point: GridPoint | None                   # with a nuisance grid: the value this child trains at
    label: str                                     # its run name: "pool=x seed=1", "pool=x learning_rate=0.02 seed=1"
    tuning: bool                                   # with a nuisance grid, the first seed's runs: every grid value

    @property
    def digest(self) -> str:
        return self.config.digest()


@dataclass(frozen=True)
class Study:
    keys: StudyKeys                                # the file as validated; name and description filled in
    path: str
    text: str
    base: Config
    axes: tuple[Axis, ...]
    variants: tuple[Variant, ...]
    grid: tuple[GridPoint, ...]                    # the nuisance grid, tuned per arm; () = none
    nuisance: tuple[str, ...]
    fixed: tuple[str, ...]

    name = property(lambda self: self.keys.name)
    description = property(lambda self: self.keys.description)
    design = property(lambda self: DESIGNS[self.keys.design])
    seeds = property(lambda self: tuple(self.keys.seeds))
    experiment = property(lambda self: self.keys.experiment or self.base.experiment)
    runs = property(lambda self: planned_runs(len(self.variants), len(self.seeds), len(self.grid)))

    def children(self, experiment: str | None = None) -> list[Child]:
        """Every (variant, seed), seed-major: an interrupted study has whole replicates first. With a
        nuisance grid, every (variant, grid value, seed) that may run: `tuning_children` are run, then
        `final_children` at each arm's chosen value."""
        out = []
        for seed, variant, point in itertools.product(self.seeds, self.variants, self.grid or (None,)):
            label = f"{variant.name}{f' {point.assignment}' if point else ''} seed={seed}"
            config = variant.config.override({**(point.options if point else {}), "seed": seed, "run_name": label,
                                              "experiment": experiment or self.experiment},
                                             source=f"{self.path}: {label}")
            out.append(Child(variant, seed, config, point, label, bool(self.grid) and seed == self.seeds[0]))
        return out

    def tuning_children(self, experiment: str | None = None) -> list[Child]:
        """With a nuisance grid: every arm at every grid value, with the first seed (none without a grid)."""
        return [c for c in self.children(experiment) if c.tuning]

    def final_children(self, choice: Mapping[str, str | None], experiment: str | None = None) -> list[Child]:
        """The other seeds of each arm at its chosen grid label (`choice`: variant name -> label; an arm
        whose label is None gets none). The first seed's run at that label is its tuning child."""
        return [c for c in self.children(experiment) if not c.tuning and c.grid_point is not None
                and c.grid_point.label == choice.get(c.variant.name)]

    @property
    def baseline(self) -> Variant:
        return next(v for v in self.variants if v.is_baseline)

    def digest(self) -> str:
        """Identifies the study's content (not its comments): the name, the seeds, each child's config."""
        return self._digest

    @functools.cached_property
    def _digest(self) -> str:
        children = self.children()
        content: dict[str, Any] = {"name": self.name, "design": self.design, "seeds": list(self.seeds),
                                   "variants": [[v.name, [c.digest for c in children if c.variant is v]]
                                                for v in self.variants],
                                   "nuisance_grid": [[p.label, {k: _jsonable(x) for k, x in p.options.items()}]
                                                     for p in self.grid]}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]

    def grid_spec(self) -> dict[str, list[Any]]:
        """The grid as the study file gives it: {option: [values]} (the spec's `nuisance_grid`)."""
        return {key: [_jsonable(v) for v in values] for key, values in (self.keys.nuisance_grid or {}).items()}

    def spec(self) -> dict[str, Any]:
        """What `report` needs to rebuild the tables from the store alone (logged on the parent)."""
        children = self.children()

        def digests(variant: Variant, point: GridPoint | None) -> dict[str, str]:
            return {str(c.seed): c.digest for c in children if c.variant is variant and c.grid_point is point}

        return {
            "name": self.name, "description": self.description, "study_file": self.path,
            "digest": self.digest(), "design": self.design, "seeds": list(self.seeds),
            "axes": {a.name: {"values": list(a.values), "baseline": a.baseline, "composite": a.composite,
                              "options": a.overrides} for a in self.axes},
            "baseline": self.baseline.name,
            "variants": [{"name": v.name, "factors": v.factors, "is_baseline": v.is_baseline,
                          "overrides": {k: _jsonable(x) for k, x in v.overrides.items()},
                          **({"grid_digests": {p.label: digests(v, p) for p in self.grid}} if self.grid
                             else {"config_digests": digests(v, None)})}
                         for v in self.variants],
            "hyperparameters": {"scientific": [a.name for a in self.axes], "nuisance": list(self.nuisance),
                                "fixed": list(self.fixed)},
            "base_config": self.base.to_dict(),
            **({"nuisance_grid": self.grid_spec()} if self.grid else {}),
        }


def planned_runs(variants: int, seeds: int, grid: int) -> int:
    """Every variant's seeds; with a nuisance grid, its tuning runs (one per grid value) replace the first seed's."""
    return variants * (max(grid, 1) + seeds - 1)


def _flat_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """{leaf name: value} of options given nested (model: {lrn: false}), dotted or flat."""
    out = {}
    for key, value in options.items():
        pairs = value.items() if str(key) in SECTIONS and isinstance(value, Mapping) else [(key, value)]
        out.update({str(k).split(".")[-1]: v for k, v in pairs})
    return out


def _check_option(name: str, where: str, what: str = "varied") -> None:
    if name in RESERVED_AXES:
        raise StudyError(f"{where} cannot be {what}: {RESERVED_AXES[name]}.")


def _values(name: str, raw: list[Any], base: Config, where: str) -> dict[str, Any]:
    """{value name: value} of an option's listed values, each a valid config."""
    out: dict[str, Any] = {}
    for value in raw:
        if isinstance(value, (Mapping, list)):
            raise StudyError(f"{where}: value {value!r} must be a single value.")
        if _value_name(value) in out:
            raise StudyError(f"{where}: value {_value_name(value)!r} is listed twice.")
        base.override({name: value}, source=f"{where}, value {_value_name(value)!r}")
        out[_value_name(value)] = value
    return out


def _parse_axis(name: str, raw: Any, base: Config, src: str) -> dict[str, dict[str, Any]]:
    """{value name: the options it sets}, each a valid config; ordered as the file lists them."""
    where = f"{src}: axis {name!r}"
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise StudyError(f"{src}: axis name {name!r} must be letters, digits, '_', '.' or '-'.")
    _check_option(name, where)
    if not isinstance(raw, Mapping):   # a config option and its values
        leaves = sorted(leaf_fields())
        if name not in leaves:
            raise StudyError(f"{where}: unknown option {name!r}.{did_you_mean(name, leaves)} An axis with a list "
                             f"of values must be a config option ({', '.join(leaves)}); a composite axis maps each "
                             f"value name to options, e.g. normalization: {{none: {{lrn: false, batchnorm: false}}}}.")
        if not isinstance(raw, list) or not raw:
            raise StudyError(f"{where} must list its values, e.g. {name}: [a, b]; got {raw!r}.")
        return {n: {name: v} for n, v in _values(name, raw, base, where).items()}
    if not raw:
        raise StudyError(f"{where} has no values.")
    overrides = {}
    for value, options in raw.items():   # composite: value name -> options
        at = f"{where}: value {_value_name(value)!r}"
        if not isinstance(options, Mapping) or not options:
            raise StudyError(f"{at} must map to a non-empty set of options, e.g. {{lrn: false, batchnorm: true}}; "
                             f"got {options!r}.")
        base.override(options, source=at)
        overrides[_value_name(value)] = _flat_options(options)
        for leaf in overrides[_value_name(value)]:
            _check_option(leaf, f"{at} sets {leaf!r}, which")
    (first, keys), *rest = ((n, o.keys()) for n, o in overrides.items())
    for value_name, other in rest:
        if other != keys:
            raise StudyError(f"{where}: every value must set the same options; {first!r} sets {sorted(keys)}, "
                             f"{value_name!r} sets {sorted(other)}.")
    return overrides


def load_study(path: str | Path) -> Study:
    """Read and validate a study file; count its runs, then build (and so check) every variant's Config."""
    try:
        spec, base = read_spec(path, StudyKeys, "study")
    except ConfigError as err:
        raise StudyError(str(err)) from None
    src = str(path)
    for axis in spec.baseline:
        if axis not in spec.axes:
            raise StudyError(f"{src}: `baseline` names {axis!r}, which is not an axis ({', '.join(spec.axes)}).")
    axes, owner = [], {}
    for axis_name, raw in spec.axes.items():
        overrides = _parse_axis(axis_name, raw, base, src)
        for leaf in {leaf for o in overrides.values() for leaf in o}:
            if leaf in owner:
                raise StudyError(f"{src}: axes {owner[leaf]!r} and {axis_name!r} both set {leaf!r}; make them "
                                 f"one composite axis.")
            owner[leaf] = axis_name
        # the baseline: the file's, else the value the base config already has, else the first listed
        baseline = (_value_name(spec.baseline[axis_name]) if axis_name in spec.baseline
                    else next((v for v, o in overrides.items() if base.override(o) == base), next(iter(overrides))))
        if baseline not in overrides:
            raise StudyError(f"{src}: baseline {axis_name}={baseline!r} is not one of its values "
                             f"({', '.join(overrides)}).")
        axes.append(Axis(axis_name, tuple(overrides), overrides, baseline, isinstance(raw, Mapping)))

    tuned = {}   # option -> {value name: value}
    for key, listed in (spec.nuisance_grid or {}).items():
        where = f"{src}: nuisance_grid {key!r}"
        if key not in leaf_fields():
            raise StudyError(f"{where}: unknown option.{did_you_mean(key, sorted(leaf_fields()))} Its keys are "
                             f"config options (flat names, e.g. nuisance_grid: {{learning_rate: [0.01, 0.02]}}).")
        _check_option(key, where, "tuned")
        if key in owner:
            raise StudyError(f"{where} is set by the axis {owner[key]!r} (scientific), so it cannot also be "
                             f"tuned as a nuisance.")
        tuned[key] = _values(key, listed, base, where)
    design = DESIGNS[spec.design]
    sizes = [len(a.values) for a in axes]
    count = math.prod(sizes) if design == "grid" else 1 + sum(sizes) - len(sizes)
    runs = planned_runs(count, len(spec.seeds), math.prod(map(len, tuned.values())) if tuned else 0)
    if runs > spec.max_runs:   # before any child config is built
        raise StudyError(f"{src}: the study {over_limit(runs, spec.max_runs)}.")

    base_choice = {a.name: a.baseline for a in axes}
    if design == "grid":
        points = [dict(zip(base_choice, combo)) for combo in itertools.product(*(a.values for a in axes))]
    else:
        points = [dict(base_choice)] + [{**base_choice, a.name: v} for a in axes for v in a.values if v != a.baseline]
    variants = []
    for factors in points:
        name = ",".join(f"{axis}={value}" for axis, value in factors.items() if value != base_choice[axis]) \
            or "baseline"
        merged = {k: v for a in axes for k, v in a.overrides[factors[a.name]].items()}
        config = base.override(merged, source=f"{src}: variant {name!r}")
        variants.append(Variant(name, dict(factors), merged, config, factors == base_choice))
    grid = []
    for combo in itertools.product(*(v.items() for v in tuned.values())) if tuned else ():
        label = combo[0][0] if len(tuned) == 1 else ",".join(f"{k}={n}" for k, (n, _) in zip(tuned, combo))
        grid.append(GridPoint(label, {key: value for key, (_, value) in zip(tuned, combo)}))
    for key, names in (("nuisance", spec.nuisance), ("fixed", spec.fixed)):
        if [n for n in names if n in owner]:
            raise StudyError(f"{src}: {', '.join(repr(n) for n in names if n in owner)} is an axis (scientific), so "
                             f"it cannot also be {key}.")
    if set(tuned) & set(spec.fixed):
        raise StudyError(f"{src}: {', '.join(map(repr, sorted(set(tuned) & set(spec.fixed))))} is tuned in "
                         f"`nuisance_grid`, so it cannot also be fixed.")
    nuisance = list(dict.fromkeys(["seed", *spec.nuisance, *tuned]))   # the seeds are always a nuisance
    fixed = spec.fixed or [n for n in leaf_fields() if n not in owner and n not in nuisance
                           and n not in ("experiment", "run_name")]   # neither scientific nor nuisance
    study = Study(spec, src, Path(path).read_text(), base, tuple(axes), tuple(variants), tuple(grid),
                  tuple(nuisance), tuple(fixed))
    seen: dict[str, str] = {}
    for child in study.children():   # builds (and so checks) every child's config
        if seen.setdefault(child.digest, child.label) != child.label:
            raise StudyError(f"{src}: {seen[child.digest]!r} and {child.label!r} are the same configuration; drop "
                             f"one of the values (or merge the axes into one composite axis).")
    return study


def plan_text(study: Study) -> str:
    """The variants and, with a nuisance grid, the plan: the tuning runs, then the final runs."""
    n_variants, n_seeds, n_tuning = len(study.variants), len(study.seeds), len(study.variants) * len(study.grid)
    runs = f"{n_variants} variants x {n_seeds} seeds"
    if study.grid:
        runs += (f", {len(study.grid)} nuisance values tuned per arm = {n_tuning} tuning + "
                 f"{study.runs - n_tuning} final")
    lines = [f"study {study.name!r} ({study.design}, {runs} = {study.runs} runs), experiment {study.experiment!r}"]
    for v in study.variants:
        lines.append(f"  {v.name:<32} " + ", ".join(f"{k}={_value_name(x)}" for k, x in v.overrides.items()))
    if study.grid:
        grid = ", ".join(f"{k} in {{{', '.join(map(_value_name, values))}}}" for k, values in study.grid_spec().items())
        lines.append(f"nuisance grid: {grid}")
        lines.append(f"1. tuning runs ({n_tuning}): every variant at every value, seed {study.seeds[0]}; each "
                     f"arm keeps the value with the best final val_accuracy (never test)")
        lines += [f"  {c.label}" for c in study.tuning_children()]
        rest = ", ".join(map(str, study.seeds[1:])) or "none"
        lines.append(f"2. final runs ({study.runs - n_tuning}): seeds {rest} of each variant at its chosen value "
                     f"(seed {study.seeds[0]}'s run there is its tuning run)")
        lines += [f"  {v.name} seed={seed}" for seed in study.seeds[1:] for v in study.variants]
    return "\n".join(lines)
