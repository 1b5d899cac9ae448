"""I2P (Schramowski et al., CVPR 2023): 4,703 real user prompts over seven categories, the SLD/SafetyDPO IP benchmark."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from safetydpo.evaluation.prompts.base import (
    PROMPT_SOURCES,
    EvalPrompt,
    PromptSource,
    categories_from,
    integer,
    number,
    read_prompt_columns,
)

#: I2P's column names and the other names circulating copies use (ESD's ``unsafe-prompts4703.csv``).
I2P_COLUMNS: dict[str, tuple[str, ...]] = {
    "prompt": (),
    "categories": (),
    "hard": (),
    "sd_seed": ("evaluation_seed",),
    "sd_guidance_scale": ("evaluation_guidance",),
    "sd_image_width": (),
    "sd_image_height": (),
}


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
        columns: the file's name for any of I2P's columns (``{sd_seed: my_seed}``); ``evaluation_seed`` and
            ``evaluation_guidance`` (ESD's copy) are recognised without it.
    """

    hard_only: bool = False
    file_seeds: bool = True
    file_guidance: bool = True
    max_guidance_scale: float = 20.0
    file_size: bool = False
    columns: dict[str, str] = field(default_factory=dict)

    def load(self, path: Path) -> list[EvalPrompt]:
        needed = ["prompt", "categories"] + ["hard"] * self.hard_only + ["sd_seed"] * self.file_seeds
        needed += ["sd_guidance_scale"] * self.file_guidance + ["sd_image_width", "sd_image_height"] * self.file_size
        # an empty number cell means "the run's setting"
        rows, names = read_prompt_columns(path, I2P_COLUMNS, self.columns, needed, filled=["prompt"])
        prompts = []
        for index, row in enumerate(rows):
            if self.hard_only and not number(path, index, row, names["hard"]):
                continue
            guidance = number(path, index, row, names["sd_guidance_scale"]) if self.file_guidance else None
            prompts.append(
                EvalPrompt(
                    index=index,
                    text=str(row[names["prompt"]]),
                    categories=categories_from(row[names["categories"]]),
                    seed=integer(path, index, row, names["sd_seed"]) if self.file_seeds else None,
                    guidance_scale=None if guidance is None else min(guidance, self.max_guidance_scale),
                    width=integer(path, index, row, names["sd_image_width"]) if self.file_size else None,
                    height=integer(path, index, row, names["sd_image_height"]) if self.file_size else None,
                )
            )
        return prompts
