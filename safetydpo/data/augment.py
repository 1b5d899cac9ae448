"""Training-time augmentation of preference pairs: caption dropout and horizontal flips.

The SafetyDPO release's ``train.py`` (a Salesforce Diffusion-DPO derivative) replaces 20% of the
prompts by the empty prompt (``--proportion_empty_prompts 0.2``) and flips each image of a pair on
its own (``RandomHorizontalFlip`` inside the per-image transform). It draws from the global RNG;
here every draw is a hash of (seed, pair position, epoch) alone, so a resumed run, a DDP run and a
run with any number of dataloader workers augment each pair exactly as one uninterrupted run does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from safetydpo.data.batch import PairBatch
from safetydpo.seeding import derive_seed

#: ``none``: no flips; ``paired``: winner and loser flipped together (their layouts stay aligned);
#: ``independent``: each image flipped on its own draw, as the release's per-image transform does.
FLIP_MODES: tuple[str, ...] = ("none", "paired", "independent")


def _coin(*parts: object) -> float:
    """A uniform draw in [0, 1) fixed by ``parts``."""
    return derive_seed(*parts) / 2**31


@dataclass(frozen=True)
class PairAugmentation:
    """What happens to a training pair before the UNet sees it (validation pairs are never augmented).

    Args:
        caption_dropout: share of pairs whose prompt becomes the empty prompt (the release: 0.2), so
            the expert also learns the preference unconditionally, as classifier-free guidance's
            empty-prompt branch sees it.
        flip: ``none``, ``paired`` or ``independent`` horizontal flips, each with probability 1/2.
    """

    caption_dropout: float = 0.0
    flip: str = "none"

    def __post_init__(self) -> None:
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")
        if self.flip not in FLIP_MODES:
            raise ValueError(f"flip '{self.flip}' is not one of: {', '.join(FLIP_MODES)}")

    @property
    def active(self) -> bool:
        return self.caption_dropout > 0 or self.flip != "none"

    def draws(self, seed: int, position: int, epoch: int) -> tuple[bool, bool, bool]:
        """(empty prompt, flip the winner, flip the loser) for the pair at table ``position`` in ``epoch``.

        Each decision has its own stream, so changing ``caption_dropout`` leaves the flips as they were.
        """
        empty = _coin(seed, "caption_dropout", position, epoch) < self.caption_dropout
        if self.flip == "none":
            return empty, False, False
        winner = _coin(seed, "flip_winner", position, epoch) < 0.5
        loser = winner if self.flip == "paired" else _coin(seed, "flip_loser", position, epoch) < 0.5
        return empty, winner, loser

    def __call__(self, batch: PairBatch, seed: int, epoch: int) -> PairBatch:
        """The batch as the pairs' draws in ``epoch`` change it; anchors are left as they are."""
        if not self.active:
            return batch
        draws = [self.draws(seed, position, epoch) for position in batch.positions.tolist()]
        empty, flip_winner, flip_loser = (list(column) for column in zip(*draws))
        return dataclasses.replace(
            batch,
            prompts=["" if drop else prompt for prompt, drop in zip(batch.prompts, empty)],
            pixels_winner=_flip(batch.pixels_winner, flip_winner),
            pixels_loser=_flip(batch.pixels_loser, flip_loser),
        )


def _flip(pixels: Tensor | None, mask: list[bool]) -> Tensor | None:
    """``pixels`` with the images where ``mask`` is true mirrored left-right."""
    if pixels is None or not any(mask):
        return pixels
    chosen = torch.tensor(mask, device=pixels.device).view(-1, *([1] * (pixels.dim() - 1)))
    return torch.where(chosen, pixels.flip(-1), pixels)
