"""The `alexnet-keras` command: every config option is a `train` flag (`--lrn false`), applied over the main
job or over `--config FILE.yaml`. Bad input ends in one line on stderr and exit status 2, never a traceback.
TensorFlow, Keras and MLflow are imported by the commands that use them, so `--help` and `report` start fast."""

import argparse
import contextlib
import math
import os
import re
import shlex
import sys
import typing
from importlib import import_module
from typing import Sequence

from .config import MAIN_JOB, SECTIONS, ConfigError, did_you_mean, leaf_fields, load_config, none_text


class Parser(argparse.ArgumentParser):
    """Flags spelled out in full (`--epoch` is not `--epochs`); every error in one line, a typo'd flag's with hints."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs, allow_abbrev=False)

    def parse_known_args(self, args=None, namespace=None):
        namespace, unknown = super().parse_known_args(args, namespace)
        if unknown:
            flags = re.findall(r"--[\w-]+", self.format_usage())
            hints = "".join(did_you_mean(word.partition("=")[0], flags, n=1) for word in unknown if word[:2] == "--")
            self.error(f"unrecognized arguments: {' '.join(unknown)}.{hints}")
        return namespace, unknown

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """A flag per config option, grouped by section: its description, its choices and the main job's value."""
    parser.add_argument("--config", metavar="YAML", help="experiment file to start from instead of the main job")
    groups = {section: parser.add_argument_group(f"{section} options") for section in SECTIONS}
    groups[None] = parser.add_argument_group("tracking options")
    defaults = MAIN_JOB.flat()
    for name, (section, info) in leaf_fields().items():
        kinds = {info.annotation, *typing.get_args(info.annotation)}
        choices = typing.get_args(info.annotation) if typing.get_origin(info.annotation) is typing.Literal else ()
        metavar = "{true,false}" if bool in kinds else "{" + ",".join(choices) + "}" if choices else (
            "N" if int in kinds else "X" if float in kinds else None)
        default = defaults[name] if not isinstance(defaults[name], bool | None) else str(defaults[name]).lower()
        groups[section].add_argument(f"--{name.replace('_', '-')}", dest=name, default=argparse.SUPPRESS,
                                     metavar=metavar, nargs="?" if bool in kinds else None,
                                     const="true" if bool in kinds else None,
                                     help=f"{info.description} (default: {default})".replace("%", "%%"))


def _add_shared_flags(parser: argparse.ArgumentParser, dry_run: str | None = None, register: str | None = None):
    parser.add_argument("--tracking-uri", metavar="URI", help="MLflow store (default: $MLFLOW_TRACKING_URI, "
                        "else sqlite:///mlflow.db with artifacts in ./mlruns)")
    if register:
        parser.add_argument("--register", type=none_text, default=None, metavar="NAME", help=f"register "
                            f"{register} as a new version of NAME, alias champion")
    if dry_run:
        parser.add_argument("--dry-run", action="store_true", help=f"{dry_run}; no run is created")


def _positive(kind: type, what: str):
    """A flag's type taking positive numbers only: refused while parsing, before any cluster or parent run."""
    def parse(text: str) -> float | int:
        with contextlib.suppress(ValueError):
            if 0 < kind(text) < math.inf:
                return kind(text)
        raise argparse.ArgumentTypeError(f"expected a positive {what}, got {text!r}")
    return parse


