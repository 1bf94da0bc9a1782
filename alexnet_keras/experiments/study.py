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
from typing import Any, Mapping

from ..config import SECTIONS, Config, ConfigError, did_you_mean, leaf_fields
from ..tables import value_text
from .specfile import located, read_spec

DESIGNS = {"one_factor_at_a_time": "one_factor_at_a_time", "ofat": "one_factor_at_a_time",
           "grid": "grid", "factorial": "grid"}
# The keys of a study file besides those every study and sweep file has (specfile.COMMON_KEYS).
STUDY_KEYS = ("design", "axes", "baseline", "seeds", "nuisance", "fixed", "nuisance_grid")
# Axes may not vary these: seeds have their own key, the split must be the same for every child,
# and naming is the study's job.
RESERVED_AXES = {"seed": "use `seeds:` to list the seeds", "split_seed": "every child must see the same split",
                 "experiment": "set `experiment:` at the top of the study", "run_name": "children are named "
                 "after their variant", "register": "the study registers its best variant: `alexnet-keras "
                 "ablate --register NAME`"}


class StudyError(ConfigError):
    """The study file is wrong; raised before any MLflow run exists."""


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
                                                for v in self.variants]}
        if self.grid:   # studies without a grid keep the digests they were logged under
            content["nuisance_grid"] = [[p.label, {k: _jsonable(x) for k, x in p.options.items()}]
                                        for p in self.grid]
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


# ----------------------------------------------------------------------------------------------
# Loading and validation: everything here runs before any MLflow call.
# ----------------------------------------------------------------------------------------------

def _value_name(raw: Any) -> str:
    """How an axis value is named in variant names and tags: `true`, `0.5`, `none` for null."""
    return value_text(raw) or "none"


def _leaf_names(options: Mapping[str, Any]) -> set[str]:
    names = set()
    for key, value in options.items():
        key = str(key)
        if key in SECTIONS and isinstance(value, Mapping):
            names.update(str(k).split(".")[-1] for k in value)
        else:
            names.add(key.split(".")[-1])
    return names


def _flat_options(options: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in options.items():
        key = str(key)
        if key in SECTIONS and isinstance(value, Mapping):
            out.update({str(k).split(".")[-1]: v for k, v in value.items()})
        else:
            out[key.split(".")[-1]] = value
    return out


def _parse_axis(name: str, raw: Any, base: Config, src: str) -> tuple[tuple[str, ...], dict, bool]:
    leaves = leaf_fields()
    where = f"{src}: axis {name!r}"
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise StudyError(f"{src}: axis name {name!r} must be letters, digits, '_', '.' or '-'.")
    if name in RESERVED_AXES:
        raise StudyError(f"{where} cannot be varied: {RESERVED_AXES[name]}.")
    if isinstance(raw, Mapping):   # composite: value name -> options
        if not raw:
            raise StudyError(f"{where} has no values.")
        overrides, leaf_sets = {}, {}
        for value, options in raw.items():
            value_name = _value_name(value)
            if not isinstance(options, Mapping) or not options:
                raise StudyError(f"{where}: value {value_name!r} must map to a non-empty set of options, "
                                 f"e.g. {{lrn: false, batchnorm: true}}; got {options!r}.")
            try:
                base.override(options, source=f"{where}, value {value_name!r}")
            except ConfigError as err:
                raise StudyError(located(err, src, f"{where}, value {value_name!r}")) from None
            for leaf in _leaf_names(options):
                if leaf in RESERVED_AXES:
                    raise StudyError(f"{where}: value {value_name!r} sets {leaf!r}, which cannot be varied: "
                                     f"{RESERVED_AXES[leaf]}.")
            overrides[value_name] = _flat_options(options)
            leaf_sets[value_name] = _leaf_names(options)
        first, *rest = leaf_sets.items()
        for value_name, names in rest:
            if names != first[1]:
                raise StudyError(f"{where}: every value must set the same options; {first[0]!r} sets "
                                 f"{sorted(first[1])}, {value_name!r} sets {sorted(names)}.")
        return tuple(overrides), overrides, True
    if name not in leaves:
        hint = did_you_mean(name, sorted(leaves))
        raise StudyError(f"{where}: unknown option {name!r}.{hint} An axis with a list of values must be a "
                         f"config option ({', '.join(sorted(leaves))}); a composite axis maps each value "
                         f"name to options, e.g. normalization: {{none: {{lrn: false, batchnorm: false}}}}.")
    if not isinstance(raw, list) or not raw:
        raise StudyError(f"{where} must list its values, e.g. {name}: [a, b]; got {raw!r}.")
    overrides = {}
    for value in raw:
        if isinstance(value, (Mapping, list)):
            raise StudyError(f"{where}: value {value!r} must be a single value.")
        value_name = _value_name(value)
        if value_name in overrides:
            raise StudyError(f"{where}: value {value_name!r} is listed twice.")
        try:
            base.override({name: value}, source=f"{where}, value {value_name!r}")
        except ConfigError as err:
            raise StudyError(f"{where}: {err}") from None
        overrides[value_name] = {name: value}
    return tuple(overrides), overrides, False


def _parse_seeds(raw: Any, src: str) -> tuple[int, ...]:
    if raw is None:
        raise StudyError(f"{src}: `seeds` is missing; list the training seeds, e.g. seeds: [0, 1, 2] "
                         f"(or a count, seeds: 3).")
    if isinstance(raw, int) and not isinstance(raw, bool):
        if raw < 1:
            raise StudyError(f"{src}: `seeds: {raw}` must be a positive count or a list of integers.")
        return tuple(range(raw))
    if (not isinstance(raw, list) or not raw
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in raw)):
        raise StudyError(f"{src}: `seeds` must be a non-empty list of non-negative integers, e.g. "
                         f"[0, 1, 2]; got {raw!r}.")
    if len(set(raw)) != len(raw):
        raise StudyError(f"{src}: `seeds` lists a seed twice: {raw!r}.")
    return tuple(raw)


