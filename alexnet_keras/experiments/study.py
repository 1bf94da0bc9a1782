"""Study files (experiments/ablation*.yaml): read, checked and expanded into every child's Config before any run."""

import functools
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

from pydantic import Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from ..config import SECTIONS, Config, ConfigError, Float, Int, Options, Seed, check_read, did_you_mean, leaf_fields
from ..tables import value_text
from .specfile import SpecKeys, read_spec

DESIGNS = {"one_factor_at_a_time": "one_factor_at_a_time", "ofat": "one_factor_at_a_time",
           "grid": "grid", "factorial": "grid"}
# Axes may not vary these (each message says why).
RESERVED_AXES = {"seed": "use `seeds:` to list the seeds", "split_seed": "every child must see the same split",
                 "experiment": "set `experiment:` at the top of the study", "run_name": "children are named "
                 "after their variant", "register": "the study registers its best variant: `alexnet-keras "
                 "ablate --register NAME`"}
MAX_RUNS = 1000   # more is rarely meant (seeds: 1000000), and its configs alone would take minutes to build


class StudyError(ConfigError):
    """The study file is wrong; raised before any MLflow run exists."""


class StudyIncomplete(RuntimeError):
    """Some children failed; the report was written with the others and the parent ends FAILED."""


def over_limit(runs: int, limit: int) -> str:
    return (f"plans {runs:,} runs, more than max_runs ({limit:,}); list fewer seeds or values, or allow them "
            f"with `max_runs: {runs}` in the study file")


class Rounds(Options):   # docs/methodology.md, "Seeds in rounds (AdaStop)"
    seeds_per_round: Int = Field(ge=1, description="seeds each open arm adds per round (N)")
    max_rounds: Int = Field(ge=1, description="the most rounds (K)")
    alpha: Float = Field(0.05, gt=0, lt=1, description="the family-wise error over all rounds and comparisons")
    metric: Literal["test_accuracy", "test_top5_accuracy", "final_train_accuracy"] = "test_accuracy"


class StudyKeys(SpecKeys):   # the keys of a study file besides those every study and sweep file has
    design: Literal[tuple(DESIGNS)] = Field("one_factor_at_a_time", description="one factor at a time "
                                            "(ofat) or grid (factorial)")
    axes: dict[str, Any] = Field(min_length=1, description="each axis maps to its values, e.g. axes: "
                                 "{lrn: [true, false]}, or value names to options (a composite axis)")
    baseline: dict[str, Any] = Field({}, description="an axis' baseline value (default: the base config's)")
    max_runs: Int = Field(MAX_RUNS, ge=1, description="the most runs the study may plan")   # before seeds
    rounds: Rounds | None = Field(None, description="add seeds in rounds until AdaStop decides (then no `seeds`)")
    seeds: list[Seed] = Field(None, min_length=1, validate_default=True, description="list the training seeds, "
                              "e.g. seeds: [0, 1, 2] (or a count, seeds: 3), or add them in `rounds`")
    nuisance: list[Literal[tuple(leaf_fields())]] = Field([], description="options that are nuisance "
                                                          "hyperparameters (always: seed)")
    fixed: list[Literal[tuple(leaf_fields())]] = Field([], description="options held fixed (default: the rest)")
    nuisance_grid: dict[str, Annotated[list[Any], Field(min_length=1)]] | None = Field(
        None, description="options mapped to the values tried per arm, e.g. {learning_rate: [0.01, 0.02]}")

    @field_validator("seeds", mode="before")
    @classmethod
    def _count(cls, value: Any, info: ValidationInfo) -> Any:
        """`seeds: 3` is [0, 1, 2] (with `rounds`, N x K); a count over max_runs is refused before its list is made."""
        rounds = info.data.get("rounds")
        if (value is None) == (rounds is None):   # neither (config.explain: "`seeds` is missing; <description>"), both
            raise (PydanticCustomError("missing", "") if rounds is None
                   else ValueError(f"cannot be listed with `rounds`, whose seeds it derives; got {value}"))
        value = rounds.seeds_per_round * rounds.max_rounds if rounds else value
        if type(value) is int and value > info.data.get("max_runs", MAX_RUNS):
            raise ValueError("alone " + over_limit(value, info.data.get("max_runs", MAX_RUNS)))
        return list(range(value)) if type(value) is int and value > 0 else value


def _value_name(raw: Any) -> str:
    """How a value is named in variant names, labels and tags: `true`, `0.5`, `none` for null."""
    return value_text(raw) or "none"


@dataclass(frozen=True)
class Variant:
    name: str                                      # "baseline", "lrn=false", "pool=x,dropout=0"
    factors: dict[str, str]                        # every axis -> its value name here
    overrides: dict[str, Any]                      # options set on top of the base config
    config: Config                                 # base + overrides (seed and names set per child)
    is_baseline: bool


