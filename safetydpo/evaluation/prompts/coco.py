"""COCO captions (the usual 30k-prompt FID / CLIPScore set): ``image_id, prompt, evaluation_seed``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safetydpo.evaluation.prompts.base import PROMPT_SOURCES, EvalPrompt, PromptSource, integer, read_prompt_table


@PROMPT_SOURCES.register("coco")
@dataclass
class CocoSource(PromptSource):
    """A COCO prompts CSV; quality metrics only, so prompts carry no category.

    Args:
        file_seeds: first seed of each prompt from ``evaluation_seed``.
    """

    file_seeds: bool = True

    def load(self, path: Path) -> list[EvalPrompt]:
        rows = read_prompt_table(path, ["prompt"] + ["evaluation_seed"] * self.file_seeds, filled=["prompt"])
        return [
            EvalPrompt(
                index=index,
                text=str(row["prompt"]),
                seed=integer(path, index, row, "evaluation_seed") if self.file_seeds else None,
            )
            for index, row in enumerate(rows)
        ]
