"""What every prompt source yields, and the table reading they share."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from safetydpo.data.coprov2 import read_table, require_values
from safetydpo.data.taxonomy import normalize_category
from safetydpo.evaluation.errors import EvaluationError
from safetydpo.registry import Registry


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt to render: its row in the source file (a stable id), text, categories and any per-prompt settings.

    ``seed`` is the first image's seed (image ``k`` uses ``seed + k``); ``None`` fields fall back
    to the generation settings of the run.
    """

    index: int
    text: str
    categories: tuple[str, ...] = ()
    seed: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None


class PromptSource(ABC):
    """Reads one benchmark's file format; options are the subclass's dataclass fields (``options:`` in YAML)."""

    registry_name: ClassVar[str]

    @abstractmethod
    def load(self, path: Path) -> list[EvalPrompt]:
        """All prompts of the file, in file order."""


PROMPT_SOURCES: Registry[PromptSource] = Registry("prompt source")


def read_prompt_table(path: Path, required: Sequence[str], filled: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Rows of a .csv, .jsonl or .parquet prompt file (the CoProV2 table reader), errors as EvaluationError.

    ``required`` columns must exist; those in ``filled`` (default: all) must hold a value in every row.
    """
    return read_table(path, required, filled=filled, what="prompt file", error=EvaluationError)


def read_prompt_columns(
    path: Path,
    aliases: Mapping[str, Sequence[str]],
    columns: Mapping[str, str],
    required: Sequence[str],
    filled: Sequence[str] = (),
) -> tuple[list[dict[str, Any]], dict[str, str | None]]:
    """Rows of a prompt file and, for each of the source's column names, the file's column that holds it.

    Prompt files circulate with other headers (ESD's copy of I2P says ``evaluation_seed`` for
    ``sd_seed``): a name is found under itself, then under its known ``aliases``; ``columns``
    (the ``columns:`` option, ours -> theirs) names it explicitly. ``required`` names must be found,
    ``filled`` ones must hold a value in every row. Absent optional names map to ``None``.
    """
    if not isinstance(columns, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in columns.items()):
        raise EvaluationError(f"{path}: options.columns must map column names to column names, got {columns!r}")
    unknown = sorted(set(columns) - set(aliases))
    if unknown:
        raise EvaluationError(f"{path}: options.columns key '{unknown[0]}' is not one of {', '.join(aliases)}")
    rows = read_prompt_table(path, [])
    present = {key for row in rows for key in row}
    names = {
        ours: next((c for c in ([columns[ours]] if ours in columns else [ours, *known]) if c in present), None)
        for ours, known in aliases.items()
    }
    missing = [ours for ours in required if names[ours] is None]
    if missing:
        wanted = ", ".join(f"{ours} (or {columns[ours]})" if ours in columns else " or ".join([ours, *aliases[ours]]) for ours in missing)
        raise EvaluationError(f"{path} is missing column(s) {wanted}; name yours with options.columns {{{missing[0]}: NAME}}")
    for index, row in enumerate(rows):
        require_values(row, [names[ours] for ours in filled], f"{path} row {index}", EvaluationError)
    return rows, names


def number(path: Path, index: int, row: Mapping[str, Any], column: str) -> float | None:
    """A float from a table cell; an absent or empty cell or NaN (pandas-written CSVs) is ``None``."""
    value = row.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise EvaluationError(f"{path} row {index}: column {column} holds {value!r}, not a number") from None
    return None if math.isnan(result) else result


def integer(path: Path, index: int, row: Mapping[str, Any], column: str) -> int | None:
    """An integer cell (seeds, sizes); CSV readers may have written them as floats (``1234.0``)."""
    value = number(path, index, row, column)
    return None if value is None else int(value)


def categories_from(value: Any) -> tuple[str, ...]:
    """Canonical categories from a comma-separated cell (I2P style) or a list."""
    items = value if isinstance(value, (list, tuple)) else str(value or "").split(",")
    return tuple(dict.fromkeys(normalize_category(item) for item in items if str(item).strip()))


def load_prompt_set(
    source: str, path: str | Path, options: dict[str, Any], categories: Sequence[str] | None, limit: int | None, owner: str
) -> list[EvalPrompt]:
    """Read ``path`` with the named source, keep prompts in any of ``categories``, then the first ``limit``."""
    try:
        source_class = PROMPT_SOURCES.get(source)
    except ValueError as err:
        raise EvaluationError(f"{owner}: {err}") from None
    try:
        reader = source_class(**options)
    except TypeError as err:
        valid = ", ".join(f.name for f in fields(source_class)) or "none"
        raise EvaluationError(f"{owner}.options: {err}; valid options for '{source}': {valid}") from None
    prompts = reader.load(Path(path).expanduser())
    if categories:
        wanted = {normalize_category(name) for name in categories}
        present = sorted({c for prompt in prompts for c in prompt.categories})
        prompts = [prompt for prompt in prompts if wanted & set(prompt.categories)]
        if not prompts:
            raise EvaluationError(
                f"{owner}: no prompt of {path} is in {sorted(wanted)}; categories present: {', '.join(present) or 'none'}"
            )
    if not prompts:
        raise EvaluationError(f"{owner}: {path} holds no prompts")
    return prompts[:limit] if limit is not None else prompts
