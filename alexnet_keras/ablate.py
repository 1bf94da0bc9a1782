"""Ablation studies: one MLflow parent run per study, one child run per (variant, seed).

A study file (see experiments/ablation.yaml) names a base config, the axes to vary and the seeds:

    name: alexnet-cifar10-ablation
    description: ...
    base_config: cifar10.yaml          # optional, relative to the study file; then `base` on top
    base: {epochs: 30}                 # any training option, nested (model/data/train) or flat
    design: one_factor_at_a_time       # or `grid` (the cartesian product of the axes)
    seeds: [0, 1, 2]                   # or a count: 3 = [0, 1, 2]
    axes:
      pool: [overlapping, non_overlapping]           # a config option and its values
      normalization:                                 # a composite axis: value name -> options
        lrn: {lrn: true, batchnorm: false}
        none: {lrn: false, batchnorm: false}
    baseline: {pool: overlapping}      # optional; default: the value matching the base config,
                                       # else the first value listed
    nuisance: [seed]                   # optional, recorded in the report (tuning playbook roles)

The axes are the scientific hyperparameters, `seeds` (and `nuisance`) the nuisance ones, everything
else is fixed at the base config's value. Every variant's full Config is built (and so validated)
before any run is created; a mistake fails with a message that names the file, the axis and the value.

Re-running a study resumes it: the parent run is found again by its study name and study digest, the
children that FINISHED with the same config digest are kept, the others (failed, killed, never
started) run. Under `mlflow run` the parent is the run MLflow made ($MLFLOW_RUN_ID); finished children
of an earlier parent of the same study are moved under it. The keys every study and sweep file shares
(name ... base) are read by specfile.py; finding, ending and adopting runs is tracking.py's protocol,
the same for `train`, `ablate` and `tune`.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from . import tracking
from .config import SECTIONS, Config, ConfigError, did_you_mean, leaf_fields
from .specfile import located, read_spec
from .tables import value_text
from .tracking import (BASELINE_TAG, CONFIG_DIGEST_TAG, FACTOR_TAG, ROLE_TAG, SEED_TAG, SPEC_ARTIFACT,
                       STUDY_DIGEST_TAG, STUDY_TAG, VARIANT_TAG)   # tag names live in tracking.py

DESIGNS = {"one_factor_at_a_time": "one_factor_at_a_time", "ofat": "one_factor_at_a_time",
           "grid": "grid", "factorial": "grid"}
# The keys of a study file besides those every study and sweep file has (specfile.COMMON_KEYS).
STUDY_KEYS = ("design", "axes", "baseline", "seeds", "nuisance", "fixed")
# Axes may not vary these: seeds have their own key, the split must be the same for every child,
# and naming is the study's job.
RESERVED_AXES = {"seed": "use `seeds:` to list the seeds", "split_seed": "every child must see the same split",
                 "experiment": "set `experiment:` at the top of the study", "run_name": "children are named "
                 "after their variant"}


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
class Child:
    variant: Variant
    seed: int
    config: Config

    @property
    def digest(self) -> str:
        return self.config.digest()

    @property
    def label(self) -> str:
        return f"{self.variant.name} seed={self.seed}"


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

    def children(self, experiment: str | None = None) -> list[Child]:
        """Every (variant, seed), seed-major: an interrupted study has whole replicates first."""
        out = []
        for seed in self.seeds:
            for variant in self.variants:
                config = variant.config.override({"seed": seed, "run_name": f"{variant.name} seed={seed}",
                                                  "experiment": experiment or self.experiment})
                out.append(Child(variant, seed, config))
        return out

    @property
    def baseline(self) -> Variant:
        return next(v for v in self.variants if v.is_baseline)

    def digest(self) -> str:
        """Identifies the study's content (not its comments): the name, the seeds, each child's config."""
        return self._digest

    @functools.cached_property
    def _digest(self) -> str:
        children = self.children()
        content = {"name": self.name, "design": self.design, "seeds": list(self.seeds),
                   "variants": [[v.name, [c.digest for c in children if c.variant is v]]
                                for v in self.variants]}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]

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
                          "config_digests": {str(c.seed): c.digest for c in children if c.variant is v}}
                         for v in self.variants],
            "hyperparameters": {"scientific": scientific, "nuisance": list(self.nuisance),
                                "fixed": list(self.fixed)},
            "base_config": self.base.to_dict(),
        }


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
    nuisance = list(dict.fromkeys(["seed", *nuisance]))   # the seeds are always a nuisance
    if not fixed:   # everything that is neither scientific nor nuisance
        fixed = [n for n in leaves if n not in owner and n not in nuisance and n not in ("experiment", "run_name")]
    return Study(name=spec.name, description=spec.description, path=src, text=spec.text, design=design,
                 seeds=seeds, axes=tuple(axes), variants=tuple(variants), base=base, experiment=spec.experiment,
                 nuisance=tuple(nuisance), fixed=tuple(fixed))


def plan_text(study: Study) -> str:
    lines = [f"study {study.name!r} ({study.design}, {len(study.variants)} variants x {len(study.seeds)} "
             f"seeds = {len(study.variants) * len(study.seeds)} runs), experiment {study.experiment!r}"]
    for v in study.variants:
        options = ", ".join(f"{k}={_value_name(x)}" for k, x in v.overrides.items())
        lines.append(f"  {v.name:<32} {options}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Running: the parent, the children, resumption.
# ----------------------------------------------------------------------------------------------

def child_tags(study: Study, child: Child) -> dict[str, str]:
    return {
        STUDY_TAG: study.name, STUDY_DIGEST_TAG: study.digest(), ROLE_TAG: "child",
        VARIANT_TAG: child.variant.name, BASELINE_TAG: str(child.variant.is_baseline).lower(),
        SEED_TAG: str(child.seed),
        **{FACTOR_TAG + axis: value for axis, value in child.variant.factors.items()},
    }


def _init_worker(tracking_uri: str, threads: int) -> None:
    """Runs once in each spawned worker, before TensorFlow is imported by any task."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")   # workers share one GPU
    os.environ.pop("MLFLOW_RUN_ID", None)
    tracking.configure(tracking_uri)
    try:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
    except Exception:   # another backend without TensorFlow, or already initialised
        pass


