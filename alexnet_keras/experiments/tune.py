"""Hyperparameter sweeps (docs/sweeps.md): keras-tuner over the project's AlexNet, each trial an MLflow run
nested under one parent that gets the results and the model; the same command resumes; `--ray` scales out."""

import contextlib
import functools
import json
import os
import shutil
import sys
import uuid
import warnings
from dataclasses import replace
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
from .sweep import Sweep, declare, load_sweep
from ..training.train import (compile_model, fit, log_inputs, log_trained_model, run_tags, set_global_state,
                              timing_metrics)

STATE_FILE = "sweep.json"


class SweepError(RuntimeError):
    """The sweep ran but cannot give a result (every trial failed, a Ray job failed, ...)."""


def number(trial_id: str) -> int:
    """The trial's number as keras-tuner's console counts ("Running Trial #1" is trial id "0")."""
    return int(trial_id) + 1


class AlexNetHyperModel(keras_tuner.HyperModel):
    """The trial's config built and compiled as `train` does, and trained by train.fit (logging as `train`)."""

    def __init__(self, sweep: Sweep):
        super().__init__(name="alexnet", tunable=True)
        self.sweep = sweep
        # A batch size in the search space rebuilds the pipelines; the four used last stay built.
        self.pipelines = functools.lru_cache(maxsize=4)(load_data)

    def values(self, hp: keras_tuner.HyperParameters) -> dict[str, Any]:
        return {name: declare(hp, name, p) for name, p in self.sweep.spec.search_space.items()}

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
        if tracked:   # the trial's tags (sweep, trial) say in its description which trial it is
            tags = tracking.get_run(tracking.active_run_id()).data.tags
            tracking.set_tags(run_tags(config, data, model, context={
                **tags, tracking.TRIAL_TAG: str(number(tags[tracking.TRIAL_TAG]))}))
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


class TrackedTrials:
    """Mixed into a Tuner: each trial in its own run nested under the parent (sweep, uid, parent_run_id, experiment)."""

    def runs(self) -> dict[str, Any]:   # {trial id: its newest run}
        return tracking.children_by(self.parent_run_id, tracking.TRIAL_TAG)

    def run_trial(self, trial, *args, **kwargs):
        sweep, n = self.sweep, number(trial.trial_id)
        best_key = f"best_{sweep.objective}"
        run_name = f"{sweep.name}-trial-{n}"
        config = sweep.trial_config(trial.hyperparameters.values, run_name=run_name, experiment=self.experiment)
        try:
            existing = self.runs().get(trial.trial_id)
            if existing is not None and existing.info.status == "FINISHED" and best_key in existing.data.metrics:
                # Finished in MLflow, but the tuner state did not record it (stopped in between): reuse it.
                print(f"trial {n}: already finished as MLflow run {existing.info.run_id}; reusing its result",
                      flush=True)
                return {sweep.objective: existing.data.metrics[best_key]}
            attempt = 1 if existing is None else int(existing.data.tags.get(tracking.ATTEMPT_TAG, "1")) + 1
            tags = {tracking.SWEEP_TAG: sweep.name, tracking.SWEEP_DIGEST_TAG: sweep.digest(),
                    tracking.SWEEP_UID_TAG: self.uid, tracking.SWEEP_ROLE_TAG: "trial",
                    tracking.TRIAL_TAG: str(trial.trial_id), tracking.TUNER_ID_TAG: str(self.tuner_id),
                    tracking.ATTEMPT_TAG: str(attempt)}
            with tracking.run(self.experiment, run_name=run_name, params=config.flat(), tags=tags, nested=True,
                              parent_run_id=self.parent_run_id, system_metrics=config.system_metrics,
                              run_id=existing.info.run_id if existing is not None else None):
                (history,) = super().run_trial(trial, *args, **kwargs)   # one execution per trial
                values = np.asarray(history.history[sweep.objective], dtype=float)
                best = int(np.nanargmax(values) if sweep.direction == "max" else np.nanargmin(values))
                tracking.log_metrics({best_key: float(values[best]), "best_epoch": history.epoch[best]})
            return [history]
        except Exception as err:
            if tracking.is_tracking_error(err):   # keras-tuner would only mark the trial failed and go on
                raise keras_tuner.errors.FatalError(f"MLflow: {err}") from err
            tracking.stderr(f"trial {n} failed: {type(err).__name__}: {err}")
            raise keras_tuner.errors.FailedTrialError(f"{type(err).__name__}: {err}") from err