def _parse_grid(raw: Any, base: Config, owner: Mapping[str, str], src: str) -> tuple[GridPoint, ...]:
    """`nuisance_grid: {option: [values], ...}` -> its points (the cartesian product of the keys, in
    the file's order); () when absent."""
    if raw is None:
        return ()
    example = "e.g. nuisance_grid: {learning_rate: [0.01, 0.02, 0.05]}"
    if not isinstance(raw, Mapping) or not raw:
        raise StudyError(f"{src}: `nuisance_grid` must map options to the values tried per arm, {example}; "
                         f"got {raw!r}.")
    leaves = leaf_fields()
    values: dict[str, list[tuple[str, Any]]] = {}
    for key, listed in raw.items():
        where = f"{src}: nuisance_grid {key!r}"
        if not isinstance(key, str) or key not in leaves:
            hint = did_you_mean(str(key), sorted(leaves))
            raise StudyError(f"{where}: unknown option.{hint} Its keys are config options (flat names, "
                             f"{example}).")
        if key in RESERVED_AXES:
            raise StudyError(f"{where} cannot be tuned: {RESERVED_AXES[key]}.")
        if key in owner:
            raise StudyError(f"{where} is set by the axis {owner[key]!r} (scientific), so it cannot also be "
                             f"tuned as a nuisance.")
        if not isinstance(listed, list) or not listed:
            raise StudyError(f"{where} must list the values to try, {example}; got {listed!r}.")
        values[key] = []
        for value in listed:
            if isinstance(value, (Mapping, list)):
                raise StudyError(f"{where}: value {value!r} must be a single value.")
            name = _value_name(value)
            if name in (n for n, _ in values[key]):
                raise StudyError(f"{where}: value {name!r} is listed twice.")
            try:
                base.override({key: value}, source=f"{where}, value {name!r}")
            except ConfigError as err:
                raise StudyError(located(err, src, f"{where}, value {name!r}")) from None
            values[key].append((name, value))
    points, seen = [], {}
    for combo in itertools.product(*values.values()):
        options = {key: value for key, (_, value) in zip(values, combo)}
        label = (combo[0][0] if len(values) == 1
                 else ",".join(f"{key}={name}" for key, (name, _) in zip(values, combo)))
        digest = base.override(options).digest()
        if digest in seen:
            raise StudyError(f"{src}: nuisance_grid values {seen[digest]!r} and {label!r} are the same "
                             f"configuration; drop one.")
        seen[digest] = label
        points.append(GridPoint(label, options))
    return tuple(points)


def _variant_name(factors: Mapping[str, str], baseline: Mapping[str, str]) -> str:
    changed = [f"{axis}={value}" for axis, value in factors.items() if value != baseline[axis]]
    return ",".join(changed) or "baseline"


