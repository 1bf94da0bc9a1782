"""Hyperparameter sweeps (sweep files: sweep.py, docs/sweeps.md): keras-tuner over the project's own
AlexNet (the HyperModel builds it from `Config.override(trial values)` and trains it with train.fit),
every trial a nested MLflow run under one parent run (tracking.parent_run), and on the parent the best
values, the trial table, importance, a figure and the best trial's model.

Resuming: the tuner state in `<directory>/<name>` (keras-tuner, `overwrite=False`) plus `sweep.json`
there (the file's digest and a sweep id that the parent and trial runs carry), so that running the same
command again goes on under the same parent and never logs a trial twice. `--ray` runs the trials on a
Ray cluster: keras-tuner's chief serves the oracle in a job on this machine's node, and each worker is a
job asking for one GPU (else CPUs) that takes trials from it (docs/cluster.md).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import keras
import keras_tuner
import numpy as np

from .. import figures, tracking
from ..config import Config, ConfigError
from ..data import Data, load_data
from ..model.alexnet import build_alexnet
from ..tables import csv_text, markdown_table, value_text
from .sweep import Sweep, load_sweep
from ..training.train import compile_model, fit, log_inputs, log_trained_model, run_tags, set_global_state, timing_metrics

STATE_FILE = "sweep.json"


class SweepError(RuntimeError):
    """The sweep ran but cannot give a result (every trial failed, a Ray job failed, ...)."""


class AlexNetHyperModel(keras_tuner.HyperModel):
    """`build(hp)` = `Config.override(hp values)` -> `build_alexnet` -> `compile_model`.

    `fit` is train.fit on the trial's own tf.data pipelines (a batch size in the search space rebuilds
    them), with keras-tuner's callbacks and epochs. Pipelines are cached per (data options, image size,
    batch size, seed). Inside a trial's run it also logs what `train` logs before and after training.
    """

    def __init__(self, sweep: Sweep):
        super().__init__(name="alexnet", tunable=True)
        self.sweep = sweep
        # A batch size in the search space rebuilds the pipelines; the four used last stay built.
        self.pipelines = functools.lru_cache(maxsize=4)(load_data)

    def values(self, hp: keras_tuner.HyperParameters) -> dict[str, Any]:
        return {p.name: p.declare(hp) for p in self.sweep.space}

    def data_for(self, config: Config) -> Data:
        return self.pipelines(config.data, image_size=config.model.input_size, batch_size=config.train.batch_size,
                              seed=config.train.seed, deterministic=config.train.deterministic)

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
        tracked = tracking.active_run_id() is not None   # the trial's run (see TrackedTrials.run_trial)
        if tracked:   # the trial's tags (sweep, trial id) say in its description which trial it is
            trial_tags = tracking.get_run(tracking.active_run_id()).data.tags
            tracking.set_tags(run_tags(config, data, model, context=trial_tags))
            log_inputs(config, data, model)
        history, seconds, start = fit(model, data, config, callbacks=callbacks or (), epochs=epochs,
                                      initial_epoch=initial_epoch, track=tracked)
        if tracked:
            tracking.log_metrics(timing_metrics(history, seconds))
        # keras-tuner reads the best epoch's metrics (and its step) from a History.
        result = keras.callbacks.History()
        result.history = history
        result.epoch = list(range(start, start + len(history.get("loss", []))))
        return result


@dataclass
class SweepContext:
    """What a tuner needs to log its trials: set once the parent run is known."""

    sweep: Sweep
    hypermodel: AlexNetHyperModel
    uid: str = ""
    parent_run_id: str | None = None
    experiment: str = ""
    fatal: BaseException | None = None

    def runs(self) -> dict[str, Any]:
        """{trial id: its newest run} under the parent."""
        return tracking.children_by(self.parent_run_id, tracking.TRIAL_TAG)


def best_epoch(results: Any, objective: str, direction: str) -> tuple[float, int]:
    """The objective's best value in a trial's History, and its epoch."""
    history = results[0] if isinstance(results, list) else results
    if isinstance(history, dict):
        return float(history[objective]), 0
    values = np.asarray(history.history[objective], dtype=float)
    index = int(np.nanargmax(values) if direction == "max" else np.nanargmin(values))
    return float(values[index]), index + int(history.epoch[0] if history.epoch else 0)


class TrackedTrials:
    """Mixed into a keras-tuner Tuner: each trial runs inside its own nested MLflow run."""

    sweep_context: SweepContext

    def run_trial(self, trial, *args, **kwargs):
        ctx = self.sweep_context
        sweep = ctx.sweep
        best_key = f"best_{sweep.objective}"
        run_name = f"{sweep.name}-trial-{trial.trial_id}"
        config = sweep.trial_config(trial.hyperparameters.values, run_name=run_name,
                                    experiment=ctx.experiment)
        try:
            existing = ctx.runs().get(trial.trial_id)
        except Exception as err:
            ctx.fatal = err
            raise keras_tuner.errors.FatalError(f"MLflow: {err}") from err
        if existing is not None and existing.info.status == "FINISHED" and best_key in existing.data.metrics:
            # Finished in MLflow, but the tuner state did not record it (stopped in between): reuse it.
            print(f"trial {trial.trial_id}: already finished as MLflow run {existing.info.run_id}; "
                  f"reusing its result", flush=True)
            return {sweep.objective: existing.data.metrics[best_key]}
        attempt = 1 if existing is None else int(existing.data.tags.get(tracking.ATTEMPT_TAG, "1")) + 1
        tags = {tracking.SWEEP_TAG: sweep.name, tracking.SWEEP_DIGEST_TAG: sweep.digest(),
                tracking.SWEEP_UID_TAG: ctx.uid, tracking.SWEEP_ROLE_TAG: "trial",
                tracking.TRIAL_TAG: str(trial.trial_id), tracking.TUNER_ID_TAG: str(self.tuner_id),
                tracking.ATTEMPT_TAG: str(attempt)}
        try:
            with tracking.run(ctx.experiment, run_name=run_name, params=config.flat(), tags=tags, nested=True,
                              parent_run_id=ctx.parent_run_id, system_metrics=config.system_metrics,
                              run_id=existing.info.run_id if existing is not None else None):
                results = super().run_trial(trial, *args, **kwargs)
                score, epoch = best_epoch(results, sweep.objective, sweep.direction)
                tracking.log_metrics({best_key: score, "best_epoch": epoch})
            return results
        except Exception as err:
            if tracking.is_tracking_error(err):   # keras-tuner would only mark the trial failed
                ctx.fatal = err
                raise keras_tuner.errors.FatalError(f"MLflow: {err}") from err
            tracking.stderr(f"trial {trial.trial_id} failed: {type(err).__name__}: {err}")
            raise keras_tuner.errors.FailedTrialError(f"{type(err).__name__}: {err}") from err


TUNER_CLASSES = {"random": keras_tuner.RandomSearch, "bayesian": keras_tuner.BayesianOptimization,
                 "hyperband": keras_tuner.Hyperband}


def oracle_seed(seed: int) -> int:
    """The oracle's seed for the sweep file's `seed`: keras-tuner takes 0 for none (a random seed)."""
    return seed + 1


def make_tuner(sweep: Sweep, hypermodel: AlexNetHyperModel, ctx: SweepContext) -> keras_tuner.Tuner:
    base_cls = TUNER_CLASSES[sweep.tuner]
    cls = type(f"Tracked{base_cls.__name__}", (TrackedTrials, base_cls), {})
    kwargs: dict[str, Any] = dict(
        hypermodel=hypermodel, objective=keras_tuner.Objective(sweep.objective, sweep.direction),
        seed=oracle_seed(sweep.seed), max_consecutive_failed_trials=sweep.max_failed_trials,
        directory=str(sweep.directory), project_name=sweep.name, overwrite=False)
    if sweep.tuner == "hyperband":
        kwargs.update(max_epochs=sweep.base.train.epochs, factor=sweep.factor,
                      hyperband_iterations=sweep.hyperband_iterations)
    else:
        kwargs.update(max_trials=sweep.max_trials)
    if sweep.tuner == "bayesian":
        kwargs.update(num_initial_points=sweep.num_initial_points)
    tuner = cls(**kwargs)
    tuner.sweep_context = ctx
    return tuner


@dataclass
class SweepResult:
    parent_run_id: str
    rows: list[dict[str, Any]] = field(default_factory=list)   # every trial, best first
    best: dict[str, Any] | None = None


def open_state(sweep: Sweep, overwrite: bool) -> str:
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


def search(tuner: keras_tuner.Tuner, ctx: SweepContext) -> None:
    """keras-tuner's own search: trials here, or, in the chief's job, serving the oracle to the workers."""
    try:
        tuner.search()
    except keras_tuner.errors.FatalError:
        if ctx.fatal is None:
            raise
    except RuntimeError as err:
        if "consecutive failures" in str(err):
            raise SweepError(f"sweep {ctx.sweep.name!r} stopped: {str(err).splitlines()[0]} (see the FAILED "
                             f"trial runs' `error` tag).") from err
        if "Failed to bind" in str(err):
            raise SweepError(f"the chief cannot serve the oracle: {str(err).split(';')[0]}") from None
        raise
    if ctx.fatal is not None:   # keras-tuner would have marked the trial failed and gone on
        if isinstance(ctx.fatal, tracking.TrackingError):
            raise ctx.fatal
        raise tracking.TrackingError(f"MLflow failed during a trial of sweep {ctx.sweep.name!r} "
                                     f"({tracking.tracking_uri()!r}): {type(ctx.fatal).__name__}: "
                                     f"{ctx.fatal}") from ctx.fatal


def parent_params(sweep: Sweep) -> dict[str, Any]:
    """The sweep's parent run's params: what is searched, how, and (bayesian) how many random trials first."""
    return {"sweep_name": sweep.name, "sweep_tuner": sweep.tuner, "sweep_objective": sweep.objective,
            "sweep_direction": sweep.direction, "sweep_seed": sweep.seed,
            **({"sweep_num_initial_points": sweep.num_initial_points} if sweep.tuner == "bayesian" else {}),
            **{f"space.{p.name}": p.short() for p in sweep.space}}


def parent_description(sweep: Sweep) -> str:
    """The parent run's description (the run page's): what the sweep searches, how, and the file's own
    `description`."""
    space = ", ".join(f"{p.name} {p.short()}" for p in sweep.space)
    budget = (f"hyperband up to {sweep.base.train.epochs} epochs a trial" if sweep.tuner == "hyperband"
              else f"{sweep.max_trials} trials of {sweep.base.train.epochs} epochs")
    text = (f"Hyperparameter sweep {sweep.name!r} ({sweep.tuner} search, {budget}, keras-tuner) for the best "
            f"{sweep.objective} ({sweep.direction}) over {space}. One nested run per trial; here the trial "
            f"table, the best values and the best trial's model.")
    return f"{text}\n\n{sweep.description}" if sweep.description else text


def register_best_trial(sweep: Sweep, result: SweepResult, name: str) -> None:
    """`tune --register NAME`: the sweep's model (the best trial's, logged on the parent run) as a new
    version of NAME with alias champion, tagged with the sweep, its parent run and the objective's value."""
    from ..serving import DEFAULT_ALIAS, register_model

    best = result.best
    tags = {tracking.SWEEP_TAG: sweep.name, tracking.PARENT_RUN_TAG: result.parent_run_id,
            tracking.SELECTION_METRIC_TAG: sweep.objective,
            tracking.SELECTION_VALUE_TAG: f"{best[sweep.objective]:.6g}",
            tracking.BEST_TRIAL_TAG: str(best["trial"]), tracking.BEST_RUN_ID_TAG: best["run_id"]}
    version = register_model(result.parent_run_id, name, origin="sweep", tags=tags,
                             description=f"The best trial ({best['trial']}) of sweep {sweep.name!r}: "
                                         f"{sweep.objective} {best[sweep.objective]:.4g}.")
    print(f"registered the model of sweep {sweep.name!r} (parent run {result.parent_run_id}) as {name!r} "
          f"version {version.version}: models:/{name}@{DEFAULT_ALIAS}", flush=True)


