"""Name -> class registries, so a new loss, merge method, classifier or generator is one registered class.

Classes outside the generic packages (ToyWorld's, or a user's own package) register themselves when
their module is imported. Such modules are announced as Python entry points in the group
``safetydpo.plugins`` (see ``pyproject.toml``); a registry imports them the first time a name is
looked up that it does not know, so generic code never imports a plugin by name and a YAML file can
only ever build classes that some installed package registered.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from jsonargparse import set_parsing_settings

T = TypeVar("T")

#: Entry-point group whose modules register plugin classes (ToyWorld's generator, classifier, features).
PLUGIN_GROUP = "safetydpo.plugins"
_plugins_loaded = False

#: Packages a config may name in a ``class_path`` (or a callable/type value) without further ado: this
#: project, Lightning's callbacks, loggers, plugins and strategies, and torch's optimizers and schedulers.
TRUSTED_IMPORTS: tuple[str, ...] = ("safetydpo", "lightning.pytorch", "lightning.fabric", "torch.optim")
#: Environment variable naming more trusted packages, comma-separated (``mypkg,lab.callbacks``).
TRUSTED_IMPORTS_ENV = "SAFETYDPO_TRUSTED_IMPORTS"


class UntrustedImportError(ValueError):
    """``SAFETYDPO_TRUSTED_IMPORTS`` holds something that is not a dotted module name."""


def trusted_imports() -> list[str]:
    """Every package a config may import from: ``TRUSTED_IMPORTS``, the top-level packages of installed
    ``safetydpo.plugins`` entry points (trusted by installation) and those ``SAFETYDPO_TRUSTED_IMPORTS`` names."""
    plugins = [point.value.split(":")[0].split(".")[0] for point in entry_points(group=PLUGIN_GROUP)]
    named = [entry.strip() for entry in os.environ.get(TRUSTED_IMPORTS_ENV, "").split(",") if entry.strip()]
    for entry in named:
        if not all(part.isidentifier() for part in entry.split(".")) or entry.split(".")[0] == "jsonargparse":
            raise UntrustedImportError(f"{TRUSTED_IMPORTS_ENV}: '{entry}' is not a dotted package name such as mypkg or mypkg.callbacks")
    return sorted({*TRUSTED_IMPORTS, *plugins, *named})


def restrict_config_imports() -> None:
    """Make jsonargparse refuse to import anything outside :func:`trusted_imports` for a config value.

    jsonargparse imports whatever a ``class_path``, a callable or a type given in a YAML, on the
    command line or in a checkpoint's hyper-parameters names, and instantiating is running: a shared
    config with ``class_path: os.system`` would run a shell command. Registries never import (see
    :meth:`Registry.get`); this covers what LightningCLI resolves itself (model, data, callbacks,
    loggers, plugins). Idempotent; the policy is process-wide, as jsonargparse's settings are.
    """
    set_parsing_settings(import_path_denylist=["*"], import_path_allowlist=trusted_imports())


def load_plugins() -> None:
    """Import every module announced in the ``safetydpo.plugins`` entry-point group (once)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for point in entry_points(group=PLUGIN_GROUP):
        importlib.import_module(point.value)


class Registry(Generic[T]):
    """Maps short names (used in YAML and on the command line) to classes of one kind."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator that makes ``name`` resolve to the decorated class."""

        def decorator(cls: type[T]) -> type[T]:
            if name in self._classes and self._classes[name] is not cls:
                raise ValueError(f"{self.kind} '{name}' is already registered to {self._classes[name].__qualname__}")
            self._classes[name] = cls
            cls.registry_name = name  # type: ignore[attr-defined]
            return cls

        return decorator

    def names(self) -> list[str]:
        """Every registered name, plugins included."""
        load_plugins()
        return sorted(self._classes)

    def classes(self) -> dict[str, type[T]]:
        """Name -> class for every registered name, plugins included."""
        load_plugins()
        return dict(self._classes)

    def get(self, name: str) -> type[T]:
        """The class registered as ``name``, or as the dotted path of a registered class.

        Only registered classes resolve: a dotted path is looked up among them, never imported, so a
        config file cannot make this process import or run arbitrary code.
        """
        if name not in self._classes:
            load_plugins()
        if name in self._classes:
            return self._classes[name]
        for cls in self._classes.values():
            if name == f"{cls.__module__}.{cls.__qualname__}":
                return cls
        raise ValueError(f"unknown {self.kind} '{name}'; valid choices: {', '.join(self.names())}")

    def build(self, spec: str | Mapping[str, Any] | T, **kwargs: Any) -> T:
        """An instance from a name, ``{"name": ..., **args}``, ``{"class_path": ..., "init_args": {...}}`` or an instance.

        ``class_path`` may be a registered name or a registered class's dotted path (as Lightning's
        configs write it). An unknown name is a ``ValueError``, an unknown argument a ``TypeError``, each
        naming the valid choices.
        """
        if isinstance(spec, Mapping):
            spec = dict(spec)
            if "class_path" in spec:
                unknown = sorted(set(spec) - {"class_path", "init_args"})
                if unknown:
                    raise ValueError(f"{self.kind} spec: unknown key(s) {', '.join(unknown)}; valid keys: class_path, init_args")
                name, args = str(spec["class_path"]), dict(spec.get("init_args") or {})
            elif "name" in spec:
                name, args = str(spec.pop("name")), spec
            else:
                raise ValueError(f"{self.kind} spec {spec} has neither 'name' nor 'class_path'")
            return self._instantiate(name, {**args, **kwargs})
        if isinstance(spec, str):
            return self._instantiate(spec, kwargs)
        if kwargs:
            raise ValueError(f"keyword arguments {sorted(kwargs)} only apply when the {self.kind} is given by name")
        return spec

    def _instantiate(self, name: str, args: dict[str, Any]) -> T:
        cls = self.get(name)
        valid = [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
        unknown = sorted(set(args) - set(valid))
        if unknown:  # a TypeError, as Python's own for a wrong keyword, but naming every valid argument
            raise TypeError(
                f"{self.kind} '{name}' got an unexpected keyword argument '{unknown[0]}'; valid arguments: {', '.join(valid) or 'none'}"
            )
        return cls(**args)