def _add_ray_flags(parser: argparse.ArgumentParser, unit: str) -> None:
    """`--ray [ADDRESS]` and `--ray-cpus N` (experiments/cluster.py, docs/cluster.md)."""
    parser.add_argument("--ray", nargs="?", const="local", default=None, type=none_text, metavar="ADDRESS",
                        help=f"run every {unit} as a job on a Ray cluster: alone, a local one (127.0.0.1 only); "
                        f"`auto` or HOST:PORT, an existing one; `none`: no Ray (default)")
    parser.add_argument("--ray-cpus", type=_positive(float, "number of CPUs (e.g. 0.5 or 2)"), default=1.0,
                        metavar="N", help=f"CPUs each {unit} asks for on a cluster without GPUs (default: 1; "
                        f"with GPUs: one GPU each)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .training.benchmark import add_arguments

    parser = Parser(prog="alexnet-keras", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train one AlexNet (by default the main job) and log it to MLflow")
    _add_config_flags(train)
    _add_shared_flags(train, "print the config and the model summary; no data is read")
    train.set_defaults(run=cmd_train)
    ablate = sub.add_parser("ablate", help="ablation study: a parent run, a child per (variant, seed), a report")
    ablate.add_argument("study", metavar="STUDY_YAML", help="study file: base config, axes, seeds")
    ablate.add_argument("--parallel", type=_positive(int, "whole number"), default=1, metavar="N", help="train N "
                        "children at a time on a local Ray cluster (default: 1, one after another in this process)")
    _add_ray_flags(ablate, "child")
    _add_shared_flags(ablate, "validate the study and list its variants", "the best variant's best run")
    ablate.set_defaults(run=cmd_ablate)
    report = sub.add_parser("report", help="rebuild an ablation study's report from the MLflow store")
    report.add_argument("run_id", metavar="PARENT_RUN_ID", help="the study's parent run")
    _add_shared_flags(report)
    report.set_defaults(run=cmd_report)
    tune = sub.add_parser("tune", help="keras-tuner sweep: a parent run, a nested run per trial (docs/sweeps.md)")
    tune.add_argument("sweep", metavar="SWEEP_YAML", help="sweep file: tuner, objective, budget, base, space")
    tune.add_argument("--max-trials", type=none_text, default=None, metavar="N", help="override "
                      "budget.max_trials (validated with it); a bigger value continues a finished sweep")
    tune.add_argument("--tuner-dir", metavar="DIR", help="keras-tuner state (default: the file's `directory`)")
    tune.add_argument("--overwrite", action="store_true", help="forget the tuner state and start again")
    _add_ray_flags(tune, "trial worker")
    tune.add_argument("--ray-workers", type=_positive(int, "whole number"), default=None, metavar="N",
                      help="with --ray: how many workers (default: one per GPU, else one per --ray-cpus CPUs, at "
                      "most max_trials)")
    _add_shared_flags(tune, "validate the sweep file and print it", "the best trial's model")
    tune.set_defaults(run=lambda args: import_module(f"{__package__}.experiments.tune").cmd_tune(args))
    bench = sub.add_parser("benchmark", help="time forward, forward+backward and training throughput, logged "
                           "to one MLflow run (benchmarks/README.md)")
    add_arguments(bench)
    _add_shared_flags(bench)
    bench.set_defaults(run=cmd_benchmark)
    predict = sub.add_parser("predict", help="top-5 classes of images under a trained model, preprocessed as "
                             "in its training run")
    predict.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and/or folders")
    predict.add_argument("--model", required=True, metavar="REF", help="run id, runs:/ID/alexnet, "
                         "models:/NAME@ALIAS, models:/NAME/VERSION, an MLflow model folder or a .keras file")
    predict.add_argument("--crops", choices=("center", "ten"), default="center", help="centre crop, or the "
                         "paper's ten views, softmax averaged (default: center)")
    predict.add_argument("--top", type=int, default=5, metavar="K", help="classes per image (default: 5)")
    predict.add_argument("--json", action="store_true", help="machine-readable output")
    predict.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per model call")
    _add_shared_flags(predict)
    predict.set_defaults(run=lambda a: import_module(f"{__package__}.predict").run_cli(
        a.model, a.inputs, crops=a.crops, top=a.top, as_json=a.json, batch_size=a.batch_size,
        tracking_uri=a.tracking_uri))
    prepare = sub.add_parser("prepare", help="an image folder as sharded TFRecords, for --data-dir")
    prepare.add_argument("source", metavar="FOLDER", help="train/<class>/* (+ val/, test/), <class>/*, or an "
                         "archive of one")
    prepare.add_argument("out", metavar="OUT", help="output folder (new or empty)")
    prepare.add_argument("--stored-size", type=int, default=256, metavar="N", help="shorter side rescaled to N, "
                         "central NxN kept (default: 256)")
    prepare.add_argument("--encoding", choices=("jpeg", "png", "raw", "original"), default="jpeg", help="jpeg "
                         "(default), png (lossless), raw (uint8 pixels: nothing to decode when read) or the files' "
                         "own bytes")
    prepare.add_argument("--quality", type=int, default=95, metavar="Q", help="JPEG quality (default: 95)")
    prepare.add_argument("--shard-size", type=int, default=1024, metavar="N", help="images per shard")
    prepare.add_argument("--overwrite", action="store_true", help="replace an earlier `prepare` in OUT")
    prepare.set_defaults(run=cmd_prepare)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in vars(args).items() if k in leaf_fields()}
    config = load_config(args.config, overrides)
    if args.dry_run:
        from .model.alexnet import build_alexnet
        from .tracking import dumps

        print(dumps(config.to_dict()))
        num_classes = config.data.synthetic_classes if config.data.dataset == "synthetic" else 10
        build_alexnet(config.model, num_classes=num_classes).summary()
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
        command = shlex.join(["alexnet-keras", *args.argv])
        print(f"alexnet-keras train: error: {err} The command: {command}", file=sys.stderr)
        return 1
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from .experiments.ablate import register_champion, run_study
    from .experiments.study import StudyIncomplete, load_study, plan_text

    study = load_study(args.study)   # every variant is validated before any run exists
    if args.register:
        from .serving import check_model_name

        check_model_name(args.register)
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
        register_champion(study, result, args.register)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from . import tracking
    from .experiments.report import build_report

    tracking.configure(args.tracking_uri)
    print(build_report(args.run_id).markdown)
    return 0


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


def cmd_prepare(args: argparse.Namespace) -> int:
    from .data.tfrecord import prepare

    prepare(args.source, args.out, stored_size=args.stored_size, encoding=args.encoding, quality=args.quality,
            shard_size=args.shard_size, overwrite=args.overwrite)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)   # to tell how to run the same command again
    from .data import DataError            # data/files.py only: no TensorFlow
    from .tracking import TrackingError

    try:
        return args.run(args)
    except (ConfigError, DataError, TrackingError, FloatingPointError) as err:
        print(f"alexnet-keras {args.command}: error: {err}", file=sys.stderr)
        return 1 if isinstance(err, FloatingPointError) else 2   # diverged: the run is marked FAILED, with why
    except KeyboardInterrupt:
        print(f"alexnet-keras {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
