"""COCO captions (the usual 30k-prompt FID / CLIPScore set): ``image_id, prompt, evaluation_seed``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from safetydpo.evaluation.prompts.base import PROMPT_SOURCES, EvalPrompt, PromptSource, integer, read_prompt_columns

#: The COCO-30k prompt file's column names (ESD's ``coco_30k.csv``: ``image_id, source, prompt, evaluation_seed``).
COCO_COLUMNS: dict[str, tuple[str, ...]] = {"prompt": (), "evaluation_seed": ()}


@PROMPT_SOURCES.register("coco")
@dataclass
class CocoSource(PromptSource):
    """A COCO prompts CSV; quality metrics only, so prompts carry no category.

    Args:
        file_seeds: first seed of each prompt from ``evaluation_seed``.
        columns: the file's name for ``prompt`` or ``evaluation_seed`` (``{prompt: caption}``).
    """

    file_seeds: bool = True
    columns: dict[str, str] = field(default_factory=dict)

    def load(self, path: Path) -> list[EvalPrompt]:
        needed = ["prompt"] + ["evaluation_seed"] * self.file_seeds
        rows, names = read_prompt_columns(path, COCO_COLUMNS, self.columns, needed, filled=["prompt"])
        return [
            EvalPrompt(
                index=index,
                text=str(row[names["prompt"]]),
                seed=integer(path, index, row, names["evaluation_seed"]) if self.file_seeds else None,
            )
            for index, row in enumerate(rows)
        ]