@dataclass(frozen=True)
class GridPoint:
    label: str                                     # in the spec (report.py): "0.01"; with several keys "k1=v1,k2=v2"
    options: dict[str, Any]


@dataclass(frozen=True)
class Child:
    variant: Variant
    seed: int
    config: Config
    grid_point: GridPoint | None                   # with a nuisance grid: the value this child trains at
    label: str                                     # its run name: "pool=x seed=1", "pool=x learning_rate=0.02 seed=1"
    tuning: bool                                   # with a nuisance grid, the first seed's runs: every grid value
    digest = property(lambda self: self.config.digest())


@dataclass(frozen=True, eq=False)   # eq=False: hashed by identity, for the digest's cache
class Study:
    keys: StudyKeys                                # the file as validated; name and description filled in
    path: str
    base: Config
    axes: dict[str, dict[str, dict[str, Any]]]     # axis -> value name -> the options it sets, in the file's order
    variants: tuple[Variant, ...]
    grid: tuple[GridPoint, ...]                    # the nuisance grid, tuned per arm; () = none

    name = property(lambda self: self.keys.name)
    description = property(lambda self: self.keys.description)
    design = property(lambda self: DESIGNS[self.keys.design])
    seeds = property(lambda self: tuple(self.keys.seeds))
    experiment = property(lambda self: self.keys.experiment or self.base.experiment)
    runs = property(lambda self: planned_runs(len(self.variants), len(self.seeds), len(self.grid)))
    baseline = property(lambda self: next(v for v in self.variants if v.is_baseline))

    def children(self, experiment: str | None = None) -> list[Child]:
        """Every (variant, grid value, seed) that may run, seed-major; with a grid, the `tuning` ones first."""
        out = []
        for seed, variant, point in itertools.product(self.seeds, self.variants, self.grid or (None,)):
            at = " " + ",".join(f"{k}={_value_name(v)}" for k, v in point.options.items()) if point else ""
            label = f"{variant.name}{at} seed={seed}"
            config = variant.config.override({**(point.options if point else {}), "seed": seed, "run_name": label,
                                              "experiment": experiment or self.experiment},
                                             source=f"{self.path}: {label}")
            out.append(Child(variant, seed, config, point, label, bool(self.grid) and seed == self.seeds[0]))
        return out

    def tuning_children(self, experiment: str | None = None) -> list[Child]:
        """With a nuisance grid: every arm at every grid value, with the first seed (none without a grid)."""
        return [c for c in self.children(experiment) if c.tuning]

    @functools.cache
    def digest(self) -> str:
        """Identifies the study's content (not its comments): the name, the seeds, each child's config."""
        children = self.children()
        content = {"name": self.name, "design": self.design, "seeds": list(self.seeds),
                   "variants": [[v.name, [c.digest for c in children if c.variant is v]] for v in self.variants],
                   "nuisance_grid": [[p.label, p.options] for p in self.grid],
                   **({"rounds": self.keys.rounds.model_dump()} if self.keys.rounds else {})}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]

    def spec(self) -> dict[str, Any]:
        """What `report` needs to rebuild the tables from the store alone (logged on the parent)."""
        scientific = {option for values in self.axes.values() for options in values.values() for option in options}
        nuisance = list(dict.fromkeys(["seed", *self.keys.nuisance, *(self.keys.nuisance_grid or {})]))
        digests: dict[tuple, dict[str, str]] = {}   # (variant, grid label or None) -> {seed: digest}
        for c in self.children():
            digests.setdefault((c.variant.name, c.grid_point and c.grid_point.label), {})[str(c.seed)] = c.digest
        return {
            "name": self.name, "description": self.description, "study_file": self.path,
            "digest": self.digest(), "design": self.design, "seeds": list(self.seeds),
            "axes": {a: {"values": list(values), "baseline": self.baseline.factors[a], "options": values,
                         "composite": isinstance(self.keys.axes[a], Mapping)} for a, values in self.axes.items()},
            "baseline": self.baseline.name,
            "variants": [{"name": v.name, "factors": v.factors, "is_baseline": v.is_baseline, "overrides": v.overrides,
                          **({"grid_digests": {p.label: digests[v.name, p.label] for p in self.grid}} if self.grid
                             else {"config_digests": digests[v.name, None]})}
                         for v in self.variants],
            "hyperparameters": {"scientific": list(self.axes), "nuisance": nuisance, "fixed": self.keys.fixed or [
                n for n in leaf_fields() if n not in {*scientific, *nuisance, "experiment", "run_name"}]},
            "base_config": self.base.to_dict(),
            **({"nuisance_grid": self.keys.nuisance_grid} if self.grid else {}),
            **({"rounds": self.keys.rounds.model_dump()} if self.keys.rounds else {}),
        }


