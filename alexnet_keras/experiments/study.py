"""Study files (experiments/ablation*.yaml): read, checked and expanded into every child's Config
before any run exists; `plan_text` says what a study will run."""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

from pydantic import AfterValidator, BeforeValidator, Field

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


class StudyError(ConfigError):
    """The study file is wrong; raised before any MLflow run exists."""


def _unique(seeds: list[int]) -> list[int]:
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"lists a seed twice: {seeds}")
    return seeds


class StudyIncomplete(RuntimeError):
    """Some children failed; the report was written with the others and the parent ends FAILED."""


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
    grid_point: GridPoint | None = None            # with a nuisance grid: the value this child trains at

    @property
    def digest(self) -> str:
        return self.config.digest()

    @property
    def label(self) -> str:
        return child_label(self.variant, self.grid_point, self.seed)


def child_label(variant: Variant, point: GridPoint | None, seed: int) -> str:
    """A child's label and run name: "pool=x seed=1", or "pool=x learning_rate=0.02 seed=1" with a grid."""
    at = f" {point.assignment}" if point is not None else ""
    return f"{variant.name}{at} seed={seed}"


@dataclass(frozen=True)
class Study:
    name: str
    description: str
    path: str
    text: str
    design: str
    seeds: tuple[int, ...]
    axes: tuple[Axis, ...]
    variants: tuple[Variant, ...]
    base: Config
    experiment: str
    nuisance: tuple[str, ...]
    fixed: tuple[str, ...] = field(default=())
    grid: tuple[GridPoint, ...] = field(default=())   # the nuisance grid, tuned per arm; () = none

    def children(self, experiment: str | None = None) -> list[Child]:
        """Every (variant, seed), seed-major: an interrupted study has whole replicates first. With a
        nuisance grid, every (variant, grid value, seed) that may run: `tuning_children` are run, then
        `final_children` at each arm's chosen value."""
        out = []
        for seed in self.seeds:
            for variant in self.variants:
                for point in self.grid or (None,):
                    config = variant.config.override({**(point.options if point is not None else {}),
                                                      "seed": seed, "run_name": child_label(variant, point, seed),
                                                      "experiment": experiment or self.experiment})
                    out.append(Child(variant, seed, config, point))
        return out

    def tuning_children(self, experiment: str | None = None) -> list[Child]:
        """With a nuisance grid: every arm at every grid value, with the first seed (none without a grid)."""
        return [c for c in self.children(experiment) if self.grid and c.seed == self.seeds[0]]

    def final_children(self, choice: Mapping[str, str | None], experiment: str | None = None) -> list[Child]:
        """The other seeds of each arm at its chosen grid label (`choice`: variant name -> label; an arm
        whose label is None gets none). The first seed's run at that label is its tuning child."""
        return [c for c in self.children(experiment) if c.seed != self.seeds[0] and c.grid_point is not None
                and c.grid_point.label == choice.get(c.variant.name)]

    def choose(self, finished: Mapping[str, Any]) -> dict[str, str | None]:
        """Each arm's grid label, recomputed from the store: `finished` maps config digests to FINISHED
        runs; the rule (best final validation accuracy of the tuning runs, never test) is report.py's."""
        from .report import choose_grid_value

        tuning: dict[str, dict[str, Any]] = {v.name: {} for v in self.variants}
        for child in self.tuning_children():
            tuning[child.variant.name][child.grid_point.label] = finished.get(child.digest)
        return {name: choose_grid_value(runs)[0] for name, runs in tuning.items()}

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
        spec: dict[str, list[Any]] = {}
        for point in self.grid:
            for key, value in point.options.items():
                if _jsonable(value) not in spec.setdefault(key, []):
                    spec[key].append(_jsonable(value))
        return spec

    def spec(self) -> dict[str, Any]:
        """What `report` needs to rebuild the tables from the store alone (logged on the parent)."""
        children = self.children()
        scientific = [a.name for a in self.axes]
        return {
            "name": self.name, "description": self.description, "study_file": self.path,
            "digest": self.digest(), "design": self.design, "seeds": list(self.seeds),
            "axes": {a.name: {"values": list(a.values), "baseline": a.baseline, "composite": a.composite,
                              "options": a.overrides} for a in self.axes},
            "baseline": self.baseline.name,
            "variants": [{"name": v.name, "factors": v.factors, "is_baseline": v.is_baseline,
                          "overrides": {k: _jsonable(x) for k, x in v.overrides.items()},
                          **self._digests_of(v, children)}
                         for v in self.variants],
            "hyperparameters": {"scientific": scientific, "nuisance": list(self.nuisance),
                                "fixed": list(self.fixed)},
            "base_config": self.base.to_dict(),
            **({"nuisance_grid": self.grid_spec()} if self.grid else {}),
        }

    def _digests_of(self, variant: Variant, children: list[Child]) -> dict[str, Any]:
        """`config_digests: {seed: digest}`, or with a grid `grid_digests: {label: {seed: digest}}`."""
        mine = [c for c in children if c.variant is variant]
        if not self.grid:
            return {"config_digests": {str(c.seed): c.digest for c in mine}}
        return {"grid_digests": {p.label: {str(c.seed): c.digest for c in mine if c.grid_point is p}
                                 for p in self.grid}}


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, (bool, int, float, str)) or value is None else str(value)