def run_sweep(sweep: Sweep, *, overwrite: bool = False, ray: str | None = None, workers: int | None = None,
              cpus: float = 1.0) -> SweepResult:
    """Run (or continue) `sweep` into the configured MLflow store: its trials one after another here, or
    (`ray`: "local", "auto" or "HOST:PORT") on a Ray cluster, checked before anything is created."""
    distributed = sorted(k for k in os.environ if k.startswith("KERASTUNER_"))
    if distributed:
        raise ConfigError(f"alexnet-keras tune starts the chief and the workers itself (--ray): unset "
                          f"{', '.join(distributed)}.")
    if ray is None:
        return _run_sweep(sweep, overwrite)
    from . import cluster

    if ray.startswith("ray://"):   # the chief serves the oracle on this machine's node
        raise ConfigError(f"tune --ray {ray}: run the sweep on a node of the cluster (--ray auto or "
                          f"HEAD:PORT there, or `ray job submit`), not through a ray:// client address.")
    uri = tracking.tracking_uri()
    with cluster.connected(None if ray == "local" else ray) as info:
        cluster.check_store(uri, info)      # before anything is created
        location = tracking.artifact_location(tracking.experiment_id_for(sweep.base.experiment))
        cluster.check_store(uri, info, artifact_location=location)
        return _run_sweep(sweep, overwrite, on_ray=(info, ray_workers(info, sweep, cpus, workers), cpus))