def _train_child(config: Config, tags: dict[str, str], parent_run_id: str) -> tuple[str, dict[str, float]]:
    from .train import train_and_evaluate

    result = train_and_evaluate(config, tags=tags, parent_run_id=parent_run_id)
    return result.run_id, result.metrics


@dataclass
class StudyResult:
    parent_run_id: str
    ran: list[str]
    skipped: list[str]
    failed: dict[str, str]          # child label -> error
    report: Any = None


def run_study(study: Study, *, parallel: int = 1, tracking_uri: str | None = None) -> StudyResult:
    """Create or resume the parent, train the missing children, write the report on the parent."""
    from .report import build_report

    if parallel < 1:
        raise StudyError(f"--parallel must be at least 1; got {parallel}.")
    uri = tracking.configure(tracking_uri)
    env_run_id = os.environ.get("MLFLOW_RUN_ID")
    parent_tags = {STUDY_TAG: study.name, STUDY_DIGEST_TAG: study.digest(), ROLE_TAG: "parent"}
    if env_run_id:   # under `mlflow run`: the parent is the run MLflow created for us
        experiment_id = tracking.get_run(env_run_id).info.experiment_id
        experiment_name = tracking.experiment_name(experiment_id)
        if experiment_name != study.experiment:
            print(f"note: `mlflow run` chose experiment {experiment_name!r}; the study's {study.experiment!r} "
                  f"is used only outside `mlflow run` (pass --experiment-name to pick it)")
        resume = None
    else:
        experiment_id = tracking.open_experiment(study.experiment)   # create it before any fan-out
        experiment_name = study.experiment
        resume = tracking.latest_run(parent_tags, experiment_ids=[experiment_id])

    result = StudyResult(parent_run_id="", ran=[], skipped=[], failed={})
    params = {"study": study.name, "study_file": study.path, "design": study.design,
              "seeds": ",".join(map(str, study.seeds)), "axes": ",".join(a.name for a in study.axes),
              "num_variants": len(study.variants), "num_children": len(study.variants) * len(study.seeds)}
    with tracking.run(experiment_name, run_name=study.name, params=params,
                      tags={**parent_tags, tracking.RUN_NAME_TAG: study.name},
                      run_id=resume.info.run_id if resume is not None else None) as active:
        parent_id = active.info.run_id
        result.parent_run_id = parent_id
        os.environ.pop("MLFLOW_RUN_ID", None)   # children (and workers) must not resume the parent
        tracking.log_dict(study.spec(), SPEC_ARTIFACT)
        tracking.log_text(study.text, "study/" + Path(study.path).name)
        print(plan_text(study))
        how = "made by `mlflow run`" if env_run_id else "resumed" if resume is not None else "new"
        print(f"parent run {parent_id} ({how}) in experiment {experiment_name!r} at {uri}")

        # Resuming: children a killed study left RUNNING end KILLED (and run again); finished children
        # of earlier parents of this study (an earlier `mlflow run`) move here; finished ones are kept.
        children = study.children(experiment_name)
        wanted = {c.digest for c in children}
        tracking.end_stale_children(parent_id, "stale: the study was restarted")
        tracking.adopt_children(parent_id, tracking.find_runs(parent_tags, experiment_ids=[experiment_id]),
                                key_tag=CONFIG_DIGEST_TAG, wanted=wanted)
        done = tracking.children_by(parent_id, CONFIG_DIGEST_TAG, status="FINISHED")
        todo = [c for c in children if c.digest not in done]
        result.skipped = [c.label for c in children if c.digest in done]
        if result.skipped:
            print(f"{len(result.skipped)} of {len(children)} children already finished: skipped")
        start = time.perf_counter()
        if parallel > 1 and len(todo) > 1:
            _run_parallel(study, todo, parent_id, min(parallel, len(todo)), uri, result)
        else:
            _run_sequential(study, todo, parent_id, result)
        print(f"trained {len(result.ran)} children in {time.perf_counter() - start:.1f}s; "
              f"{len(result.failed)} failed")
        result.report = build_report(parent_id)
        tracking.log_metrics({"children_trained": len(result.ran), "children_skipped": len(result.skipped),
                              "children_failed": len(result.failed)})
        if result.failed:
            raise StudyIncomplete(f"{len(result.failed)} of {len(children)} children failed (re-run the study "
                                  f"to retry them): " + "; ".join(f"{k}: {v}" for k, v in result.failed.items()))
    return result


