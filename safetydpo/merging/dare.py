"""DARE (Yu et al., 2023): random drop-and-rescale of dense updates via peft's merge utilities, then SVD."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft.utils.merge_utils import dare_linear, dare_ties

from safetydpo.merging.activations import ActivationStats
from safetydpo.merging.base import MERGES, MergeMethod, MergeResult, expert_weights, merge_deltas
from safetydpo.lora_files import LoraExpert


@MERGES.register("dare")
@dataclass
class DareMerge(MergeMethod):
    """Drop ``1 - density`` of each update at random and rescale (``dare_linear``, or ``dare_ties`` with ``ties=True``)."""

    weights: list[float] | None = None
    density: float = 0.5
    ties: bool = False
    rank: int | None = None
    seed: int = 0

    def merge(self, experts: list[LoraExpert], stats: ActivationStats | None) -> MergeResult:
        weights = torch.tensor(expert_weights(self.weights, experts, 1.0))
        combine = dare_ties if self.ties else dare_linear
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)  # peft draws the drop masks from the global generator
            layers = merge_deltas(experts, lambda deltas: combine(deltas, weights, self.density), self.rank)
        return MergeResult(layers=layers, info={"weights": weights.tolist(), "density": self.density, "ties": self.ties})
