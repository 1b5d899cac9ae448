"""Red-teaming attacks: each is one registered class in one module of this package.

Every module here is imported on package import, so a new file that registers a class with
``@ATTACKS.register("name")`` is all it takes to make ``attacks: [{name: ...}]`` work in YAML.
"""

import importlib
import pkgutil

from safetydpo.attacks.base import ATTACKS, PARTS, Attack, AttackError, AttackOutcome, AttackTarget, build_attack

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ATTACKS", "PARTS", "Attack", "AttackError", "AttackOutcome", "AttackTarget", "build_attack"]
