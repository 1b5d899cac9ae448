"""The typed pair sample and batch shared by the dataset, the training module and activation collection.

A pair is served either from images (``pixels_*``, encoded by the VAE on the fly) or from
precomputed features (``latents_*`` and ``prompt_embeds``); an anchor, when the data module gives
one, carries the safe prompt and safe render of another row.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from safetydpo.data.coprov2 import DatasetError

_TENSOR_FIELDS = (
    "pixels_winner", "pixels_loser", "latents_winner", "latents_loser", "prompt_embeds", "pooled_prompt_embeds", "anchor_pixels",
    "anchor_latents",
)


@dataclass
class PairSample:
    """One CoProV2 pair: winner = safe render, loser = unsafe render, condition = the unsafe prompt."""

    position: int  # the row's index in the full metadata table; seeds the pair's noise
    prompt: str
    row: str  # how errors name the row: position, id, category, concept
    pixels_winner: Tensor | None = None
    pixels_loser: Tensor | None = None
    latents_winner: Tensor | None = None
    latents_loser: Tensor | None = None
    prompt_embeds: Tensor | None = None
    pooled_prompt_embeds: Tensor | None = None  # SDXL / SD3 features only
    anchor_position: int | None = None
    anchor_prompt: str | None = None
    anchor_pixels: Tensor | None = None
    anchor_latents: Tensor | None = None


@dataclass
class PairBatch:
    """Stacked samples; Lightning moves it to the device through ``to``."""

    positions: Tensor
    prompts: list[str]
    pixels_winner: Tensor | None = None
    pixels_loser: Tensor | None = None
    latents_winner: Tensor | None = None
    latents_loser: Tensor | None = None
    prompt_embeds: Tensor | None = None
    pooled_prompt_embeds: Tensor | None = None
    anchor_positions: Tensor | None = None
    anchor_prompts: list[str] | None = None
    anchor_pixels: Tensor | None = None
    anchor_latents: Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def precomputed(self) -> bool:
        """Whether the pairs come as latents and text embeddings rather than images."""
        return self.latents_winner is not None

    @property
    def has_anchors(self) -> bool:
        return self.anchor_prompts is not None

    def to(self, device: torch.device | str) -> PairBatch:
        moved: dict[str, Any] = {
            f.name: value.to(device) if isinstance(value := getattr(self, f.name), Tensor) else value for f in fields(self)
        }
        return PairBatch(**moved)


def _stack(samples: list[PairSample], name: str) -> Tensor | None:
    """Stack one tensor field; a field present in some samples only, or of unequal shapes, names two rows."""
    values = [getattr(sample, name) for sample in samples]
    present = [value is not None for value in values]
    if not any(present):
        return None
    first = present.index(True)
    if not all(present):
        other = present.index(False)
        raise DatasetError(f"{samples[first].row} has {name} but {samples[other].row} has none; serve every pair the same way")
    for sample, value in zip(samples, values):
        if value.shape != values[first].shape:
            raise DatasetError(
                f"{sample.row}: {name} has shape {tuple(value.shape)}, {samples[first].row} has {tuple(values[first].shape)}; "
                "rebuild its features at one resolution (safetydpo data build) or set data.init_args.use_precomputed: false"
            )
    stacked = torch.stack(values)
    if not torch.isfinite(stacked).all():
        bad = next(sample for sample, value in zip(samples, values) if not torch.isfinite(value).all())
        raise DatasetError(
            f"{bad.row}: {name} holds NaN or inf values (a corrupt feature shard); rebuild its features "
            "(safetydpo data build) or set data.init_args.use_precomputed: false"
        )
    return stacked


def collate_pairs(samples: list[PairSample]) -> PairBatch:
    """The DataLoader ``collate_fn`` of CoProV2 pairs."""
    anchored = samples[0].anchor_prompt is not None
    return PairBatch(
        positions=torch.tensor([sample.position for sample in samples], dtype=torch.long),
        prompts=[sample.prompt for sample in samples],
        anchor_positions=torch.tensor([sample.anchor_position for sample in samples], dtype=torch.long) if anchored else None,
        anchor_prompts=[str(sample.anchor_prompt) for sample in samples] if anchored else None,
        **{name: _stack(samples, name) for name in _TENSOR_FIELDS},
    )
