"""TIES merging (Yadav et al., 2023) of dense updates via peft's merge utilities, then SVD."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft.utils.merge_utils import ties

from safetydpo.merging.activations import ActivationStats
from safetydpo.merging.base import MERGES, MergeMethod, MergeResult, expert_weights, merge_deltas
from safetydpo.lora_files import LoraExpert


@MERGES.register("ties")
@dataclass
class TiesMerge(MergeMethod):
    """Trim each update to ``density``, elect signs, disjoint-merge (peft ``ties``), re-factorise to ``rank``."""

    weights: list[float] | None = None
    density: float = 0.5
    rank: int | None = None

    def merge(self, experts: list[LoraExpert], stats: ActivationStats | None) -> MergeResult:
        weights = torch.tensor(expert_weights(self.weights, experts, 1.0))
        layers = merge_deltas(experts, lambda deltas: ties(deltas, weights, self.density), self.rank)
        return MergeResult(layers=layers, info={"weights": weights.tolist(), "density": self.density})