def make_tuner(sweep: Sweep, hypermodel: AlexNetHyperModel | None = None, **context: str) -> keras_tuner.Tuner:
    spec, budget = sweep.spec, sweep.spec.budget
    base_cls = {"random": keras_tuner.RandomSearch, "bayesian": keras_tuner.BayesianOptimization,
                "hyperband": keras_tuner.Hyperband}[spec.tuner]
    shape = (dict(max_epochs=sweep.base.train.epochs, factor=budget.factor,
                  hyperband_iterations=budget.hyperband_iterations) if spec.tuner == "hyperband" else
             dict(max_trials=budget.max_trials, **({"num_initial_points": budget.num_initial_points}
                                                  if spec.tuner == "bayesian" else {})))
    # keras-tuner's DEBUG prints each failed trial's chained tracebacks; run_trial prints one line instead.
    keras_tuner.src.config.DEBUG = False
    tuner = type(f"Tracked{base_cls.__name__}", (TrackedTrials, base_cls), {})(
        hypermodel=hypermodel or AlexNetHyperModel(sweep),
        objective=keras_tuner.Objective(sweep.objective, sweep.direction),
        seed=spec.seed + 1, max_consecutive_failed_trials=budget.max_failed_trials,   # seed 0: a random one
        directory=spec.directory, project_name=sweep.name, overwrite=False, **shape)
    tuner.sweep = sweep
    vars(tuner).update(context)
    return tuner


def open_state(sweep: Sweep, overwrite: bool) -> str:
    """The sweep id of `<directory>/<name>`, creating it for a new sweep; refuse a changed sweep file."""
    folder, state = sweep.project_dir, sweep.project_dir / STATE_FILE
    if overwrite:
        shutil.rmtree(folder, ignore_errors=True)
    if folder.exists() and any(folder.iterdir()) and not state.is_file():   # a rival `tune` writes the state first
        raise ConfigError(f"{str(folder)!r} holds files but no {STATE_FILE}: not a sweep of this "
                          f"project. Pass --overwrite to replace it, or choose another --tuner-dir.")
    folder.mkdir(parents=True, exist_ok=True)
    mine = folder.parent / f".{folder.name}-{uuid.uuid4().hex}.json"
    mine.write_text(json.dumps({"name": sweep.name, "digest": sweep.digest(), "uid": uuid.uuid4().hex}) + "\n")
    with contextlib.suppress(FileExistsError):   # a state already, or a `tune` started at the same moment wrote it
        os.link(mine, state)
    mine.unlink()
    saved = json.loads(state.read_text())
    if saved.get("digest") != sweep.digest():
        raise ConfigError(f"the tuner state in {str(folder)!r} belongs to another version of sweep {sweep.name!r} "
                          f"(digest {saved.get('digest')}, this file gives {sweep.digest()}); keras-tuner would ignore "
                          f"the changed search space. Pass --overwrite to start the sweep again, or give the changed "
                          f"sweep another `name` (or --tuner-dir).")
    return saved["uid"]


