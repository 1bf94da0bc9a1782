"""The `alexnet-keras` command: a thin layer over config, train (and the other jobs).

Every config leaf is a flag (`--lrn false`, `--batch-size 64`); `--config FILE.yaml` is applied first,
flags after it. Bad input ends in one clear line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import typing
from typing import Sequence

from .config import SECTIONS, Config, ConfigError, leaf_fields, load_config


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="YAML", help="experiment file applied before the flags "
                        "(see experiments/)")
    defaults = Config().flat()
    groups = {section: parser.add_argument_group(f"{section} options") for section in SECTIONS}
    groups[None] = parser.add_argument_group("tracking options")
    for name, (section, f) in leaf_fields().items():
        hints = typing.get_type_hints(SECTIONS[section] if section else Config)
        is_bool = hints[name] is bool
        groups[section].add_argument(
            f"--{name.replace('_', '-')}", dest=name, default=argparse.SUPPRESS, metavar="BOOL" if is_bool else "X",
            nargs="?" if is_bool else None, const="true" if is_bool else None,
            help=f"default: {defaults[name]!r}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alexnet-keras", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train one AlexNet and log it to MLflow")
    _add_config_flags(train)
    train.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else "
                       "sqlite:///mlflow.db with artifacts in ./mlruns)")
    train.add_argument("--dry-run", action="store_true", help="validate the config, print it and the "
                       "model summary, and stop: no data is read and no run is created")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    names = leaf_fields()
    return {k: v for k, v in vars(args).items() if k in names}


def cmd_train(args: argparse.Namespace) -> int:
    config = load_config(args.config, _overrides(args))
    if args.dry_run:
        from .model import build_alexnet, summary_text
        from .tracking import dumps

        print(dumps(config.to_dict()))
        num_classes = config.data.synthetic_classes if config.data.dataset == "synthetic" else 10
        print(summary_text(build_alexnet(config.model, num_classes=num_classes)))
        return 0
    from . import tracking
    from .train import train_and_evaluate

    tracking.configure(args.tracking_uri)
    train_and_evaluate(config)
    return 0


COMMANDS = {"train": cmd_train}


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    args = _parser().parse_args(argv)
    from .data import DataError
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
