"""Every config key and every registered name is documented, and the lists of names cannot drift apart."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import re
import typing
from pathlib import Path

import pytest
import yaml

from safetydpo.cli.main import registered_names
from safetydpo.cli.run import pipeline_parser
from safetydpo.data import CoProV2DataModule
from safetydpo.data.builder.config import BuildConfig
from safetydpo.losses import LOSSES
from safetydpo.models import DPOExpertModule, LoraSettings
from safetydpo.pipeline.config import PipelineConfig

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def documented_keys(path: Path) -> set[str]:
    """The backticked keys in the first column of a Markdown file's tables (``a``, ``a.b``; ``x`, `y`` cells too)."""
    keys = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("| `"):
            keys.update(re.findall(r"`([^`]+)`", line.split("|")[1]))
    return keys


def dataclass_keys(cls: type, prefix: str = "") -> set[str]:
    """Dotted keys of a (nested) config dataclass: a nested dataclass contributes its own keys, not itself."""
    keys = set()
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        nested = [arg for arg in (hints[field.name], *typing.get_args(hints[field.name])) if dataclasses.is_dataclass(arg)]
        if nested:
            keys |= dataclass_keys(nested[0], f"{prefix}{field.name}.")
        else:
            keys.add(f"{prefix}{field.name}")
    return keys


def init_args(cls: type) -> set[str]:
    return {name for name in inspect.signature(cls.__init__).parameters if name != "self"}


def test_every_pipeline_key_is_in_docs_and_help() -> None:
    keys = dataclass_keys(PipelineConfig)
    # Import settings are one table row (`data.table`), listed by name in its meaning.
    table_keys = {key for key in keys if key.startswith("data.table.")}
    assert keys - table_keys <= documented_keys(DOCS / "pipeline.md") | {"data.table"}, sorted(keys - documented_keys(DOCS / "pipeline.md"))
    text = (DOCS / "pipeline.md").read_text(encoding="utf-8")
    assert all(f"`{key.rsplit('.', 1)[1]}`" in text for key in table_keys)
    help_text = pipeline_parser("safetydpo run", "").format_help()
    table_help = io.StringIO()
    with contextlib.redirect_stdout(table_help), pytest.raises(SystemExit):  # the optional section's own help
        pipeline_parser("safetydpo run", "").parse_args(["--data.table.help", "ImportConfig"])
    help_text += table_help.getvalue()
    for key in keys:
        assert f"--{key} " in help_text or f"--{key}\n" in help_text or f"--{key}," in help_text, key


def test_every_expert_and_data_module_key_is_in_configuration_docs() -> None:
    documented = documented_keys(DOCS / "configuration.md")
    wanted = (init_args(DPOExpertModule) - {"lora"}) | {f"lora.{f.name}" for f in dataclasses.fields(LoraSettings)} | init_args(CoProV2DataModule)
    assert wanted <= documented, sorted(wanted - documented)


def test_every_build_key_is_in_data_builder_docs() -> None:
    documented = documented_keys(DOCS / "data_builder.md")
    assert dataclass_keys(BuildConfig) <= documented, sorted(dataclass_keys(BuildConfig) - documented)


@pytest.mark.parametrize("kind", sorted(registered_names()))
def test_every_registered_name_is_documented(kind: str) -> None:
    docs = " ".join(path.read_text(encoding="utf-8") for path in DOCS.glob("*.md"))
    missing = [name for name in registered_names()[kind] if f"`{name}`" not in docs]
    assert not missing, f"{kind} {missing} are not named in docs/"


def test_loss_lists_name_every_registered_loss() -> None:
    """The loss names written out for readers (module docstring, expert.yaml, configuration.md) are all of them."""
    expert_yaml = (REPO / "configs" / "expert.yaml").read_text(encoding="utf-8")
    comment = next(line for line in expert_yaml.splitlines() if line.strip().startswith("loss:"))
    configuration = next(line for line in (DOCS / "configuration.md").read_text().splitlines() if line.startswith("| `loss`"))
    docstring = next(line for line in (DPOExpertModule.__doc__ or "").splitlines() if line.strip().startswith("loss:"))
    for where, text in (("configs/expert.yaml", comment), ("docs/configuration.md", configuration), ("DPOExpertModule", docstring)):
        missing = [name for name in LOSSES.names() if not re.search(rf"\b{name}\b", text)]
        assert not missing, f"{where} does not list the registered loss(es) {missing}"


def test_main_help_lists_registered_names() -> None:
    from safetydpo.cli.main import help_text

    text = help_text()
    for kind, names in registered_names().items():
        assert f"{kind}: {', '.join(names)}" in text


def test_help_lists_every_registry_in_the_package() -> None:
    """A module-level ``NAME: Registry[...] = Registry(...)`` anywhere in safetydpo/ is one ``safetydpo --help`` shows."""
    import importlib

    from safetydpo.cli.main import registries

    shown = [id(registry) for registry in registries().values()]
    found = []
    for path in sorted((REPO / "safetydpo").rglob("*.py")):
        for name in re.findall(r"^([A-Z_]+): Registry\[.*\] = Registry\(", path.read_text(encoding="utf-8"), re.M):
            module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            found.append(name)
            assert id(getattr(importlib.import_module(module), name)) in shown, f"{module}.{name} is missing from safetydpo.cli.main.registries"
    assert len(found) == len(shown) >= 11, found


def test_shipped_configs_are_valid_yaml_with_comments_naming_their_command() -> None:
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        assert text.startswith("#"), f"{path} starts without a comment saying what it is"
        yaml.safe_load(text)
