"""Imports point down: generic packages never reach plugins or applications, merging never reaches training.

Every ``safetydpo/**/*.py`` is parsed with ``ast`` (module-level and function-local imports, absolute
and relative), so a broken rule fails here rather than on an install without ToyWorld.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "safetydpo"
#: Reusable layers: the method and its building blocks (top-level modules such as registry and io too).
GENERIC_PACKAGES = ("data", "evaluation", "merging", "models", "losses", "callbacks", "baselines", "attacks")
#: Layers on top: the embedded ToyWorld (a plugin), the pipeline command and the CLI.
APP_PACKAGES = ("toyworld", "pipeline", "cli")
UPWARD = ("safetydpo.toyworld", "safetydpo.pipeline", "safetydpo.cli")
TRAINING = ("safetydpo.data", "safetydpo.models.expert", "safetydpo.callbacks", "safetydpo.losses")


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. safetydpo.merging.base
    target: str  # what it imports, as a dotted name, e.g. safetydpo.registry.Registry
    line: int

    def __str__(self) -> str:
        return f"{self.module} imports {self.target} (line {self.line})"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_in(source: str, module: str, is_package: bool) -> list[Import]:
    """Every import in ``source`` wherever it sits; ``from a import b`` counts as importing ``a.b``."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [Import(module, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            source_module = ".".join([*base, *([node.module] if node.module else [])])
            found += [Import(module, f"{source_module}.{alias.name}", node.lineno) for alias in node.names]
    return found


def imports_of(path: Path) -> list[Import]:
    return imports_in(path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py")


def is_under(target: str, prefixes: tuple[str, ...]) -> bool:
    return any(target == prefix or target.startswith(f"{prefix}.") for prefix in prefixes)


def files_in(*packages: str) -> list[Path]:
    return sorted(file for package in packages for file in (PACKAGE / package).rglob("*.py"))


def generic_files() -> list[Path]:
    """The generic packages and every top-level module (registry, io, seeding, devices, checkpointing, ...)."""
    return files_in(*GENERIC_PACKAGES) + sorted(PACKAGE.glob("*.py"))


def offenders(files: list[Path], allowed: tuple[str, ...] = (), forbidden: tuple[str, ...] = ()) -> list[str]:
    """Imports of ``forbidden`` names, or of project names outside ``allowed`` when that is given."""
    return [
        str(imp)
        for file in files
        for imp in imports_of(file)
        if is_under(imp.target, forbidden) or (allowed and is_under(imp.target, ("safetydpo",)) and not is_under(imp.target, allowed))
    ]


def test_every_package_is_classified() -> None:
    """A new package must be declared generic or application, so the rules below cover it."""
    packages = {path.relative_to(PACKAGE).parts[0] for path in PACKAGE.glob("*/**/*.py")}
    assert packages - {*GENERIC_PACKAGES, *APP_PACKAGES} == set()


def test_relative_and_function_local_imports_are_resolved() -> None:
    source = "from . import sibling\nfrom ..registry import Registry\n\n\ndef f():\n    import safetydpo.toyworld.judge\n"
    targets = [imp.target for imp in imports_in(source, "safetydpo.data.builder.probe", is_package=False)]
    assert targets == ["safetydpo.data.builder.sibling", "safetydpo.data.registry.Registry", "safetydpo.toyworld.judge"]
    assert [imp.target for imp in imports_in("from .base import X\n", "safetydpo.losses", is_package=True)] == ["safetydpo.losses.base.X"]


def assert_none(found: list[str], rule: str) -> None:
    assert not found, f"{rule}:\n" + "\n".join(found)


def test_generic_modules_never_import_plugins_pipeline_or_cli() -> None:
    assert_none(offenders(generic_files(), forbidden=UPWARD), f"generic modules import {', '.join(UPWARD)}")


def test_merging_never_imports_training_code() -> None:
    assert_none(offenders(files_in("merging"), forbidden=TRAINING), f"merging imports {', '.join(TRAINING)}")


def test_losses_import_only_the_registry_and_themselves() -> None:
    allowed = ("safetydpo.registry", "safetydpo.losses")
    assert_none(offenders(files_in("losses"), allowed=allowed), f"losses import project modules other than {', '.join(allowed)}")


def test_generic_modules_name_toyworld_in_no_string() -> None:
    """Catches ``importlib.import_module("safetydpo.toyworld...")`` and the like, which no import statement shows."""
    found = [
        f"{module_name(file)} line {node.lineno}: {node.value!r}"
        for file in generic_files()
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "safetydpo.toyworld" in node.value
    ]
    assert_none(found, "generic modules name safetydpo.toyworld in a string")


def test_registries_find_toyworld_through_the_entry_point_alone() -> None:
    """A fresh process that imports only generic packages: ToyWorld is loaded by the first lookup, not by them."""
    script = """
import json, sys
from safetydpo.data.builder.generators import GENERATORS
from safetydpo.evaluation.classifiers import CLASSIFIERS
from safetydpo.evaluation.fid import FEATURE_EXTRACTORS
before = sorted(m for m in sys.modules if m.startswith("safetydpo.toyworld"))
registries = {"generators": GENERATORS, "classifiers": CLASSIFIERS, "feature_extractors": FEATURE_EXTRACTORS}
names = {kind: registry.names() for kind, registry in registries.items()}
built = [type(GENERATORS.build("toyworld")).__name__, type(CLASSIFIERS.build("toyworld")).__name__]
print(json.dumps({"before": before, "names": names, "built": built}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["before"] == []
    assert all("toyworld" in names for names in report["names"].values()), report["names"]
    assert report["built"] == ["ToyWorldGenerator", "ToyWorldClassifier"]
