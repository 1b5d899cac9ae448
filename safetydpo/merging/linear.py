"""Linear combination of the LoRA factors, as peft's ``add_weighted_adapter(combination_type="linear")``."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from safetydpo.merging.activations import ActivationStats
from safetydpo.merging.base import MERGES, MergeMethod, MergeResult, expert_weights, max_rank
from safetydpo.lora_files import LoraExpert, LoraFactors


def _padded(factors: LoraFactors, rank: int) -> LoraFactors:
    """The same update at ``rank``: zero rows of ``down`` and zero columns of ``up`` added."""
    extra = rank - factors.rank
    down = F.pad(factors.down.movedim(0, -1), (0, extra)).movedim(-1, 0)
    up = F.pad(factors.up.movedim(1, -1), (0, extra)).movedim(-1, 1)
    return LoraFactors(down=down, up=up)


@MERGES.register("linear")
@dataclass
class LinearMerge(MergeMethod):
    """``A = sum sign(w_i) sqrt(|w_i|) A_i`` and ``B = sum sqrt(|w_i|) B_i``; weights default to 1/n.

    peft's ``linear`` numerically (alpha/rank scales are in the factors, split as peft splits them):
    each expert's own term ``B_i A_i`` gets weight ``w_i``, plus cross terms ``B_i A_j`` between
    experts, which make it the classic weak baseline for independently trained LoRAs. Unlike peft,
    experts of different rank are combined, the smaller ones padded with zero directions.
    """

    weights: list[float] | None = None

    def merge(self, experts: list[LoraExpert], stats: ActivationStats | None) -> MergeResult:
        weights = expert_weights(self.weights, experts, 1.0 / len(experts))
        roots = [math.sqrt(abs(w)) for w in weights]
        layers = {}
        for name in experts[0].layers:
            rank = max_rank(experts, name)
            padded = [_padded(expert.layers[name], rank) for expert in experts]
            layers[name] = LoraFactors(
                down=torch.stack([math.copysign(r, w) * p.down for r, w, p in zip(roots, weights, padded)]).sum(0),
                up=torch.stack([r * p.up for r, p in zip(roots, padded)]).sum(0),
            )
        return MergeResult(layers=layers, info={"weights": weights})