def load_study(path: str | Path) -> Study:
    """Read and validate a study file; build (and so check) every variant's full Config."""
    spec = read_spec(path, kind="study", keys=STUDY_KEYS, error=StudyError)
    src, data, base = spec.source, spec.data, spec.base

    design_raw = data.get("design", "one_factor_at_a_time")
    if design_raw not in DESIGNS:
        raise StudyError(f"{src}: `design` must be one of one_factor_at_a_time, grid; got {design_raw!r}.")
    design = DESIGNS[design_raw]
    seeds = _parse_seeds(data.get("seeds"), src)

    raw_axes = data.get("axes")
    if not isinstance(raw_axes, Mapping) or not raw_axes:
        raise StudyError(f"{src}: `axes` must map at least one axis to its values, e.g. axes: {{lrn: [true, "
                         f"false]}}; got {raw_axes!r}.")
    raw_baseline = data.get("baseline") or {}
    if not isinstance(raw_baseline, Mapping):
        raise StudyError(f"{src}: `baseline` must map axes to one of their values; got {raw_baseline!r}.")
    for axis in raw_baseline:
        if axis not in raw_axes:
            raise StudyError(f"{src}: `baseline` names {axis!r}, which is not an axis ({', '.join(raw_axes)}).")

    axes, owner = [], {}
    for axis_name, raw in raw_axes.items():
        values, overrides, composite = _parse_axis(axis_name, raw, base, src)
        for leaf in set().union(*(_flat_options(o).keys() for o in overrides.values())):
            if leaf in owner:
                raise StudyError(f"{src}: axes {owner[leaf]!r} and {axis_name!r} both set {leaf!r}; make them "
                                 f"one composite axis.")
            owner[leaf] = axis_name
        if axis_name in raw_baseline:
            baseline = _value_name(raw_baseline[axis_name])
            if baseline not in values:
                raise StudyError(f"{src}: baseline {axis_name}={baseline!r} is not one of its values "
                                 f"({', '.join(values)}).")
        else:   # the value the base config already has, else the first listed
            baseline = next((v for v in values if base.override(overrides[v]) == base), values[0])
        axes.append(Axis(axis_name, values, overrides, baseline, composite))

    base_choice = {a.name: a.baseline for a in axes}
    if design == "grid":
        points = [dict(zip(base_choice, combo)) for combo in itertools.product(*(a.values for a in axes))]
    else:
        points = [dict(base_choice)]
        for a in axes:
            points += [{**base_choice, a.name: v} for v in a.values if v != a.baseline]

    by_axis = {a.name: a for a in axes}
    variants, seen = [], {}
    for factors in points:
        name_ = _variant_name(factors, base_choice)
        merged: dict[str, Any] = {}
        for axis_name, value in factors.items():
            merged.update(by_axis[axis_name].overrides[value])
        try:
            config = base.override(merged, source=f"{src}: variant {name_!r}")
        except ConfigError as err:
            raise StudyError(located(err, src, f"{src}: variant {name_!r}")) from None
        digest = config.digest()
        if digest in seen:
            raise StudyError(f"{src}: variants {seen[digest]!r} and {name_!r} are the same configuration; "
                             f"drop one of the values (or merge the axes into one composite axis).")
        seen[digest] = name_
        variants.append(Variant(name_, dict(factors), merged, config, factors == base_choice))

    grid = _parse_grid(data.get("nuisance_grid"), base, owner, src)
    for variant in variants:   # every arm at every grid value is a config that must hold
        for point in grid:
            try:
                variant.config.override(point.options, source=f"{src}: variant {variant.name!r} at "
                                                              f"nuisance_grid {point.assignment}")
            except ConfigError as err:
                raise StudyError(located(err, src, f"{src}: variant {variant.name!r} at nuisance_grid "
                                                   f"{point.assignment}")) from None
    tuned = list(grid[0].options) if grid else []

    nuisance = data.get("nuisance") or []
    fixed = data.get("fixed") or []
    leaves = leaf_fields()
    for key, names in (("nuisance", nuisance), ("fixed", fixed)):
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise StudyError(f"{src}: `{key}` must be a list of option names; got {names!r}.")
        bad = [n for n in names if n not in leaves]
        if bad:
            raise StudyError(f"{src}: `{key}` names unknown option(s) {', '.join(map(repr, bad))}.")
        clash = [n for n in names if n in owner or n in by_axis]
        if clash:
            raise StudyError(f"{src}: {', '.join(map(repr, clash))} is an axis (scientific), so it cannot "
                             f"also be {key}.")
    if set(tuned) & set(fixed):
        raise StudyError(f"{src}: {', '.join(map(repr, sorted(set(tuned) & set(fixed))))} is tuned in "
                         f"`nuisance_grid`, so it cannot also be fixed.")
    nuisance = list(dict.fromkeys(["seed", *nuisance, *tuned]))   # the seeds are always a nuisance
    if not fixed:   # everything that is neither scientific nor nuisance
        fixed = [n for n in leaves if n not in owner and n not in nuisance and n not in ("experiment", "run_name")]
    return Study(name=spec.name, description=spec.description, path=src, text=spec.text, design=design,
                 seeds=seeds, axes=tuple(axes), variants=tuple(variants), base=base, experiment=spec.experiment,
                 nuisance=tuple(nuisance), fixed=tuple(fixed), grid=grid)


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
