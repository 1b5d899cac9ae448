"""Every key of the evaluation config is documented in docs/evaluation.md and in ``safetydpo evaluate --help``."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import docstring_parser

from safetydpo.cli.evaluate import evaluate_parser
from safetydpo.evaluation.config import EvalConfig

DOCS = Path(__file__).resolve().parents[1] / "docs" / "evaluation.md"


def sections(cls: type) -> list[type]:
    """``cls`` and every dataclass below it (nested sections and list entries)."""
    found = [cls]
    for hint in typing.get_type_hints(cls).values():
        for candidate in (hint, *typing.get_args(hint)):
            if dataclasses.is_dataclass(candidate) and candidate not in found:
                found += [s for s in sections(typing.cast(type, candidate)) if s not in found]
    return found


def config_keys(cls: type, prefix: str = "") -> dict[str, str]:
    """Dotted key -> the section it belongs to, for every leaf field below ``cls`` (list entries as ``models[].lora``)."""
    keys = {}
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        entry = typing.get_args(hint)[0] if typing.get_origin(hint) is list else None
        if dataclasses.is_dataclass(hint):
            keys |= config_keys(typing.cast(type, hint), f"{prefix}{field.name}.")
        elif dataclasses.is_dataclass(entry):
            keys |= config_keys(typing.cast(type, entry), f"{prefix}{field.name}[].")
        else:
            keys[f"{prefix}{field.name}"] = prefix.rstrip(".")
    return keys


def documented_keys() -> set[str]:
    """The backticked keys in the first column of the doc's tables."""
    keys = set()
    for line in DOCS.read_text(encoding="utf-8").splitlines():
        if line.startswith("| `"):
            keys.update(re.findall(r"`([^`]+)`", line.split("|")[1]))
    return keys


def test_config_keys_cover_nested_sections_and_list_entries() -> None:
    keys = config_keys(EvalConfig)
    wanted = {"output_dir", "generation.num_inference_steps", "fid.clip.pretrained", "models[].base_model", "prompt_sets[].metrics"}
    assert wanted <= set(keys)
    assert "generation" not in keys and "models" not in keys and "imports" not in keys


def test_every_field_has_an_attribute_docstring() -> None:
    for cls in sections(EvalConfig):
        described = {p.arg_name for p in docstring_parser.parse_from_object(cls).params if p.description}
        missing = [field.name for field in dataclasses.fields(cls) if field.name not in described]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def test_every_evaluation_key_is_in_the_docs() -> None:
    documented = documented_keys()

    def is_documented(key: str, section: str) -> bool:
        # A section used in several places (the `clip:` blocks) has one table of its own keys plus a row per use.
        return key in documented or (section in documented and key.removeprefix(f"{section}.") in documented)

    missing = [key for key, section in config_keys(EvalConfig).items() if not is_documented(key, section)]
    assert not missing, f"docs/evaluation.md has no table row for {missing}"


def test_every_evaluation_key_is_in_the_help() -> None:
    help_text = evaluate_parser().format_help()
    missing = [key for key in config_keys(EvalConfig) if not re.search(rf"--{re.escape(key)}[ ,\n]", help_text)]
    assert not missing, f"safetydpo evaluate --help does not show {missing}"
    for line in ("Sampler steps of the pipeline's own scheduler. (type: int, default: 50)", "(type: str | null, default: null)"):
        assert line in " ".join(help_text.split()), "each key shows its docstring, type and default"