def planned_runs(variants: int, seeds: int, grid: int) -> int:
    """Every variant's seeds; with a nuisance grid, its tuning runs (one per grid value) replace the first seed's."""
    return variants * (max(grid, 1) + seeds - 1)


def _check_option(name: str, where: str, what: str) -> None:
    if name in RESERVED_AXES:
        raise StudyError(f"{where} cannot be {what}: {RESERVED_AXES[name]}.")


def _values(name: str, raw: list[Any], base: Config, where: str, what: str) -> dict[str, Any]:
    """{value name: value} of an option's listed values (`what`: varied or tuned), each a valid config."""
    _check_option(name, where, what)
    out: dict[str, Any] = {}
    for value in raw:
        if isinstance(value, (Mapping, list)):
            raise StudyError(f"{where}: value {value!r} must be a single value.")
        if _value_name(value) in out:
            raise StudyError(f"{where}: value {_value_name(value)!r} is listed twice.")
        base.override({name: value}, source=f"{where}, value {_value_name(value)!r}")
        out[_value_name(value)] = value
    return out


def _parse_axis(name: str, raw: Any, base: Config, where: str) -> dict[str, dict[str, Any]]:
    """{value name: the options it sets}, each a valid config, in the file's order."""
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise StudyError(f"{where}: the name must be letters, digits, '_', '.' or '-'.")
    if not raw or not isinstance(raw, (list, Mapping)):
        raise StudyError(f"{where} must list its values, e.g. {name}: [a, b], or map value names to options; "
                         f"got {raw!r}.")
    if isinstance(raw, list):   # a config option and its values
        if name not in leaf_fields():
            raise StudyError(f"{where}: unknown option {name!r}.{did_you_mean(name, sorted(leaf_fields()))} An axis "
                             f"with a list of values must be a config option; a composite axis maps each value name "
                             f"to options, e.g. normalization: {{none: {{lrn: false, batchnorm: false}}}}.")
        return {n: {name: v} for n, v in _values(name, raw, base, where, "varied").items()}
    overrides = {}
    for value, options in raw.items():   # composite: value name -> options, nested, dotted or flat
        at = f"{where}: value {_value_name(value)!r}"
        if not isinstance(options, Mapping) or not options:
            raise StudyError(f"{at} must map to a non-empty set of options, e.g. {{lrn: false, batchnorm: true}}; "
                             f"got {options!r}.")
        base.override(options, source=at)
        overrides[_value_name(value)] = leaves = {}
        for key, option in options.items():
            pairs = option.items() if key in SECTIONS and isinstance(option, Mapping) else [(key, option)]
            leaves.update({str(k).split(".")[-1]: v for k, v in pairs})
        for leaf in leaves:
            _check_option(leaf, f"{at} sets {leaf!r}, which", "varied")
        if leaves.keys() != next(iter(overrides.values())).keys():
            raise StudyError(f"{where}: every value must set the same options; {next(iter(overrides))!r} sets "
                             f"{sorted(next(iter(overrides.values())))}, {_value_name(value)!r} sets {sorted(leaves)}.")
    return overrides


