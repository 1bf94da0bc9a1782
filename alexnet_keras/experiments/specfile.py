"""Study and sweep files (`ablate`, `tune`): the YAML shape they share, read in one place.

Both are a mapping with

    name: ...                  # the parent run's name (default: the file's stem)
    description: ...           # the parent run's note
    experiment: ...            # the MLflow experiment (default: the base config's)
    base_config: cifar10.yaml  # an experiment YAML, relative to this file (else to the working folder)
    base: {epochs: 30}         # training options on top of it, nested (model/data/train) or flat

plus keys of their own (ablate.py: design, axes, seeds ...; tune.py: tuner, budget, search_space ...).
`read_spec` refuses unknown keys (one "did you mean" for every key, option and axis: config.did_you_mean),
builds the base Config (defaults -> base_config -> base) and leaves the rest to the caller.
Nothing here touches MLflow, data or a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..config import Config, ConfigError, did_you_mean, load_config, load_yaml

COMMON_KEYS = ("name", "description", "experiment", "base_config", "base")


@dataclass(frozen=True)
class SpecFile:
    """A study or sweep file, read: its mapping and the base Config every run starts from."""

    kind: str                      # "study" or "sweep"
    source: str                    # how messages name the file (its path)
    path: Path | None
    data: Mapping[str, Any]
    text: str                      # the file as written (logged on the parent run)
    name: str
    description: str
    base: Config                   # defaults -> base_config -> base (its `experiment` is the config's)
    experiment: str                # the file's `experiment`, else the base config's


def check_keys(mapping: Mapping[str, Any], known: Sequence[str], where: str, *,
               error: type[ConfigError] = ConfigError, hint: str = "") -> None:
    """Refuse the first key of `mapping` that is not in `known`, naming the closest known ones."""
    for key in mapping:
        if key not in known:
            raise error(f"{where}: unknown key {str(key)!r}.{did_you_mean(str(key), list(known))} Known keys: "
                        f"{', '.join(known)}{hint}.")


def located(err: Exception, source: str, where: str) -> str:
    """The message of `err`, prefixed with `where` unless it already names `source` first."""
    message = str(err)
    return message if message.startswith(source) else f"{where}: {message}"


def resolve_base_config(raw: Any, path: Path | None, source: str) -> Path:
    """`base_config`'s file: beside the study/sweep file, else relative to the working folder."""
    if not isinstance(raw, str) or not raw:
        raise ConfigError(f"{source}: base_config must be the path of an experiment YAML; got {raw!r}.")
    given = Path(raw).expanduser()
    candidates = [given] if given.is_absolute() else (
        ([path.parent / given] if path is not None else []) + [Path.cwd() / given])
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{source}: base_config {raw!r} not found (looked at "
                      f"{', '.join(str(c) for c in candidates)}).")


def spec_from_dict(data: Mapping[str, Any], *, kind: str, keys: Sequence[str], source: str,
                   path: Path | None = None, text: str = "",
                   error: type[ConfigError] = ConfigError) -> SpecFile:
    """Check the keys and the shared part of a study or sweep mapping; build its base Config."""
    try:
        check_keys(data, [*COMMON_KEYS, *keys], source, hint="; training options go under `base:`")
        name = data.get("name", path.stem if path is not None else None)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{source}: `name` must be a non-empty string; got {name!r}.")
        description = data.get("description") or ""
        if not isinstance(description, str):
            raise ConfigError(f"{source}: `description` must be a string; got {description!r}.")
        base = Config()
        if data.get("base_config") is not None:
            base_path = resolve_base_config(data["base_config"], path, source)
            try:
                base = load_config(base_path)
            except ConfigError as err:
                raise ConfigError(f"{source}: base_config: {err}") from None
        raw_base = data.get("base") or {}
        if not isinstance(raw_base, Mapping):
            raise ConfigError(f"{source}: `base` must be a mapping of training options (model/data/train or "
                              f"flat names); got {raw_base!r}.")
        try:
            base = base.override(raw_base, source=f"{source}: base")
        except ConfigError as err:
            raise ConfigError(located(err, source, f"{source}: base")) from None
        experiment = data.get("experiment") or base.experiment
        if not isinstance(experiment, str):
            raise ConfigError(f"{source}: `experiment` must be an MLflow experiment name; got {experiment!r}.")
    except ConfigError as err:
        if isinstance(err, error):
            raise
        raise error(str(err)) from None
    return SpecFile(kind=kind, source=source, path=path, data=data, text=text, name=name,
                    description=description.strip(), base=base, experiment=experiment)


def read_spec(path: str | Path, *, kind: str, keys: Sequence[str],
              error: type[ConfigError] = ConfigError) -> SpecFile:
    """Read the study or sweep file at `path` (see the module docstring)."""
    path = Path(path)
    try:
        data = load_yaml(path)
    except ConfigError as err:
        raise error(str(err).replace("config file", f"{kind} file", 1)) from None
    return spec_from_dict(data, kind=kind, keys=keys, source=str(path), path=path, text=path.read_text(),
                          error=error)
