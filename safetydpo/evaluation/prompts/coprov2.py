"""CoProV2 (the SafetyDPO paper's dataset): its held-out unsafe prompts, with categories and seed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetydpo.data.coprov2 import RELEASED_COLUMNS, find_metadata, released_images, row_categories
from safetydpo.evaluation.errors import EvaluationError
from safetydpo.evaluation.prompts.base import PROMPT_SOURCES, EvalPrompt, PromptSource, integer, read_prompt_table

#: Which images of a released table (``prompt,image,category``) each ``prompt_column`` renders:
#: ``u_`` and unprefixed names (the test CSV's ``0000000_0.jpg``) are unsafe prompts, ``s_`` safe ones.
_RELEASED_SIDES = {"unsafe_prompt": ("u", None), "safe_prompt": ("s",)}


@PROMPT_SOURCES.register("coprov2")
@dataclass
class CoProV2Source(PromptSource):
    """A CoProV2 table (.parquet/.jsonl/.csv, or a dataset folder with ``metadata.*``; see docs/data.md), or a
    released CSV as it is (``CoProv2_test.csv``: ``prompt,image,category``, one prompt per image).

    Args:
        split: keep rows whose ``split`` column equals this (``test``); ``null`` when the file is the test split.
        prompt_column: the column rendered (``unsafe_prompt``; ``safe_prompt`` measures the safe side). In a
            released CSV it picks the images instead: ``u_`` and unprefixed ones, or ``s_`` ones.
    """

    split: str | None = None
    prompt_column: str = "unsafe_prompt"

    def load(self, path: Path) -> list[EvalPrompt]:
        if path.is_dir():
            path = find_metadata(path, None, EvaluationError)
        rows = read_prompt_table(path, [], filled=[])
        if self._released(rows):
            prompts = self._released_prompts(rows, path)
        else:
            rows = read_prompt_table(path, [self.prompt_column, "category"] + ["split"] * (self.split is not None))
            prompts = [
                EvalPrompt(
                    index=index,
                    text=str(row[self.prompt_column]),
                    categories=row_categories(row),
                    seed=integer(path, index, row, "seed"),
                )
                for index, row in enumerate(rows)
                if self.split is None or row["split"] == self.split
            ]
        if not prompts:
            raise EvaluationError(f"{path} has no rows with split '{self.split}'" if self.split else f"{path} has no prompts")
        return prompts

    def _released(self, rows: list[dict[str, Any]]) -> bool:
        """The release's layout: its columns and not the ones our tables use for prompts."""
        columns = set(rows[0]) if rows else set()
        return set(RELEASED_COLUMNS) <= columns and self.prompt_column not in columns and self.prompt_column in _RELEASED_SIDES

    def _released_prompts(self, rows: list[dict[str, Any]], path: Path) -> list[EvalPrompt]:
        """One prompt per image (its first row names it), with every category the image is listed under."""
        if self.split is not None:
            raise EvaluationError(f"{path} is a released CoProV2 CSV, which has no split column; set options.split: null")
        sides = _RELEASED_SIDES[self.prompt_column]
        images = released_images(rows, path, EvaluationError)
        return [
            EvalPrompt(index=image["row"], text=image["prompt"], categories=tuple(image["categories"]))
            for image in images
            if image["side"] in sides
        ]
