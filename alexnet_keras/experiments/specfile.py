"""The keys every study and sweep file shares (`SpecKeys`, extended by study.py and sweep.py), and `read_spec`."""

from pathlib import Path
from typing import Any, TypeVar

from pydantic import Field

from ..config import Config, ConfigError, Options, load_config, load_yaml, validated


class SpecKeys(Options):
    name: str | None = Field(None, min_length=1, description="the parent run's name (default: the file's stem)")
    description: str = Field("", description="the parent run's note")
    experiment: str | None = Field(None, min_length=1, description="the MLflow experiment (default: the "
                                   "base config's)")
    base_config: str | None = Field(None, min_length=1, description="an experiment YAML, relative to this "
                                    "file (else to the working folder)")
    base: dict[str, Any] = Field({}, description="training options on top of it (model/data/train or flat names)")


SpecT = TypeVar("SpecT", bound=SpecKeys)


def read_spec(path: str | Path, model: type[SpecT], kind: str) -> tuple[SpecT, Config]:
    """The study or sweep file at `path` as `model`, and its runs' Config: defaults, then base_config, then base."""
    path = Path(path)
    source = str(path)
    spec = validated(model, load_yaml(path, kind), source)
    spec = spec.model_copy(update={"name": spec.name or path.stem, "description": spec.description.strip()})
    base = Config()
    if spec.base_config is not None:
        given = Path(spec.base_config).expanduser()
        candidates = [given] if given.is_absolute() else [path.parent / given, Path.cwd() / given]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ConfigError(f"{source}: base_config {spec.base_config!r} not found (looked at "
                              f"{', '.join(str(c) for c in candidates)}).")
        try:
            base = load_config(found)
        except ConfigError as err:
            raise ConfigError(f"{source}: base_config: {err}") from None
    return spec, base.override(spec.base, source=f"{source}: base")
