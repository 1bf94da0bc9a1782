"""The `alexnet-keras` command: every config leaf is a flag (`--lrn false`), applied after `--config
FILE.yaml`. Bad input ends in one clear line on stderr and exit status 2, never a traceback. TensorFlow,
Keras and MLflow are imported inside the commands that use them, so `--help` and `report` start fast."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import typing
from typing import Sequence

from .config import SECTIONS, ConfigError, leaf_fields, load_config, none_text, parse_value


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Every config leaf as a flag, its help the field's description, choices and default."""
    parser.add_argument("--config", metavar="YAML", help="experiment file applied before the flags "
                        "(see experiments/)")
    groups = {section: parser.add_argument_group(f"{section} options") for section in SECTIONS}
    groups[None] = parser.add_argument_group("tracking options")
    for name, (section, info) in leaf_fields().items():
        is_bool = info.annotation is bool
        choices = typing.get_args(info.annotation) if typing.get_origin(info.annotation) is typing.Literal else ()
        default = info.default if info.default_factory is None else info.default_factory()
        groups[section].add_argument(
            f"--{name.replace('_', '-')}", dest=name, default=argparse.SUPPRESS, metavar="BOOL" if is_bool else "X",
            nargs="?" if is_bool else None, const="true" if is_bool else None,
            help=f"{info.description}" + (f"; one of {', '.join(choices)}" if choices else "")
            + f" (default: {default!r})".replace("%", "%%"))


def _add_tracking_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else "
                        "sqlite:///mlflow.db with artifacts in ./mlruns)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="alexnet-keras", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train one AlexNet and log it to MLflow")
    _add_config_flags(train)
    _add_tracking_flag(train)
    train.add_argument("--dry-run", action="store_true", help="validate the config, print it and the "
                       "model summary, and stop: no data is read and no run is created")
    ablate = sub.add_parser("ablate", help="run an ablation study: one parent run, one child per "
                            "(variant, seed), and a report on the parent (see experiments/ablation.yaml)")
    ablate.add_argument("study", metavar="STUDY_YAML", help="study file: base config, axes, seeds")
    ablate.add_argument("--parallel", type=int, default=1, metavar="N", help="train N children at a "
                        "time as jobs on a local Ray cluster, one GPU each where the machine has GPUs "
                        "(default: 1, one after another in this process; needs pip install -e '.[ray]')")
    _add_ray_flags(ablate, "child")
    _add_register_flag(ablate, "the study's best variant (highest mean validation accuracy; its run with the "
                       "best validation accuracy)")
    _add_tracking_flag(ablate)
    ablate.add_argument("--dry-run", action="store_true", help="validate the study and list its variants; "
                        "no run is created")
    report = sub.add_parser("report", help="rebuild an ablation study's report from the MLflow store")
    report.add_argument("run_id", metavar="PARENT_RUN_ID", help="the study's parent run")
    _add_tracking_flag(report)
    _add_tune_parser(sub)
    _add_benchmark_parser(sub)
    _add_recipe_parsers(sub)
    return parser


def _add_register_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--register", type=none_text, default=None, metavar="NAME",
                        help=f"register {what} in the MLflow model registry as a new version of NAME, alias "
                        f"champion: then `predict --model models:/NAME@champion`, `mlflow models serve -m "
                        f"models:/NAME@champion`")


def _ray_address(text: str) -> str | None:
    """`--ray` alone: "local"; `--ray none` or an empty MLproject parameter: no Ray."""
    return none_text(str(text).strip())


def _add_ray_flags(parser: argparse.ArgumentParser, unit: str) -> None:
    """`--ray [ADDRESS]` and `--ray-cpus N` (experiments/cluster.py, docs/cluster.md)."""
    parser.add_argument("--ray", nargs="?", const="local", default=None, type=_ray_address, metavar="ADDRESS",
                        help=f"run every {unit} as a job on a Ray cluster: alone, a local cluster on this "
                        f"machine (127.0.0.1 only); `auto`, the cluster this machine belongs to; HOST:PORT, "
                        f"the cluster whose head is there; `none`: no Ray (default). Needs "
                        f"pip install -e '.[ray]' and a store every node reaches (see docs/cluster.md)")
    parser.add_argument("--ray-cpus", type=float, default=1.0, metavar="N", help=f"CPUs each {unit} asks "
                        f"for on a cluster without GPUs (default: 1; with GPUs: one GPU each)")