class StudyKeys(SpecKeys):
    """A study file's keys besides those every study and sweep file has."""

    design: Literal[tuple(DESIGNS)] = Field("one_factor_at_a_time", description="one factor at a time "
                                            "(ofat) or grid (factorial)")
    axes: dict[str, Any] = Field(min_length=1, description="each axis maps to its values, e.g. axes: "
                                 "{lrn: [true, false]}, or value names to options (a composite axis)")
    baseline: dict[str, Any] = Field({}, description="an axis' baseline value (default: the base config's)")
    seeds: Annotated[list[Seed], BeforeValidator(lambda v: list(range(v)) if type(v) is int and v > 0 else v),
                     AfterValidator(_unique)] = Field(min_length=1, description="list the training seeds, "
                                                      "e.g. seeds: [0, 1, 2] (or a count, seeds: 3)")
    nuisance: list[str] = Field([], description="options that are nuisance hyperparameters (always: seed)")
    fixed: list[str] = Field([], description="options held fixed (default: the rest)")
    nuisance_grid: dict[str, Annotated[list[Any], Field(min_length=1)]] | None = Field(
        None, description="options mapped to the values tried per arm, e.g. {learning_rate: [0.01, 0.02]}")


def _value_name(raw: Any) -> str:
    """How an axis value is named in variant names and tags: `true`, `0.5`, `none` for null."""
    return value_text(raw) or "none"


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


def _values(name: str, raw: Any, base: Config, where: str) -> dict[str, Any]:
    """{value name: value} of an option's listed values, each a valid config."""
    out: dict[str, Any] = {}
    for value in raw:
        value_name = _value_name(value)
        if isinstance(value, (Mapping, list)):
            raise StudyError(f"{where}: value {value!r} must be a single value.")
        if value_name in out:
            raise StudyError(f"{where}: value {value_name!r} is listed twice.")
        base.override({name: value}, source=f"{where}, value {value_name!r}")
        out[value_name] = value
    return out


def _parse_axis(name: str, raw: Any, base: Config, src: str) -> tuple[tuple[str, ...], dict, bool]:
    where = f"{src}: axis {name!r}"
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise StudyError(f"{src}: axis name {name!r} must be letters, digits, '_', '.' or '-'.")
    _check_option(name, where)
    if isinstance(raw, Mapping):   # composite: value name -> options
        if not raw:
            raise StudyError(f"{where} has no values.")
        overrides = {}
        for value, options in raw.items():
            if not isinstance(options, Mapping) or not options:
                raise StudyError(f"{where}: value {_value_name(value)!r} must map to a non-empty set of options, "
                                 f"e.g. {{lrn: false, batchnorm: true}}; got {options!r}.")
            base.override(options, source=f"{where}, value {_value_name(value)!r}")
            overrides[_value_name(value)] = _flat_options(options)
            for leaf in overrides[_value_name(value)]:
                _check_option(leaf, f"{where}: value {_value_name(value)!r} sets {leaf!r}, which")
        first, *rest = overrides.items()
        for value_name, options in rest:
            if options.keys() != first[1].keys():
                raise StudyError(f"{where}: every value must set the same options; {first[0]!r} sets "
                                 f"{sorted(first[1])}, {value_name!r} sets {sorted(options)}.")
        return tuple(overrides), overrides, True
    leaves = sorted(leaf_fields())
    if name not in leaves:
        raise StudyError(f"{where}: unknown option {name!r}.{did_you_mean(name, leaves)} An axis with a list of "
                         f"values must be a config option ({', '.join(leaves)}); a composite axis maps each value "
                         f"name to options, e.g. normalization: {{none: {{lrn: false, batchnorm: false}}}}.")
    if not isinstance(raw, list) or not raw:
        raise StudyError(f"{where} must list its values, e.g. {name}: [a, b]; got {raw!r}.")
    values = _values(name, raw, base, where)
    return tuple(values), {n: {name: v} for n, v in values.items()}, False


