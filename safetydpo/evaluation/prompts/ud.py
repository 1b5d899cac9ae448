"""Unsafe Diffusion (Qu et al., CCS 2023) prompt lists: plain text files or CSVs of prompts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safetydpo.evaluation.errors import EvaluationError
from safetydpo.evaluation.prompts.base import (
    PROMPT_SOURCES,
    EvalPrompt,
    PromptSource,
    categories_from,
    read_prompt_table,
)


@PROMPT_SOURCES.register("ud")
@dataclass
class UnsafeDiffusionSource(PromptSource):
    """A ``.txt`` list (one prompt per line) or a table with a ``prompt`` column and optional ``categories``.

    Args:
        category: category given to every prompt (UD ships one list per source, not per-prompt labels).
    """

    category: str | None = None

    def load(self, path: Path) -> list[EvalPrompt]:
        if path.suffix == ".txt":
            if not path.is_file():
                raise EvaluationError(f"prompt file {path} does not exist")
            lines = path.read_text(encoding="utf-8").splitlines()
            rows = [(index, line.strip(), None) for index, line in enumerate(lines) if line.strip()]
        else:
            table = read_prompt_table(path, ["prompt"])
            rows = [(index, str(row["prompt"]), row.get("categories")) for index, row in enumerate(table)]
        fixed = categories_from([self.category] if self.category else [])
        return [EvalPrompt(index=index, text=text, categories=fixed or categories_from(cats)) for index, text, cats in rows]