def _run_sweep(sweep: Sweep, overwrite: bool, on_ray: tuple | None = None) -> SweepResult:
    hypermodel = AlexNetHyperModel(sweep)
    hypermodel.data_for(sweep.base)        # a missing dataset fails here, before any run or state
    ctx = SweepContext(sweep=sweep, hypermodel=hypermodel, uid=open_state(sweep, overwrite))
    tuner = make_tuner(sweep, hypermodel, ctx)
    tuner.save()   # keras-tuner reloads only if its tuner file exists: an interrupted first trial resumes too
    match = {tracking.SWEEP_UID_TAG: ctx.uid, tracking.SWEEP_ROLE_TAG: "parent"}
    tags = {tracking.SWEEP_TAG: sweep.name, tracking.SWEEP_DIGEST_TAG: sweep.digest(),
            tracking.SWEEP_MAX_TRIALS_TAG: str(sweep.max_trials)}
    # One parent holds the whole sweep: a new one (a second `mlflow run`) takes the trials of the earlier.
    with tracking.parent_run(sweep.base.experiment, sweep.name, match, tags=tags, params=parent_params(sweep),
                             description=parent_description(sweep),
                             retire={tracking.SWEEP_ROLE_TAG: "superseded"}) as parent:
        ctx.parent_run_id, ctx.experiment = parent.run_id, parent.experiment
        tracking.log_dict(sweep.to_dict(), "sweep/sweep.yaml")
        if on_ray is None:
            search(tuner, ctx)
        else:
            _search_on_ray(ctx, *on_ray)
            tuner.reload()   # the trials as the chief's oracle left them
        rows, best = summarize(tuner, ctx, parent.run_id)
    print(f"sweep {sweep.name!r}: parent run {parent.run_id}; best trial {best['trial']} "
          f"{sweep.objective}={best[sweep.objective]:.4g}", flush=True)
    return SweepResult(parent_run_id=parent.run_id, rows=rows, best=best)