def _optional_int(text: str) -> int | None:
    """`--max-trials ""` (an empty MLproject parameter) means "as in the file"."""
    try:
        return parse_value("value", text, int | None)
    except ConfigError as err:   # argparse names the flag
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_tune_parser(sub) -> None:
    tune = sub.add_parser("tune", help="hyperparameter sweep with keras-tuner: one parent run, one nested "
                          "run per trial (see experiments/sweep.yaml, docs/sweeps.md)")
    tune.add_argument("sweep", metavar="SWEEP_YAML", help="sweep file: tuner, objective, budget, base config "
                      "and search space")
    tune.add_argument("--max-trials", type=_optional_int, default=None, metavar="N",
                      help="override budget.max_trials; a bigger value continues a finished sweep")
    tune.add_argument("--tuner-dir", metavar="DIR", help="keras-tuner state folder (default: the file's "
                      "`directory`, else ./tuner); the sweep lives in DIR/<name>")
    tune.add_argument("--overwrite", action="store_true", help="forget the tuner state and start again "
                      "(a new parent run; the old runs stay in MLflow)")
    _add_tracking_flag(tune)
    _add_ray_flags(tune, "trial worker")
    _add_register_flag(tune, "the sweep's model (its best trial's, logged on the parent run)")
    tune.add_argument("--ray-workers", type=int, default=None, metavar="N", help="with --ray: how many workers "
                      "(default: one per GPU of the cluster, else one per --ray-cpus CPUs, at most max_trials)")
    tune.add_argument("--dry-run", action="store_true", help="validate the sweep file, print it and stop: "
                      "no data is read, no tuner state or run is created")


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    names = leaf_fields()
    return {k: v for k, v in vars(args).items() if k in names}


def cmd_train(args: argparse.Namespace) -> int:
    config = load_config(args.config, _overrides(args))
    if args.dry_run:
        from .model.alexnet import build_alexnet, summary_text
        from .tracking import dumps

        print(dumps(config.to_dict()))
        num_classes = config.data.synthetic_classes if config.data.dataset == "synthetic" else 10
        print(summary_text(build_alexnet(config.model, num_classes=num_classes)))
        return 0
    from . import tracking
    from .training.checkpoints import CheckpointError
    from .training.train import ResultsNotLogged, train_and_evaluate

    tracking.configure(args.tracking_uri)
    try:
        train_and_evaluate(config)
    except CheckpointError as err:   # a damaged checkpoint, or one that cannot be written (a full disk)
        print(f"alexnet-keras train: error: {err}", file=sys.stderr)
        return 2
    except ResultsNotLogged as err:   # the run is FAILED; its trained weights are kept
        cause = err.__cause__
        if cause is not None and not (isinstance(cause, OSError) or tracking.is_tracking_error(cause)):
            import traceback   # not the disk or the store: a bug, whose traceback helps fixing it

            traceback.print_exception(cause)
        command = shlex.join(["alexnet-keras", *getattr(args, "argv", ["train", "..."])])
        print(f"alexnet-keras train: error: {err} The command: {command}", file=sys.stderr)
        return 1
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from .experiments.ablate import run_study
    from .experiments.study import StudyIncomplete, load_study, plan_text

    study = load_study(args.study)   # every variant is validated before any run exists
    if args.register:
        from .serving import check_model_name

        check_model_name(args.register)   # before any run
    if args.dry_run:
        print(plan_text(study))
        return 0
    try:
        result = run_study(study, parallel=args.parallel, tracking_uri=args.tracking_uri, ray=args.ray,
                           ray_cpus=args.ray_cpus)
    except StudyIncomplete as err:
        print(f"alexnet-keras ablate: {err}", file=sys.stderr)
        if args.register:
            print(f"alexnet-keras ablate: nothing registered as {args.register!r}: the study is incomplete",
                  file=sys.stderr)
        return 1
    print(result.report.markdown)
    print(f"parent run: {result.parent_run_id}")
    if args.register:
        from .experiments.ablate import register_champion

        register_champion(study, result, args.register)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from . import tracking
    from .experiments.report import build_report

    tracking.configure(args.tracking_uri)
    print(build_report(args.run_id).markdown)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from .experiments.tune import cmd_tune as tune

    return tune(args)


