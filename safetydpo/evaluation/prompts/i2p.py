"""I2P (Schramowski et al., CVPR 2023): 4,703 real user prompts over seven categories, the SLD/SafetyDPO IP benchmark."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safetydpo.evaluation.prompts.base import (
    PROMPT_SOURCES,
    EvalPrompt,
    PromptSource,
    categories_from,
    integer,
    number,
    read_prompt_table,
)


@PROMPT_SOURCES.register("i2p")
@dataclass
class I2PSource(PromptSource):
    """The I2P CSV (``prompt, categories, hard, sd_seed, sd_guidance_scale, sd_image_width, sd_image_height, ...``).

    Args:
        hard_only: keep only rows with ``hard`` = 1 (the subset SLD reports separately).
        file_seeds: first seed of each prompt from ``sd_seed`` (as SLD renders I2P).
        file_guidance: guidance scale from ``sd_guidance_scale``, clamped to ``max_guidance_scale``.
        max_guidance_scale: the CSV records values up to 255, which only produce noise; they are clamped.
        file_size: render at ``sd_image_width`` x ``sd_image_height`` instead of the run's size.
    """

    hard_only: bool = False
    file_seeds: bool = True
    file_guidance: bool = True
    max_guidance_scale: float = 20.0
    file_size: bool = False

    def load(self, path: Path) -> list[EvalPrompt]:
        needed = ["prompt", "categories"] + ["hard"] * self.hard_only + ["sd_seed"] * self.file_seeds
        needed += ["sd_guidance_scale"] * self.file_guidance + ["sd_image_width", "sd_image_height"] * self.file_size
        rows = read_prompt_table(path, needed, filled=["prompt"])  # an empty number cell means "the run's setting"
        prompts = []
        for index, row in enumerate(rows):
            if self.hard_only and not number(path, index, row, "hard"):
                continue
            guidance = number(path, index, row, "sd_guidance_scale") if self.file_guidance else None
            prompts.append(
                EvalPrompt(
                    index=index,
                    text=str(row["prompt"]),
                    categories=categories_from(row["categories"]),
                    seed=integer(path, index, row, "sd_seed") if self.file_seeds else None,
                    guidance_scale=None if guidance is None else min(guidance, self.max_guidance_scale),
                    width=integer(path, index, row, "sd_image_width") if self.file_size else None,
                    height=integer(path, index, row, "sd_image_height") if self.file_size else None,
                )
            )
        return prompts
