"""Concatenation (peft ``combination_type="cat"``): an exact weighted sum of the experts' updates."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from safetydpo.merging.activations import ActivationStats
from safetydpo.merging.base import MERGES, MergeMethod, MergeResult, expert_weights
from safetydpo.lora_files import LoraExpert, LoraFactors


@MERGES.register("cat")
@dataclass
class ConcatMerge(MergeMethod):
    """Stack ``w_i A_i`` rows and ``B_i`` columns: ``delta W = sum w_i B_i A_i``, rank = sum of ranks (any ranks)."""

    weights: list[float] | None = None

    def merge(self, experts: list[LoraExpert], stats: ActivationStats | None) -> MergeResult:
        weights = expert_weights(self.weights, experts, 1.0)
        layers = {
            name: LoraFactors(
                down=torch.cat([w * e.layers[name].down for w, e in zip(weights, experts)]),
                up=torch.cat([e.layers[name].up for e in experts], dim=1),
            )
            for name in experts[0].layers
        }
        return MergeResult(layers=layers, info={"weights": weights})
