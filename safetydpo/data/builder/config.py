"""The build config (``configs/data.yaml``): strict YAML -> dataclasses, one-line errors naming the key."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetydpo.data.builder.errors import BuildError
from safetydpo.data.builder.generators import generator_class
from safetydpo.distributed import DistributedConfig
from safetydpo.io import read_yaml
from safetydpo.sampling import SpeedConfig


@dataclass
class PairsConfig:
    """How many pairs per concept, and what counts as a valid one (see docs/data_builder.md)."""

    per_concept: int = 8
    attempts_per_pair: int = 4
    batch_size: int = 8
    min_similarity: float = 0.5
    max_words: int = 60


@dataclass
class RenderConfig:
    """The model being aligned and the sampling settings both prompts of a pair share."""

    base_model: str
    variant: str | None = None
    steps: int = 50
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    height: int | None = None
    width: int | None = None
    scheduler: str | None = None
    seed: int = 0
    batch_size: int = 4
    shard_size: int = 256
    dtype: str = "auto"
    device: str = "auto"
    speed: SpeedConfig = field(default_factory=SpeedConfig)


@dataclass
class BuildConfig:
    """A whole build: where to write, where pairs come from, how they are rendered."""

    output: str
    render: RenderConfig
    taxonomy: str | None = None
    pairs_from: str | None = None
    generator: dict[str, Any] = field(default_factory=lambda: {"name": "template"})
    pairs: PairsConfig = field(default_factory=PairsConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    #: Keys that change how fast a build runs, not what it writes; a resumed build may change them.
    OPERATIONAL_KEYS: typing.ClassVar[tuple[str, ...]] = ("output", "render.batch_size", "render.device", "render.speed", "distributed")

    def fingerprint(self) -> dict[str, Any]:
        """The config minus operational keys: a resumed build must match it exactly."""
        data = dataclasses.asdict(self)
        for key in self.OPERATIONAL_KEYS:
            *parents, leaf = key.split(".")
            section = data
            for parent in parents:
                section = section[parent]
            section.pop(leaf)
        return data


def _matches(value: Any, hint: Any) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(hint))
    origin = typing.get_origin(hint) or hint
    if hint is type(None):
        return value is None
    if origin is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin)


def _from_mapping(cls: type, data: Any, prefix: str, source: Path) -> Any:
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(data, dict):
        raise BuildError(f"{source}: {where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise BuildError(f"{source}: unknown key '{prefix}{key}'; valid keys in {where}: {', '.join(fields)}")
    values = {}
    for name, spec in fields.items():
        if name not in data:
            if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise BuildError(f"{source}: missing key '{prefix}{name}'")
            continue
        value, hint = data[name], hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _from_mapping(hint, value, f"{prefix}{name}.", source)
        elif _matches(value, hint):
            values[name] = value
        else:
            raise BuildError(f"{source}: '{prefix}{name}' must be {getattr(hint, '__name__', hint)}, got {value!r}")
    return cls(**values)


def _check_generator_types(cls: type, spec: dict[str, Any], source: Path) -> None:
    """Each ``generator.*`` value against its constructor annotation, so ``timeout: soon`` fails here, not mid-build."""
    hints = typing.get_type_hints(cls.__init__)
    for key, value in spec.items():
        if key in hints and not _matches(value, hints[key]):
            raise BuildError(f"{source}: 'generator.{key}' must be {getattr(hints[key], '__name__', hints[key])}, got {value!r}")


def _check_values(config: BuildConfig, source: Path) -> None:
    if (config.taxonomy is None) == (config.pairs_from is None):
        raise BuildError(
            f"{source}: set exactly one of 'taxonomy' (generate pairs) and 'pairs_from' (a table written by `safetydpo data import`)"
        )
    positive = {
        "pairs.per_concept": config.pairs.per_concept,
        "pairs.attempts_per_pair": config.pairs.attempts_per_pair,
        "pairs.batch_size": config.pairs.batch_size,
        "pairs.max_words": config.pairs.max_words,
        "render.steps": config.render.steps,
        "render.batch_size": config.render.batch_size,
        "render.shard_size": config.render.shard_size,
    }
    for key, value in positive.items():
        if value < 1:
            raise BuildError(f"{source}: '{key}' must be at least 1, got {value}")
    config.render.speed.check(f"{source}: render.speed", BuildError)
    config.distributed.check(f"{source}: distributed", BuildError)
    if config.distributed.world_size > 1 and config.render.device != "auto":
        raise BuildError(
            f"{source}: 'render.device' must be auto with distributed ranks (each renders on its own device); "
            "set distributed.accelerator instead"
        )
    if not 0.0 <= config.pairs.min_similarity <= 1.0:
        raise BuildError(f"{source}: 'pairs.min_similarity' must be in [0, 1], got {config.pairs.min_similarity}")
    if config.taxonomy is not None:
        _check_generator_types(generator_class(config.generator), config.generator, source)
    if not (Path(config.render.base_model).expanduser() / "model_index.json").is_file():
        base_model = config.render.base_model
        raise BuildError(f"{source}: render.base_model '{base_model}' is not a diffusers pipeline folder (no model_index.json)")


def load_build_config(path: str | Path) -> BuildConfig:
    """Read and check a build config; relative paths in it are relative to the working directory."""
    path = Path(path)
    return build_config_from_dict(read_yaml(path, "config file", BuildError), path)


def build_config_from_dict(data: Any, source: str | Path) -> BuildConfig:
    """Check an in-memory build config (a file's content plus a pipeline's changes); errors name ``source``."""
    config = _from_mapping(BuildConfig, data, "", Path(source))
    _check_values(config, Path(source))
    return config