def _search_job(sweep: Sweep, uri: str, uid: str, parent_run_id: str, experiment: str) -> None:
    """A Ray job, keras-tuner's chief or a worker by the KERASTUNER_* variables that come with it: the
    chief serves the oracle until the workers end, a worker takes trials from it, each in its own run
    under the parent."""
    tracking.configure(uri)
    hypermodel = AlexNetHyperModel(sweep)
    ctx = SweepContext(sweep=sweep, hypermodel=hypermodel, uid=uid, parent_run_id=parent_run_id,
                       experiment=experiment)
    tuner = make_tuner(sweep, hypermodel, ctx)
    tuner.save()   # the chief reloads the oracle on the next run only if its tuner file exists
    with tracking.sigterm_as_interrupt():
        search(tuner, ctx)


def ray_workers(cluster_info, sweep: Sweep, cpus: float, workers: int | None) -> int:
    """How many workers a sweep gets: `workers`, else one per GPU, else one per `cpus` CPUs of the cluster;
    never more than max_trials (hyperband sets its own number of trials)."""
    if workers is not None:
        if workers < 1:
            raise ConfigError(f"--ray-workers must be at least 1; got {workers}.")
        return workers
    fits = int(cluster_info.gpus) if cluster_info.gpus else int(cluster_info.cpus // cpus)
    if sweep.tuner != "hyperband":
        fits = min(fits, sweep.max_trials)
    return max(1, fits)


def _search_on_ray(ctx: SweepContext, info, count: int, cpus: float) -> None:
    """The chief on this machine's node (it needs no CPU or GPU of its own), `count` workers as jobs
    asking for one GPU where the cluster has GPUs, else `cpus` CPUs. A job that fails stops the sweep
    (the others are cancelled, the parent ends KILLED; the same command goes on); one whose process or
    node dies is re-run by Ray with the same tuner id, which takes its trial up again."""
    from . import cluster

    sweep = replace(ctx.sweep, directory=str(Path(ctx.sweep.directory).resolve()))
    uri = tracking.tracking_uri()
    node = cluster.driver_node()
    oracle = {"KERASTUNER_ORACLE_IP": node.address, "KERASTUNER_ORACLE_PORT": str(cluster.free_port(node.address))}
    threads = {"TF_NUM_INTRAOP_THREADS": str(max(1, int(cpus))), "TF_CPP_MIN_LOG_LEVEL": "2"}
    args = (sweep, uri, ctx.uid, ctx.parent_run_id, ctx.experiment)
    jobs = [cluster.Job("chief", _search_job, args, resources={"num_cpus": 0, "num_gpus": 0},
                        env={**oracle, "KERASTUNER_TUNER_ID": "chief"}, node_id=node.node_id)]
    jobs += [cluster.Job(f"tuner{i}", _search_job, args, env={**oracle, **threads, "KERASTUNER_TUNER_ID": f"tuner{i}"})
             for i in range(count)]
    print(f"sweep {sweep.name!r} on the {info.describe()}: the chief on {node.address} (oracle port "
          f"{oracle['KERASTUNER_ORACLE_PORT']}), {count} worker(s)", flush=True)

    def on_done(outcome) -> None:
        if outcome.ok:
            return
        err = outcome.error
        if isinstance(err, (ConfigError, tracking.TrackingError)):
            raise err
        if tracking.is_tracking_error(err):
            raise tracking.TrackingError(f"the MLflow store {uri} failed in the sweep's {outcome.name} "
                                         f"({outcome.error_text}); what was logged is kept: run the same "
                                         f"command again once the store answers.") from None
        raise SweepError(f"the sweep's {outcome.name} failed ({outcome.error_text}); the others were "
                         f"stopped. Run the same command again to continue the sweep.")

    cluster.run_jobs(jobs, cpus_per_job=cpus, env=cluster.forwarded_env(), cwd=os.getcwd(), on_done=on_done)


def trial_rows(tuner: keras_tuner.Tuner, ctx: SweepContext) -> list[dict[str, Any]]:
    """One row per trial the oracle knows, best first (trials without a score last)."""
    sweep = ctx.sweep
    runs = ctx.runs()
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
    with the objective for numbers (scipy's, which gives tied values their average rank), the share of
    variance explained by the groups (eta squared) for choices and booleans. Zero with fewer than three
    completed trials, or where a dimension or the objective does not vary."""
    from scipy import stats

    done = [r for r in rows if r[sweep.objective] is not None]
    scores = np.array([r[sweep.objective] for r in done], dtype=float)
    out = {}
    for p in sweep.space:
        values = [r[p.name] for r in done]
        value = 0.0
        if len(done) >= 3 and len(set(map(str, values))) > 1 and np.ptp(scores) > 0:
            if p.numeric or all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                value = abs(float(stats.spearmanr(np.asarray(values, dtype=float), scores).statistic))
            else:
                total = float(np.sum((scores - scores.mean()) ** 2))
                between = sum(len(g) * (np.mean(g) - scores.mean()) ** 2 for g in (
                    scores[[str(v) == key for v in values]] for key in set(map(str, values))))
                value = float(between / total) if total > 0 else 0.0
        out[p.name] = 0.0 if not np.isfinite(value) else round(value, 4)
    return out


def trials_table(rows: list[dict[str, Any]], sweep: Sweep) -> tuple[str, str]:
    """(CSV, Markdown) of the trials, in the order of `rows` (best first)."""
    columns = ["rank", "trial", "status", sweep.objective, "best_epoch", *sweep.names, "run_id"]
    direction = "higher" if sweep.direction == "max" else "lower"
    header = (f"# Sweep {sweep.name}: {len(rows)} trials, sorted by {sweep.objective} ({direction} is "
              f"better)\n\n")
    return csv_text(rows, columns), header + markdown_table(rows, columns, digits={sweep.objective: 4})


def final_model(tuner: keras_tuner.Tuner, ctx: SweepContext, trial, config: Config,
                data: Data) -> tuple[keras.Model | None, str]:
    """The best trial's network: its best-epoch checkpoint (keras-tuner's `load_model`) where this
    machine has it, else re-trained from the trial's values."""
    mode = ctx.sweep.final_model
    if mode == "none":
        return None, "none"
    if mode == "auto":
        import warnings

        with warnings.catch_warnings():   # "Skipping variable loading for optimizer": weights are enough
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            try:
                return tuner.load_model(trial), "checkpoint"
            except (OSError, ValueError) as err:   # the trial ran on another machine
                print(f"no checkpoint of trial {trial.trial_id} here ({err})", flush=True)
    print(f"re-training the best trial {trial.trial_id} ({config.train.epochs} epochs) for the sweep's model",
          flush=True)
    model = tuner.hypermodel.build(trial.hyperparameters)
    fit(model, data, config, track=False)   # the parent's metrics are the sweep's, not this training's
    return model, "retrained"


def summarize(tuner, ctx: SweepContext, parent_run_id: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Log the sweep's results on the (active) parent run; skipped when nothing changed since last time."""
    sweep = ctx.sweep
    rows = trial_rows(tuner, ctx)
    done = [r for r in rows if r[sweep.objective] is not None]
    if not done:
        raise SweepError(f"no trial of sweep {sweep.name!r} completed ({len(rows)} failed); see the FAILED "
                         f"trial runs' `error` tag.")
    best = done[0]
    key = f"{len(done)}/{len(rows)}:{best['trial']}"
    if tracking.get_run(parent_run_id).data.tags.get(tracking.SWEEP_SUMMARY_TAG) == key:
        print(f"sweep {sweep.name!r}: no new trials since the last summary", flush=True)
        return rows, best
    step = len(done)
    best_values = {name: best[name] for name in sweep.names}
    tracking.set_tags({**{tracking.BEST_TAG + k: value_text(v) for k, v in best_values.items()},
                       tracking.BEST_TRIAL_TAG: best["trial"],
                       tracking.BEST_RUN_ID_TAG: best["run_id"]})
    tracking.log_metrics({f"best_{sweep.objective}": best[sweep.objective], "completed_trials": len(done),
                          "failed_trials": len(rows) - len(done)}, step=step)
    tracking.log_dict({"trial": best["trial"], "run_id": best["run_id"],
                       sweep.objective: best[sweep.objective], "hyperparameters": best_values},
                      "sweep/best_hyperparameters.json")
    csv_table, markdown = trials_table(rows, sweep)
    tracking.log_text(csv_table, "sweep/trials.csv")
    tracking.log_text(markdown, "sweep/trials.md")
    weights = importance(rows, sweep)
    tracking.log_dict(weights, "sweep/importance.json")
    tracking.log_figure(figures.sweep_figure(rows, sweep, weights), "sweep/objective.png")

    trial = tuner.oracle.trials[best["trial"]]
    config = sweep.trial_config(trial.hyperparameters.values)
    data = ctx.hypermodel.data_for(config)
    model, source = final_model(tuner, ctx, trial, config, data)
    if model is not None:
        # What train logs for a trained model, so that the sweep's model predicts and serves the same way.
        log_inputs(config, data, model)
        history = tracking.epoch_history(best["run_id"]) if best["run_id"] else {}
        log_trained_model(model, data, history, title=f"{sweep.name}: best trial {best['trial']}", step=step)
    tracking.set_tags({tracking.MODEL_SOURCE_TAG: source, tracking.SWEEP_SUMMARY_TAG: key})
    tracking.flush()
    return rows, best


def cmd_tune(args) -> int:
    sweep = load_sweep(args.sweep, max_trials=args.max_trials, directory=args.tuner_dir)
    if args.dry_run:
        print(tracking.dumps(sweep.to_dict()))
        state = sweep.project_dir / STATE_FILE
        print(f"tuner state: {sweep.project_dir} ({'resumes' if state.is_file() else 'new sweep'})")
        return 0
    register = getattr(args, "register", None)
    if register:   # before any run: a bad name, or a sweep that logs no model, fails now
        from ..serving import check_model_name

        check_model_name(register)
        if sweep.final_model == "none":
            raise ConfigError(f"{sweep.source}: --register needs the sweep's model, but `final_model: none` "
                              f"logs none; remove final_model (or set it to auto).")
    tracking.configure(args.tracking_uri)
    try:
        result = run_sweep(sweep, overwrite=args.overwrite, ray=args.ray, workers=args.ray_workers,
                           cpus=args.ray_cpus)
    except SweepError as err:
        print(f"alexnet-keras tune: error: {err}", file=sys.stderr)
        return 1
    if register:
        register_best_trial(sweep, result, register)
    return 0
