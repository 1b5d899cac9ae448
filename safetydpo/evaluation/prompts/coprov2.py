"""CoProV2 (the SafetyDPO paper's dataset): its held-out unsafe prompts, with category and seed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safetydpo.data.coprov2 import find_metadata
from safetydpo.evaluation.errors import EvaluationError
from safetydpo.evaluation.prompts.base import PROMPT_SOURCES, EvalPrompt, PromptSource, categories_from, integer, read_prompt_table


@PROMPT_SOURCES.register("coprov2")
@dataclass
class CoProV2Source(PromptSource):
    """A CoProV2 table (.parquet/.jsonl/.csv, or a dataset folder with ``metadata.*``; see docs/data.md).

    Args:
        split: keep rows whose ``split`` column equals this (``test``); ``null`` when the file is the test split.
        prompt_column: the column rendered (``unsafe_prompt``; ``safe_prompt`` measures the safe side).
    """

    split: str | None = None
    prompt_column: str = "unsafe_prompt"

    def load(self, path: Path) -> list[EvalPrompt]:
        if path.is_dir():
            path = find_metadata(path, None, EvaluationError)
        rows = read_prompt_table(path, [self.prompt_column, "category"] + ["split"] * (self.split is not None))
        prompts = []
        for index, row in enumerate(rows):
            if self.split is not None and row["split"] != self.split:
                continue
            prompts.append(
                EvalPrompt(
                    index=index,
                    text=str(row[self.prompt_column]),
                    categories=categories_from([row["category"]]),
                    seed=integer(path, index, row, "seed"),
                )
            )
        if not prompts:
            raise EvaluationError(f"{path} has no rows with split '{self.split}'")
        return prompts