def _fatal(err: BaseException) -> bool:
    """Errors every child would hit again (bad data path, bad config): stop the study."""
    from .data import DataError

    return isinstance(err, (ConfigError, DataError, tracking.TrackingError))


def _record_failure(result: StudyResult, child: Child, err: Exception) -> None:
    """A child's own failure is recorded and the study goes on; a fatal one (bad input, store) stops it."""
    if _fatal(err):
        raise err
    result.failed[child.label] = f"{type(err).__name__}: {err}"
    print(f"child {child.label} failed: {err}", flush=True)


def _run_sequential(study: Study, todo: list[Child], parent_id: str, result: StudyResult) -> None:
    import keras

    from .train import train_and_evaluate

    for i, child in enumerate(todo, 1):
        print(f"\n[{i}/{len(todo)}] {child.label}", flush=True)
        keras.backend.clear_session()   # one process, many models: drop the previous graphs
        try:
            train_and_evaluate(child.config, tags=child_tags(study, child), parent_run_id=parent_id)
        except Exception as err:
            _record_failure(result, child, err)
        else:
            result.ran.append(child.label)


def _run_parallel(study: Study, todo: list[Child], parent_id: str, workers: int, uri: str,
                  result: StudyResult) -> None:
    import concurrent.futures as cf
    import multiprocessing

    threads = max(1, (os.cpu_count() or 1) // workers)
    print(f"training {len(todo)} children in {workers} processes", flush=True)
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                initializer=_init_worker, initargs=(uri, threads)) as pool:
        futures = {pool.submit(_train_child, c.config, child_tags(study, c), parent_id): c for c in todo}
        try:
            for future in cf.as_completed(futures):
                child = futures[future]
                try:
                    future.result()
                except Exception as err:
                    _record_failure(result, child, err)
                else:
                    result.ran.append(child.label)
                    print(f"child {child.label} finished ({len(result.ran)}/{len(todo)})", flush=True)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)   # in-flight children end on their own
            raise