def search(tuner: keras_tuner.Tuner) -> None:
    """keras-tuner's own search: trials here, or, in the chief's job, serving the oracle to the workers."""
    try:
        tuner.search()
    except keras_tuner.errors.FatalError as err:   # an MLflow error in a trial (run_trial)
        if not tracking.is_tracking_error(err):
            raise
        cause = err.__cause__
        raise tracking.TrackingError(f"MLflow failed during a trial of sweep {tuner.sweep.name!r} "
                                     f"({tracking.tracking_uri()!r}): {type(cause).__name__}: {cause}") from err
    except RuntimeError as err:
        if "consecutive failures" in str(err):
            raise SweepError(f"sweep {tuner.sweep.name!r} stopped: {str(err).splitlines()[0]} (see the FAILED "
                             f"trial runs' `error` tag).") from err
        raise


def parent_params(sweep: Sweep) -> dict[str, Any]:
    """The sweep's parent run's params: what is searched, how, and (bayesian) how many random trials first."""
    spec = sweep.spec
    return {"sweep_name": sweep.name, "sweep_tuner": spec.tuner, "sweep_objective": sweep.objective,
            "sweep_direction": sweep.direction, "sweep_seed": spec.seed,
            **({"sweep_num_initial_points": spec.budget.num_initial_points} if spec.tuner == "bayesian" else {}),
            **{f"space.{name}": " ".join(f"{k}={v}" for k, v in p.model_dump(exclude_none=True).items())
               for name, p in spec.search_space.items()}}


def run_sweep(sweep: Sweep, *, overwrite: bool = False, ray: str | None = None, workers: int | None = None,
              cpus: float = 1.0) -> tuple[str, dict[str, Any]]:
    """Run (or continue) `sweep` here or on a Ray cluster (docs/cluster.md); the parent's id, the best trial's row."""
    distributed = sorted(k for k in os.environ if k.startswith("KERASTUNER_"))
    if distributed:
        raise ConfigError(f"alexnet-keras tune starts the chief and the workers itself (--ray): unset "
                          f"{', '.join(distributed)}.")
    if ray is not None and ray.startswith("ray://"):   # the chief serves the oracle on this machine's node
        raise ConfigError(f"tune --ray {ray}: run the sweep on a node of the cluster (--ray auto or "
                          f"HEAD:PORT there, or `ray job submit`), not through a ray:// client address.")
    from . import cluster

    with cluster.connected(None if ray == "local" else ray) if ray else contextlib.nullcontext() as info:
        if info is not None:   # before anything is created
            cluster.check_store(tracking.tracking_uri(), info)
            location = tracking.artifact_location(tracking.experiment_id_for(sweep.base.experiment))
            cluster.check_store(tracking.tracking_uri(), info, artifact_location=location)
            workers = ray_workers(info, sweep, cpus, workers)
        hypermodel = AlexNetHyperModel(sweep)
        hypermodel.data_for(sweep.base)        # a missing dataset fails here, before any run or state
        tuner = make_tuner(sweep, hypermodel, uid=open_state(sweep, overwrite))
        match = {tracking.SWEEP_UID_TAG: tuner.uid, tracking.SWEEP_ROLE_TAG: "parent"}
        tags = {tracking.SWEEP_TAG: sweep.name, tracking.SWEEP_DIGEST_TAG: sweep.digest(),
                tracking.SWEEP_MAX_TRIALS_TAG: str(sweep.max_trials)}
        note = (f"Hyperparameter sweep {sweep.name!r} (keras-tuner, {sweep.spec.tuner} search) for the best "
                f"{sweep.objective} ({sweep.direction}) over {', '.join(sweep.names)}: one nested run per trial; "
                f"here the trial table, the best values and the best trial's model.\n\n{sweep.spec.description}")
        # One parent holds the whole sweep: a new one (a second `mlflow run`) takes the trials of the earlier.
        with tracking.parent_run(sweep.base.experiment, sweep.name, match, tags=tags, params=parent_params(sweep),
                                 description=note.strip(), retire={tracking.SWEEP_ROLE_TAG: "superseded"}) as (
                tuner.parent_run_id, tuner.experiment):
            tuner.save()   # keras-tuner reloads only if its tuner file exists: an interrupted first trial resumes too
            tracking.log_dict(sweep.to_dict(), "sweep/sweep.yaml")
            if info is None:
                search(tuner)
            else:
                _search_on_ray(tuner, info, workers, cpus)
                tuner.reload()   # the trials as the chief's oracle left them
            best = summarize(tuner)
    print(f"sweep {sweep.name!r}: parent run {tuner.parent_run_id}; best trial {best['trial']} "
          f"{sweep.objective}={best[sweep.objective]:.4g}", flush=True)
    return tuner.parent_run_id, best