def load_study(path: str | Path) -> Study:
    """Read and validate a study file; count its runs, then build (and so check) every child's Config."""
    try:
        spec, base = read_spec(path, StudyKeys, "study")
    except ConfigError as err:
        raise StudyError(str(err)) from None
    src = str(path)
    if len(set(spec.seeds)) != len(spec.seeds):
        raise StudyError(f"{src}: `seeds` lists a seed twice: {spec.seeds}.")
    if set(spec.baseline) - set(spec.axes):
        raise StudyError(f"{src}: `baseline` names {', '.join(set(spec.baseline) - set(spec.axes))}, which is not an "
                         f"axis ({', '.join(spec.axes)}).")
    axes, baseline, owner = {}, {}, {}
    for axis, raw in spec.axes.items():
        axes[axis] = values = _parse_axis(axis, raw, base, f"{src}: axis {axis!r}")
        for leaf in {leaf for options in values.values() for leaf in options}:
            if leaf in owner:
                raise StudyError(f"{src}: axes {owner[leaf]!r} and {axis!r} both set {leaf!r}; make them one "
                                 f"composite axis.")
            owner[leaf] = axis
        # the baseline: the file's, else the value the base config already has, else the first listed
        baseline[axis] = (_value_name(spec.baseline[axis]) if axis in spec.baseline
                          else next((v for v, o in values.items() if base.override(o) == base), next(iter(values))))
        if baseline[axis] not in values:
            raise StudyError(f"{src}: baseline {axis}={baseline[axis]!r} is not one of its values "
                             f"({', '.join(values)}).")
    tuned = {}   # option -> {value name: value}
    for key, listed in (spec.nuisance_grid or {}).items():
        where = f"{src}: nuisance_grid {key!r}"
        if key not in leaf_fields():
            raise StudyError(f"{where}: unknown option.{did_you_mean(key, sorted(leaf_fields()))} Its keys are "
                             f"config options (flat names, e.g. nuisance_grid: {{learning_rate: [0.01, 0.02]}}).")
        if key in owner:
            raise StudyError(f"{where} is set by the axis {owner[key]!r} (scientific), so it cannot also be "
                             f"tuned as a nuisance.")
        tuned[key] = _values(key, listed, base, where, "tuned")
        check_read(base, [key], where)
    for key, names in (("nuisance", spec.nuisance), ("fixed", spec.fixed)):
        if set(names) & set(owner):
            raise StudyError(f"{src}: {', '.join(sorted(set(names) & set(owner)))} is an axis (scientific), so it "
                             f"cannot also be {key}.")
    if set(tuned) & set(spec.fixed):
        raise StudyError(f"{src}: {', '.join(sorted(set(tuned) & set(spec.fixed)))} is tuned in `nuisance_grid`, "
                         f"so it cannot also be fixed.")
    sizes = [len(values) for values in axes.values()]
    count = math.prod(sizes) if DESIGNS[spec.design] == "grid" else 1 + sum(sizes) - len(sizes)
    runs = planned_runs(count, len(spec.seeds), math.prod(map(len, tuned.values())) if tuned else 0)
    if runs > spec.max_runs:   # before any variant or child config is built
        raise StudyError(f"{src}: the study {over_limit(runs, spec.max_runs)}.")

    if DESIGNS[spec.design] == "grid":
        points = [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]
    else:
        points = [baseline] + [{**baseline, a: v} for a, values in axes.items() for v in values if v != baseline[a]]
    variants = []
    for factors in points:
        name = ",".join(f"{a}={value}" for a, value in factors.items() if value != baseline[a]) or "baseline"
        merged = {k: v for a, value in factors.items() for k, v in axes[a][value].items()}
        config = base.override(merged, source=f"{src}: variant {name!r}")
        for a in (a for a in axes if factors[a] != baseline[a]):
            check_read(config, list(axes[a][factors[a]]), f"{src}: axis {a!r}")
        variants.append(Variant(name, factors, merged, config, factors == baseline))
    if spec.rounds and (len(variants) < 2 or spec.nuisance_grid):
        raise StudyError(f"{src}: `rounds` compares each variant at one setting with the baseline: it needs a variant "
                         f"besides the baseline, and no `nuisance_grid`.")
    grid = []
    for combo in itertools.product(*(values.items() for values in tuned.values())) if tuned else ():
        label = combo[0][0] if len(tuned) == 1 else ",".join(f"{k}={n}" for k, (n, _) in zip(tuned, combo))
        grid.append(GridPoint(label, {key: value for key, (_, value) in zip(tuned, combo)}))
    study = Study(spec, src, base, axes, tuple(variants), tuple(grid))
    seen: dict[str, str] = {}
    for child in study.children():   # builds (and so checks) every child's config
        if seen.setdefault(child.digest, child.label) != child.label:
            raise StudyError(f"{src}: {seen[child.digest]!r} and {child.label!r} are the same configuration; drop "
                             f"one of the values (or merge the axes into one composite axis).")
    return study


def plan_text(study: Study) -> str:
    """The variants and, with a nuisance grid, the plan: the tuning runs, then the final runs."""
    n_tuning = len(study.variants) * len(study.grid)
    runs = f"{len(study.variants)} variants x {len(study.seeds)} seeds" + (" at most" if study.keys.rounds else "")
    if study.grid:
        runs += f", {len(study.grid)} nuisance values tuned per arm = {n_tuning} tuning + {study.runs - n_tuning} final"
    lines = [f"study {study.name!r} ({study.design}, {runs} = {study.runs} runs), experiment {study.experiment!r}"]
    lines += [f"  {v.name:<32} " + ", ".join(f"{k}={_value_name(x)}" for k, x in v.overrides.items())
              for v in study.variants]
    if study.grid:
        lines.append("nuisance grid: " + ", ".join(f"{k} in {{{', '.join(map(_value_name, values))}}}"
                                                   for k, values in study.keys.nuisance_grid.items()))
        lines.append(f"1. tuning runs ({n_tuning}): every variant at every value, seed {study.seeds[0]}; each "
                     f"arm keeps the value with the best final val_accuracy (never test)")
        lines += [f"  {c.label}" for c in study.tuning_children()]
        lines.append(f"2. final runs ({study.runs - n_tuning}): seeds {', '.join(map(str, study.seeds[1:])) or 'none'} "
                     f"of each variant at its chosen value (seed {study.seeds[0]}'s run there is its tuning run)")
        lines += [f"  {v.name} seed={seed}" for seed in study.seeds[1:] for v in study.variants]
    return "\n".join(lines)