def _parse_grid(raw: Mapping[str, list] | None, base: Config, owner: Mapping[str, str],
                src: str) -> tuple[GridPoint, ...]:
    """`nuisance_grid: {option: [values], ...}` -> its points (the cartesian product of the keys, in
    the file's order); () when absent."""
    values: dict[str, dict[str, Any]] = {}
    for key, listed in (raw or {}).items():
        where = f"{src}: nuisance_grid {key!r}"
        if key not in leaf_fields():
            raise StudyError(f"{where}: unknown option.{did_you_mean(key, sorted(leaf_fields()))} Its keys are "
                             f"config options (flat names, e.g. nuisance_grid: {{learning_rate: [0.01, 0.02]}}).")
        _check_option(key, where, "tuned")
        if key in owner:
            raise StudyError(f"{where} is set by the axis {owner[key]!r} (scientific), so it cannot also be "
                             f"tuned as a nuisance.")
        values[key] = _values(key, listed, base, where)
    points, seen = [], {}
    for combo in itertools.product(*(v.items() for v in values.values())) if values else ():
        options = {key: value for key, (_, value) in zip(values, combo)}
        label = combo[0][0] if len(values) == 1 else ",".join(f"{k}={n}" for k, (n, _) in zip(values, combo))
        digest = base.override(options).digest()
        if digest in seen:
            raise StudyError(f"{src}: nuisance_grid values {seen[digest]!r} and {label!r} are the same "
                             f"configuration; drop one.")
        seen[digest] = label
        points.append(GridPoint(label, options))
    return tuple(points)


def load_study(path: str | Path) -> Study:
    """Read and validate a study file; build (and so check) every variant's full Config."""
    try:
        return _load_study(path)
    except StudyError:
        raise
    except ConfigError as err:
        raise StudyError(str(err)) from None


