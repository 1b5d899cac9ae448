"""Concept-erasure baselines hosted on SafetyDPO's data, models, classifiers and report.

Closed-form weight edits (UCE) are registered classes in ``BASELINES``, one module each, imported
on package import; ESD-u is a LightningModule trained by ``safetydpo fit``
(``safetydpo.baselines.esd.ESDModule``); SLD is a generation option of evaluation
(``models[].sld``, ``safetydpo.evaluation.sld``). See docs/baselines.md.
"""

import importlib
import pkgutil

from safetydpo.baselines.base import BASELINES, BaselineError, WeightEdit, check_family

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["BASELINES", "BaselineError", "WeightEdit", "check_family"]
