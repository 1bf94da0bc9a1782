"""Ablation studies (study.py): a parent run, a child run per planned child (here or on Ray), a report (report.py)."""

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import tracking
from ..config import ConfigError
from .study import Child, Study, StudyError, StudyIncomplete, plan_text
from ..tracking import (BASELINE_TAG, CONFIG_DIGEST_TAG, FACTOR_TAG, ROLE_TAG, SEED_TAG, SPEC_ARTIFACT,
                       STUDY_DIGEST_TAG, STUDY_TAG, VARIANT_TAG)

SELECTION_METRIC = "val_accuracy"   # the study's champion is chosen on validation, never on test
ROUND_TAG = tracking.TAG_PREFIX + "study_round"   # with `rounds:`, the round (from 1) a child's seed belongs to


@dataclass
class StudyResult:
    parent_run_id: str
    ran: list[str] = field(default_factory=list)
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)     # child label -> error
    diverged: list[str] = field(default_factory=list)        # tuning children whose grid value diverged
    report: Any = None


def child_tags(study: Study, child: Child) -> dict[str, str]:
    return {STUDY_TAG: study.name, STUDY_DIGEST_TAG: study.digest(), ROLE_TAG: "child", SEED_TAG: str(child.seed),
            VARIANT_TAG: child.variant.name, BASELINE_TAG: str(child.variant.is_baseline).lower(),
            **{FACTOR_TAG + axis: value for axis, value in child.variant.factors.items()},
            **({ROUND_TAG: str(child.seed // study.keys.rounds.seeds_per_round + 1)} if study.keys.rounds else {})}


def champion(report) -> tuple[Any, str, float, float] | None:
    """(variant summary, run id, its mean, the run's value): the best mean final `val_accuracy` (the first), or None."""
    best = None
    for variant in report.variants:
        finals = [(h[-1], run_id) for h, run_id in zip(variant.val_histories, variant.run_ids) if h]
        mean = sum(v for v, _ in finals) / len(finals) if finals else None
        if mean is not None and (best is None or mean > best[2]):
            value, run_id = max(finals, key=lambda f: f[0])
            best = (variant, run_id, mean, value)
    return best


def register_champion(study: Study, result: StudyResult, name: str) -> None:
    """`ablate --register NAME`: the model of the study's champion run as a new version of NAME (alias champion)."""
    from ..serving import DEFAULT_ALIAS, ModelError, register_model

    chosen = champion(result.report)
    if chosen is None:
        raise ModelError(f"study {study.name!r}: no finished child run has a validation accuracy, so there is "
                         f"no best variant to register as {name!r}.")
    variant, run_id, mean, value = chosen
    seed = variant.seeds[variant.run_ids.index(run_id)]
    tags = {STUDY_TAG: study.name, tracking.PARENT_RUN_TAG: result.parent_run_id, VARIANT_TAG: variant.name,
            SEED_TAG: str(seed), tracking.SELECTION_METRIC_TAG: f"mean {SELECTION_METRIC} of the variant",
            tracking.SELECTION_VALUE_TAG: f"{mean:.6g}"}
    description = (f"The best variant of ablation study {study.name!r}: {variant.name!r}, mean final "
                   f"{SELECTION_METRIC} {mean:.4f} over {len(variant.run_ids)} seed(s); this is its seed-{seed} "
                   f"run ({SELECTION_METRIC} {value:.4f}), the best of them.")
    version = register_model(run_id, name, origin="study", tags=tags, description=description)
    print(f"registered the model of run {run_id} (variant {variant.name!r}, seed {seed}) as {name!r} version "
          f"{version.version}: models:/{name}@{DEFAULT_ALIAS}", flush=True)


def run_study(study: Study, *, parallel: int = 1, tracking_uri: str | None = None, ray: str | None = None,
              ray_cpus: float = 1) -> StudyResult:
    """Create or resume the parent, train the missing children here or on Ray (docs/cluster.md), log the report."""
    if ray is not None and parallel != 1:
        raise StudyError(f"--parallel {parallel} with --ray: Ray runs as many children at once as the cluster "
                         f"has room for (one GPU each, else --ray-cpus CPUs each); drop --parallel.")
    from .report import build_report, choose_grid_value

    uri, on_ray = tracking.configure(tracking_uri), None   # on_ray: the CPUs each child asks Ray for
    with contextlib.ExitStack() as stack:
        if ray is not None or parallel > 1:
            from . import cluster

            if ray is None:   # --parallel N: a local cluster of this machine's CPUs, N children at a time
                where, sizes, ray_cpus = None, {"num_cpus": os.cpu_count() or 1}, (os.cpu_count() or 1) / parallel
            else:
                where, sizes = (None if ray == "local" else ray), {}
            info = stack.enter_context(cluster.connected(where, **sizes))
            cluster.check_store(uri, info)          # before any run: a store some node cannot write to
            location = tracking.artifact_location(tracking.experiment_id_for(study.experiment))
            cluster.check_store(uri, info, artifact_location=location)
            print(f"children run as Ray jobs on the {info.describe()}", flush=True)
            on_ray = ray_cpus
        params = {"study": study.name, "study_file": study.path, "design": study.design,
                  "seeds": ",".join(map(str, study.seeds)), "axes": ",".join(study.axes),
                  "num_variants": len(study.variants), "num_children": study.runs,
                  **({"nuisance_grid": json.dumps(study.keys.nuisance_grid)} if study.grid else {})}
        description = (f"Ablation {plan_text(study).splitlines()[0]}. The report (reports/ablation.md) replaces "
                       f"this description when the children have finished.\n\n{study.description}").strip()
        match = {STUDY_TAG: study.name, STUDY_DIGEST_TAG: study.digest(), ROLE_TAG: "parent"}
        parent_id, experiment = stack.enter_context(tracking.parent_run(
            study.experiment, study.name, match, params=params, description=description,
            adopt_key=CONFIG_DIGEST_TAG, wanted={c.digest for c in study.children()}))
        result = StudyResult(parent_id)
        tracking.log_dict(study.spec(), SPEC_ARTIFACT)
        tracking.log_text(Path(study.path).read_text(), "study/" + Path(study.path).name)
        print(plan_text(study))
        start = time.perf_counter()
        tuning, choice = study.tuning_children(experiment), {}   # no tuning without a nuisance grid
        _train_missing(study, tuning, result, uri, on_ray)
        if study.grid:   # each arm's grid value, chosen on validation from its finished tuning runs
            finished = tracking.children_by(parent_id, CONFIG_DIGEST_TAG, status="FINISHED")
            choice = {v.name: choose_grid_value({c.grid_point.label: finished.get(c.digest) for c in tuning
                                                 if c.variant is v})[0] for v in study.variants}
            print("chosen on validation: " + "; ".join(f"{name}: {label or 'none (no tuning run finished)'}"
                                                       for name, label in choice.items()), flush=True)
            result.failed.update({name: "no tuning run finished, so its other seeds were not run"
                                  for name, label in choice.items() if label is None})
        # the other children: every one without a grid; with one, each arm's other seeds at its chosen value
        final = [c for c in study.children(experiment) if not c.tuning
                 and (c.grid_point is None or c.grid_point.label == choice.get(c.variant.name))]
        (_train_in_rounds if study.keys.rounds else _train_missing)(study, final, result, uri, on_ray)
        print(f"trained {len(result.ran)} children in {time.perf_counter() - start:.1f}s; {len(result.failed)} "
              f"failed" + (f", {len(result.diverged)} tuning runs diverged" if result.diverged else ""))
        result.report = build_report(parent_id)
        tracking.log_metrics({"children_trained": len(result.ran), "children_skipped": result.skipped,
                              "children_failed": len(result.failed)})
        if result.failed:
            raise StudyIncomplete(f"{len(result.failed)} of {study.runs} children failed (re-run the study "
                                  f"to retry them): " + "; ".join(f"{k}: {v}" for k, v in result.failed.items()))
    return result


def _train_missing(study: Study, children: list[Child], result: StudyResult, uri: str,
                   on_ray: float | None) -> None:
    """Train the `children` without a FINISHED run, nor a tuning child whose newest run diverged, here or on Ray."""
    done = tracking.children_by(result.parent_run_id, CONFIG_DIGEST_TAG, status="FINISHED")
    newest = tracking.children_by(result.parent_run_id, CONFIG_DIGEST_TAG)
    diverged = {digest for digest, run in newest.items() if run.info.status == "FAILED"
                and run.data.tags.get(tracking.ERROR_TAG, "").startswith("FloatingPointError")}
    todo = [c for c in children if c.digest not in done and not (c.tuning and c.digest in diverged)]
    result.skipped += len(children) - len(todo)
    if len(todo) < len(children):
        print(f"{len(children) - len(todo)} of {len(children)} children already finished: skipped")
    if on_ray is not None:
        _run_on_ray(study, todo, result, uri, on_ray)
        return
    import keras

    from ..training.train import train_and_evaluate

    for i, child in enumerate(todo, 1):
        print(f"\n[{i}/{len(todo)}] {child.label}", flush=True)
        keras.backend.clear_session()   # one process, many models: drop the previous graphs
        try:
            train_and_evaluate(child.config, tags=child_tags(study, child), parent_run_id=result.parent_run_id)
        except Exception as err:
            _record_failure(result, child, err)
        else:
            result.ran.append(child.label)


def _train_in_rounds(study: Study, children: list[Child], result: StudyResult, uri: str, on_ray: float | None) -> None:
    """AdaStop replayed on the finished children, then the next round's seeds of the baseline and open arms; again."""
    from .report import adastop_decisions, summarize
    from .stats import NOT_DECIDED

    spec, n = study.spec(), study.keys.rounds.seeds_per_round
    for _ in range(study.keys.rounds.max_rounds + 1):   # each pass adds a round, unless a child failed
        found = adastop_decisions(spec, summarize(spec, tracking.child_runs(result.parent_run_id)))
        print(f"AdaStop: {found['stopped']}", flush=True)
        still = {r["variant"] for r in found["comparisons"] if r["decision"] == NOT_DECIDED}
        if not still or result.failed:
            return
        seeds = range(found["rounds_done"] * n, (found["rounds_done"] + 1) * n)
        _train_missing(study, [c for c in children if c.seed in seeds and (c.variant.is_baseline or c.variant.name in
                                                                            still)], result, uri, on_ray)


def _record_failure(result: StudyResult, child: Child, err: Exception) -> None:
    """Record a child's own failure (a tuning divergence as a result) and go on; one every child would hit stops."""
    from ..data import DataError

    if isinstance(err, (ConfigError, DataError, tracking.TrackingError)):
        raise err
    print(f"child {child.label} failed: {err}", flush=True)
    if child.tuning and isinstance(err, FloatingPointError):
        result.diverged.append(child.label)
    else:
        result.failed[child.label] = f"{type(err).__name__}: {err}"


def _train_child_on_ray(config, tags: dict[str, str], parent_run_id: str, uri: str) -> str:
    """One child as a Ray job, tagged with its Ray task, node and GPU; a retry ends the dead attempt's run KILLED."""
    import keras

    from ..training.train import train_and_evaluate
    from . import cluster

    tracking.configure(uri)
    keras.backend.clear_session()   # a reused worker process: drop the previous child's graphs
    task = cluster.current_task()
    tracking.end_stale_children(parent_run_id, f"the process or node training it died; Ray retried the child as task "
                                f"{task.get('task_id', '?')} on node {task.get('node_id', '?')[:8]}", config.digest())
    tags = {**tags, tracking.RAY_TASK_TAG: task.get("task_id", ""), tracking.RAY_NODE_TAG: task.get("node_id", "")}
    if os.environ.get("CUDA_VISIBLE_DEVICES"):   # the GPU Ray gave this job
        tags[tracking.VISIBLE_DEVICES_TAG] = os.environ["CUDA_VISIBLE_DEVICES"]
    return train_and_evaluate(config, tags=tags, parent_run_id=parent_run_id).run_id


def _run_on_ray(study: Study, todo: list[Child], result: StudyResult, uri: str, cpus: float) -> None:
    """Every child of `todo` as a Ray job; one whose retries are spent is recorded failed, its run ended KILLED."""
    from . import cluster

    if not todo:
        return
    by_label = {c.label: c for c in todo}
    threads = max(1, int(cluster.job_resources(cluster.cluster_info(), cpus)["num_cpus"]))
    jobs = [cluster.Job(c.label, _train_child_on_ray, (c.config, child_tags(study, c), result.parent_run_id, uri))
            for c in todo]

    def on_done(outcome) -> None:
        child, err = by_label[outcome.name], outcome.error
        if outcome.ok:
            result.ran.append(child.label)
            return
        # The child's own message says which call failed, this one what to do. (An error raised in the
        # child because of the store may not show it: its cause does not survive Ray; so ask the store.)
        if tracking.is_tracking_error(err) or not tracking.store_answers():
            raise tracking.TrackingError(
                f"the MLflow store {uri} failed while child {child.label!r} was training ({outcome.error_text}); "
                f"the study stops here. What was logged before is kept; once the store answers again, run the "
                f"same command to train the children that did not finish.") from None
        if cluster.is_system_error(err):   # Ray's long multi-line message: its first line is enough
            tracking.end_stale_children(result.parent_run_id, f"its Ray job failed: {outcome.error_text}; the next "
                                        f"`alexnet-keras ablate` of the study trains it again", child.digest)
            err = RuntimeError(outcome.error_text)
        _record_failure(result, child, err)

    env = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_NUM_INTRAOP_THREADS": str(threads), **cluster.forwarded_env()}
    cluster.run_jobs(jobs, cpus_per_job=cpus, env=env, cwd=os.getcwd(), on_done=on_done)
