"""Preference losses and loss terms: each variant is one registered class in one module of this package.

Every module here is imported on package import, so dropping a new file that registers a class
with ``@LOSSES.register("name")`` is all it takes to make ``loss: name`` (or a ``{name: ...}`` entry
of a ``loss`` list) work in YAML.
"""

import importlib
import pkgutil

from safetydpo.losses.base import (
    LOSSES,
    DenoisingErrors,
    LossOutput,
    LossSpec,
    PreferenceLoss,
    WeightedLoss,
    build_loss,
    build_objective,
    check_finite,
    needs_anchors,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "LOSSES", "DenoisingErrors", "LossOutput", "LossSpec", "PreferenceLoss", "WeightedLoss",
    "build_loss", "build_objective", "check_finite", "needs_anchors",
]
