"""TIES merging (Yadav et al., 2023) of dense updates, then SVD: peft ``combination_type="ties_svd"``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from peft.utils.merge_utils import ties

from safetydpo.merging.activations import ActivationStats
from safetydpo.merging.base import MERGES, MergeMethod, MergeResult, check_density, check_rank, check_sign_method, expert_weights, merge_deltas
from safetydpo.lora_files import LoraExpert


@MERGES.register("ties")
@dataclass
class TiesMerge(MergeMethod):
    """Trim each update to ``density``, elect signs (``majority_sign_method``), disjoint-merge, re-factorise to ``rank``.

    On the dense updates ``B_i A_i`` (peft's ``ties_svd``), not on the factors (peft's ``ties``):
    independently trained LoRAs have unrelated bases, so their factors cannot be compared entry by entry.
    """

    weights: list[float] | None = None
    density: float = 0.5
    rank: int | None = None
    majority_sign_method: Literal["total", "frequency"] = "total"

    def __post_init__(self) -> None:
        check_rank("ties", self.rank)
        check_density("ties", self.density)
        check_sign_method("ties", self.majority_sign_method)

    def merge(self, experts: list[LoraExpert], stats: ActivationStats | None) -> MergeResult:
        weights = torch.tensor(expert_weights(self.weights, experts, 1.0))
        layers = merge_deltas(experts, lambda deltas: ties(deltas, weights, self.density, self.majority_sign_method), self.rank)
        return MergeResult(layers=layers, info={"weights": weights.tolist(), "density": self.density})