def _search_job(sweep: Sweep, uri: str, uid: str, parent_run_id: str, experiment: str) -> None:
    """A Ray job: keras-tuner's chief (serving the oracle) or a worker, by its KERASTUNER_* variables."""
    tracking.configure(uri)
    tuner = make_tuner(sweep, uid=uid, parent_run_id=parent_run_id, experiment=experiment)
    tuner.save()   # the chief reloads the oracle on the next run only if its tuner file exists
    with tracking.sigterm_as_interrupt():
        search(tuner)


def ray_workers(cluster_info, sweep: Sweep, cpus: float, workers: int | None) -> int:
    """`workers`, else one per GPU, else one per `cpus` CPUs of the cluster; at most max_trials."""
    if workers is not None:
        if workers < 1:
            raise ConfigError(f"--ray-workers must be at least 1; got {workers}.")
        return workers
    fits = int(cluster_info.gpus) if cluster_info.gpus else int(cluster_info.cpus // cpus)
    return max(1, fits if sweep.spec.tuner == "hyperband" else min(fits, sweep.max_trials))


def _search_on_ray(tuner, info, count: int, cpus: float) -> None:
    """The chief on this machine's node, `count` workers (a GPU each, else `cpus` CPUs) as Ray jobs: docs/cluster.md."""
    from . import cluster

    sweep, uri = tuner.sweep, tracking.tracking_uri()
    node = cluster.driver_node()
    oracle = {"KERASTUNER_ORACLE_IP": node.address, "KERASTUNER_ORACLE_PORT": str(cluster.free_port(node.address))}
    threads = {"TF_NUM_INTRAOP_THREADS": str(max(1, int(cpus))), "TF_CPP_MIN_LOG_LEVEL": "2"}
    spec = sweep.spec.model_copy(update={"directory": str(Path(sweep.spec.directory).resolve())})
    args = (replace(sweep, spec=spec), uri, tuner.uid, tuner.parent_run_id, tuner.experiment)
    jobs = [cluster.Job("chief", _search_job, args, resources={"num_cpus": 0, "num_gpus": 0},
                        env={**oracle, "KERASTUNER_TUNER_ID": "chief"}, node_id=node.node_id, serves=True)]
    jobs += [cluster.Job(f"tuner{i}", _search_job, args, env={**oracle, **threads, "KERASTUNER_TUNER_ID": f"tuner{i}"})
             for i in range(count)]
    print(f"sweep {sweep.name!r} on the {info.describe()}: the chief on {node.address} (oracle port "
          f"{oracle['KERASTUNER_ORACLE_PORT']}), {count} worker(s)", flush=True)

    def on_done(outcome) -> None:
        if outcome.ok:
            return
        if isinstance(outcome.error, (ConfigError, tracking.TrackingError)):
            raise outcome.error
        if tracking.is_tracking_error(outcome.error):
            raise tracking.TrackingError(f"the MLflow store {uri} failed in the sweep's {outcome.name} "
                                         f"({outcome.error_text}); what was logged is kept: run the same "
                                         f"command again once the store answers.") from None
        raise SweepError(f"the sweep's {outcome.name} failed ({outcome.error_text}); the others were "
                         f"stopped. Run the same command again to continue the sweep.")

    cluster.run_jobs(jobs, cpus_per_job=cpus, env=cluster.forwarded_env(), cwd=os.getcwd(), on_done=on_done)


def trial_rows(tuner) -> list[dict[str, Any]]:
    """One row per trial the oracle knows, best first (trials without a score last; ties by number)."""
    sweep, runs, done = tuner.sweep, tuner.runs(), keras_tuner.engine.trial.TrialStatus.COMPLETED
    sign = -1 if sweep.direction == "max" else 1
    trials = sorted(tuner.oracle.trials.values(), key=lambda t: (t.status != done, sign * t.score if t.status == done
                                                                 else 0, int(t.trial_id)))
    return [{"rank": rank if t.status == done else None, "trial": number(t.trial_id),
             "trial_id": t.trial_id, "status": str(t.status), sweep.objective: t.score if t.status == done else None,
             "best_epoch": t.best_step if t.status == done else None,
             **{name: t.hyperparameters.values.get(name) for name in sweep.names},
             "run_id": runs[t.trial_id].info.run_id if t.trial_id in runs else ""}
            for rank, t in enumerate(trials, 1)]


def importance(rows: list[dict[str, Any]], sweep: Sweep) -> dict[str, float]:
    """A rough 0..1 importance per dimension over the completed trials (0 with fewer than three, or no variation):
    |Spearman| with the objective for numbers, the share of variance between groups (eta squared) otherwise."""
    from scipy import stats

    done = [r for r in rows if r[sweep.objective] is not None]
    scores = np.array([r[sweep.objective] for r in done], dtype=float)
    out = {}
    for name in sweep.names:
        values = [r[name] for r in done]
        value = 0.0
        if len(done) >= 3 and len(set(map(str, values))) > 1 and np.ptp(scores) > 0:
            if sweep.param(name).numeric or all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                for v in values):
                value = abs(float(stats.spearmanr(np.asarray(values, dtype=float), scores).statistic))
            else:
                between = sum(len(g) * (np.mean(g) - scores.mean()) ** 2 for g in (
                    scores[[str(v) == key for v in values]] for key in set(map(str, values))))
                value = float(between / np.sum((scores - scores.mean()) ** 2))
        out[name] = 0.0 if not np.isfinite(value) else round(value, 4)
    return out