def _add_benchmark_parser(sub) -> None:
    from .training.benchmark import add_arguments

    bench = sub.add_parser("benchmark", help="time forward / forward+backward (the seeds' benchmark) and "
                           "training throughput, log them to one MLflow run (see benchmarks/README.md)")
    add_arguments(bench)
    _add_tracking_flag(bench)


def cmd_benchmark(args: argparse.Namespace) -> int:
    from . import tracking
    from .training.benchmark import benchmark_and_log, options_from_args

    options = options_from_args(args)   # validated before the store is opened
    tracking.configure(args.tracking_uri)
    run_id, files = benchmark_and_log(options, experiment=args.experiment, run_name=args.run_name,
                                      output_dir=args.output_dir)
    print(files["results.md"])
    print(f"MLflow run {run_id} (experiment {args.experiment!r}): metrics and benchmark/results.*")
    return 0


def _add_recipe_parsers(sub) -> None:
    """`predict` (predict.py) and `prepare` (data/tfrecord.py): using a trained model, and TFRecord shards."""
    predict = sub.add_parser("predict", help="top-5 classes of image files under a trained model, "
                             "preprocessed exactly as in its training run")
    predict.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and/or folders "
                         "(every visible file under a folder)")
    predict.add_argument("--model", required=True, metavar="REF", help="run id, runs:/<run id>/model, "
                         "models:/NAME@ALIAS (e.g. @champion), models:/NAME/VERSION, an MLflow model folder, or a .keras file (with its "
                         "<name>.preprocessing.json beside it)")
    predict.add_argument("--crops", choices=("center", "ten"), default="center", help="centre crop, or the "
                         "paper's ten views (corners + centre and their reflections, softmax averaged)")
    predict.add_argument("--top", type=int, default=5, metavar="K", help="classes per image (default: 5)")
    predict.add_argument("--json", action="store_true", help="machine-readable output")
    predict.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per model call")
    _add_tracking_flag(predict)
    prepare = sub.add_parser("prepare", help="convert an image folder into sharded TFRecords with a "
                             "manifest, for --data-dir (see alexnet_keras/data/tfrecord.py)")
    prepare.add_argument("source", metavar="FOLDER", help="train/<class>/* (+ val/, test/) or <class>/*, or "
                         "an archive of one")
    prepare.add_argument("out", metavar="OUT", help="output folder (new or empty)")
    prepare.add_argument("--stored-size", type=int, default=256, metavar="N", help="shorter side rescaled to N "
                         "and the central NxN square kept (default: 256, the paper's)")
    prepare.add_argument("--encoding", choices=("jpeg", "png", "original"), default="jpeg", help="jpeg "
                         "(default, small), png (lossless: loads exactly like the folder), original (the "
                         "files' own bytes, rescaled when read)")
    prepare.add_argument("--quality", type=int, default=95, metavar="Q", help="JPEG quality (default: 95)")
    prepare.add_argument("--shard-size", type=int, default=1024, metavar="N", help="images per shard "
                         "(default: 1024)")
    prepare.add_argument("--overwrite", action="store_true", help="replace the shards of an earlier "
                         "`prepare` in OUT")


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import run_cli

    return run_cli(args.model, args.inputs, crops=args.crops, top=args.top, as_json=args.json,
                   batch_size=args.batch_size, tracking_uri=args.tracking_uri)


def cmd_prepare(args: argparse.Namespace) -> int:
    from .data.tfrecord import prepare

    prepare(args.source, args.out, stored_size=args.stored_size, encoding=args.encoding, quality=args.quality,
            shard_size=args.shard_size, overwrite=args.overwrite)
    return 0


COMMANDS = {"train": cmd_train, "ablate": cmd_ablate, "report": cmd_report, "tune": cmd_tune,
            "benchmark": cmd_benchmark, "predict": cmd_predict, "prepare": cmd_prepare}


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)   # to tell how to run the same command again
    from .data import DataError            # data/files.py only: no TensorFlow
    from .tracking import TrackingError

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DataError, TrackingError) as err:
        print(f"alexnet-keras {args.command}: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # diverged; the run is already marked FAILED with the reason
        print(f"alexnet-keras {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"alexnet-keras {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