def _load_study(path: str | Path) -> Study:
    spec, base = read_spec(path, StudyKeys, "study")
    src, design = str(path), DESIGNS[spec.design]
    for axis in spec.baseline:
        if axis not in spec.axes:
            raise StudyError(f"{src}: `baseline` names {axis!r}, which is not an axis ({', '.join(spec.axes)}).")
    axes, owner = [], {}
    for axis_name, raw in spec.axes.items():
        values, overrides, composite = _parse_axis(axis_name, raw, base, src)
        for leaf in {leaf for o in overrides.values() for leaf in o}:
            if leaf in owner:
                raise StudyError(f"{src}: axes {owner[leaf]!r} and {axis_name!r} both set {leaf!r}; make them "
                                 f"one composite axis.")
            owner[leaf] = axis_name
        # the baseline: the file's, else the value the base config already has, else the first listed
        baseline = (_value_name(spec.baseline[axis_name]) if axis_name in spec.baseline
                    else next((v for v in values if base.override(overrides[v]) == base), values[0]))
        if baseline not in values:
            raise StudyError(f"{src}: baseline {axis_name}={baseline!r} is not one of its values "
                             f"({', '.join(values)}).")
        axes.append(Axis(axis_name, values, overrides, baseline, composite))

    base_choice = {a.name: a.baseline for a in axes}
    if design == "grid":
        points = [dict(zip(base_choice, combo)) for combo in itertools.product(*(a.values for a in axes))]
    else:
        points = [dict(base_choice)] + [{**base_choice, a.name: v} for a in axes for v in a.values if v != a.baseline]
    by_axis = {a.name: a for a in axes}
    variants, seen = [], {}
    for factors in points:
        name = ",".join(f"{axis}={value}" for axis, value in factors.items() if value != base_choice[axis]) \
            or "baseline"
        merged = {k: v for axis, value in factors.items() for k, v in by_axis[axis].overrides[value].items()}
        config = base.override(merged, source=f"{src}: variant {name!r}")
        if config.digest() in seen:
            raise StudyError(f"{src}: variants {seen[config.digest()]!r} and {name!r} are the same configuration; "
                             f"drop one of the values (or merge the axes into one composite axis).")
        seen[config.digest()] = name
        variants.append(Variant(name, dict(factors), merged, config, factors == base_choice))

    grid = _parse_grid(spec.nuisance_grid, base, owner, src)
    for variant in variants:   # every arm at every grid value is a config that must hold
        for point in grid:
            variant.config.override(point.options, source=f"{src}: variant {variant.name!r} at nuisance_grid "
                                                          f"{point.assignment}")
    tuned = list(grid[0].options) if grid else []
    leaves = leaf_fields()
    for key, names in (("nuisance", spec.nuisance), ("fixed", spec.fixed)):
        bad = [n for n in names if n not in leaves]
        if bad:
            raise StudyError(f"{src}: `{key}` names unknown option(s) {', '.join(map(repr, bad))}.")
        clash = [n for n in names if n in owner or n in by_axis]
        if clash:
            raise StudyError(f"{src}: {', '.join(map(repr, clash))} is an axis (scientific), so it cannot "
                             f"also be {key}.")
    if set(tuned) & set(spec.fixed):
        raise StudyError(f"{src}: {', '.join(map(repr, sorted(set(tuned) & set(spec.fixed))))} is tuned in "
                         f"`nuisance_grid`, so it cannot also be fixed.")
    nuisance = list(dict.fromkeys(["seed", *spec.nuisance, *tuned]))   # the seeds are always a nuisance
    fixed = spec.fixed or [n for n in leaves if n not in owner and n not in nuisance
                           and n not in ("experiment", "run_name")]   # neither scientific nor nuisance
    return Study(name=spec.name, description=spec.description, path=src, text=Path(path).read_text(),
                 design=design, seeds=tuple(spec.seeds), axes=tuple(axes), variants=tuple(variants), base=base,
                 experiment=spec.experiment or base.experiment, nuisance=tuple(nuisance), fixed=tuple(fixed), grid=grid)


def plan_text(study: Study) -> str:
    """The variants and, with a nuisance grid, the plan: the tuning runs, then the final runs."""
    n_variants, n_seeds = len(study.variants), len(study.seeds)
    if not study.grid:
        runs = f"{n_variants} variants x {n_seeds} seeds = {n_variants * n_seeds} runs"
    else:
        n_tuning, n_final = n_variants * len(study.grid), n_variants * (n_seeds - 1)
        runs = (f"{n_variants} variants x {n_seeds} seeds, {len(study.grid)} nuisance values tuned per arm = "
                f"{n_tuning} tuning + {n_final} final = {n_tuning + n_final} runs")
    lines = [f"study {study.name!r} ({study.design}, {runs}), experiment {study.experiment!r}"]
    for v in study.variants:
        options = ", ".join(f"{k}={_value_name(x)}" for k, x in v.overrides.items())
        lines.append(f"  {v.name:<32} {options}")
    if study.grid:
        grid = ", ".join(f"{k} in {{{', '.join(_value_name(x) for x in values)}}}"
                         for k, values in study.grid_spec().items())
        lines.append(f"nuisance grid: {grid}")
        lines.append(f"1. tuning runs ({n_tuning}): every variant at every value, seed {study.seeds[0]}; each "
                     f"arm keeps the value with the best final val_accuracy (never test)")
        lines += [f"  {c.label}" for c in study.tuning_children()]
        rest = ", ".join(map(str, study.seeds[1:])) or "none"
        lines.append(f"2. final runs ({n_final}): seeds {rest} of each variant at its chosen value (seed "
                     f"{study.seeds[0]}'s run there is its tuning run)")
        lines += [f"  {v.name} seed={seed}" for seed in study.seeds[1:] for v in study.variants]
    return "\n".join(lines)