def summarize(tuner) -> dict[str, Any]:
    """Log the results on the (active) parent run unless nothing changed since last time; the best row."""
    sweep = tuner.sweep
    rows = trial_rows(tuner)
    done = [r for r in rows if r[sweep.objective] is not None]
    if not done:
        raise SweepError(f"no trial of sweep {sweep.name!r} completed ({len(rows)} failed); see the FAILED "
                         f"trial runs' `error` tag.")
    best = done[0]
    key = f"{len(done)}/{len(rows)}:{best['trial']}"
    if tracking.get_run(tuner.parent_run_id).data.tags.get(tracking.SWEEP_SUMMARY_TAG) == key:
        print(f"sweep {sweep.name!r}: no new trials since the last summary", flush=True)
        return best
    best_values = {name: best[name] for name in sweep.names}
    tracking.set_tags({**{tracking.BEST_TAG + k: value_text(v) for k, v in best_values.items()},
                       tracking.BEST_TRIAL_TAG: str(best["trial"]), tracking.BEST_RUN_ID_TAG: best["run_id"]})
    tracking.log_metrics({f"best_{sweep.objective}": best[sweep.objective], "completed_trials": len(done),
                          "failed_trials": len(rows) - len(done)}, step=len(done))
    tracking.log_dict({"trial": best["trial"], "run_id": best["run_id"],
                       sweep.objective: best[sweep.objective], "hyperparameters": best_values},
                      "sweep/best_hyperparameters.json")
    columns = ["rank", "trial", "status", sweep.objective, "best_epoch", *sweep.names, "run_id"]
    better = "higher" if sweep.direction == "max" else "lower"
    tracking.log_text(csv_text(rows, columns), "sweep/trials.csv")
    tracking.log_text(f"# Sweep {sweep.name}: {len(rows)} trials, sorted by {sweep.objective} ({better} is "
                      f"better)\n\n" + markdown_table(rows, columns, digits={sweep.objective: 4}), "sweep/trials.md")
    weights = importance(rows, sweep)
    tracking.log_dict(weights, "sweep/importance.json")
    tracking.log_figure(figures.sweep_figure(rows, sweep, weights), "sweep/objective.png")

    trial = tuner.oracle.trials[best["trial_id"]]
    config = sweep.trial_config(trial.hyperparameters.values)
    data = tuner.hypermodel.data_for(config)
    model, source = None, sweep.spec.final_model
    if source == "auto":   # the best trial's best-epoch checkpoint, where this machine has it
        with warnings.catch_warnings():   # "Skipping variable loading for optimizer": weights are enough
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            try:
                model, source = tuner.load_model(trial), "checkpoint"
            except (OSError, ValueError) as err:   # the trial ran on another machine
                print(f"no checkpoint of trial {best['trial']} here ({err})", flush=True)
    if model is None and source != "none":
        print(f"re-training the best trial {best['trial']} for the sweep's model", flush=True)
        model, source = tuner.hypermodel.build(trial.hyperparameters), "retrained"
        fit(model, data, config, track=False)   # the parent's metrics are the sweep's, not this training's
    if model is not None:
        # What train logs for a trained model, so that the sweep's model predicts and serves the same way.
        log_inputs(config, data, model)
        history = tracking.epoch_history(best["run_id"]) if best["run_id"] else {}
        log_trained_model(model, data, history, title=f"{sweep.name}: best trial {best['trial']}",
                          step=len(done))
    tracking.set_tags({tracking.MODEL_SOURCE_TAG: source, tracking.SWEEP_SUMMARY_TAG: key})
    tracking.flush()
    return best


def cmd_tune(args) -> int:
    sweep = load_sweep(args.sweep, max_trials=args.max_trials, directory=args.tuner_dir)
    if args.dry_run:
        print(tracking.dumps(sweep.to_dict()))
        resumes = (sweep.project_dir / STATE_FILE).is_file()
        print(f"tuner state: {sweep.project_dir} ({'resumes' if resumes else 'new sweep'})")
        return 0
    if args.register:   # before any run: a bad name, or a sweep that logs no model, fails now
        from ..serving import check_model_name

        check_model_name(args.register)
        if sweep.spec.final_model == "none":
            raise ConfigError(f"{sweep.source}: --register needs the sweep's model, but `final_model: none` "
                              f"logs none; remove final_model (or set it to auto).")
    tracking.configure(args.tracking_uri)
    try:
        parent_run_id, best = run_sweep(sweep, overwrite=args.overwrite, ray=args.ray, workers=args.ray_workers,
                                        cpus=args.ray_cpus)
    except SweepError as err:
        print(f"alexnet-keras tune: error: {err}", file=sys.stderr)
        return 1
    if args.register:   # the sweep's model (on the parent run) as the champion, tagged with the sweep and its score
        from ..serving import DEFAULT_ALIAS, register_model

        tags = {tracking.SWEEP_TAG: sweep.name, tracking.PARENT_RUN_TAG: parent_run_id,
                tracking.SELECTION_METRIC_TAG: sweep.objective,
                tracking.SELECTION_VALUE_TAG: f"{best[sweep.objective]:.6g}",
                tracking.BEST_TRIAL_TAG: str(best["trial"]), tracking.BEST_RUN_ID_TAG: best["run_id"]}
        version = register_model(parent_run_id, args.register, origin="sweep", tags=tags,
                                 description=f"The best trial ({best['trial']}) of sweep {sweep.name!r}: "
                                             f"{sweep.objective} {best[sweep.objective]:.4g}.")
        print(f"registered the model of sweep {sweep.name!r} (parent run {parent_run_id}) as {args.register!r} "
              f"version {version.version}: models:/{args.register}@{DEFAULT_ALIAS}", flush=True)
    return 0
