"""DARE (Yu et al., 2023) of dense updates, then SVD: peft ``combination_type="dare_linear_svd"`` / ``"dare_ties_svd"``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from peft.utils.merge_utils import dare_linear, dare_ties

from safetydpo.merging.activations import ActivationStats
from safetydpo.merging.base import MERGES, MergeMethod, MergeResult, check_density, check_rank, check_sign_method, expert_weights, merge_deltas
from safetydpo.lora_files import LoraExpert


@MERGES.register("dare")
@dataclass
class DareMerge(MergeMethod):
    """Drop ``1 - density`` of each update ``B_i A_i`` at random and rescale, sum (or TIES with ``ties=True``), re-factorise.

    Seeded: peft draws the drop masks from torch's global generator, which runs forked at ``seed``.
    """

    weights: list[float] | None = None
    density: float = 0.5
    ties: bool = False
    rank: int | None = None
    seed: int = 0
    majority_sign_method: Literal["total", "frequency"] = "total"

    def __post_init__(self) -> None:
        check_rank("dare", self.rank)
        check_density("dare", self.density)
        check_sign_method("dare", self.majority_sign_method)
        if not isinstance(self.ties, bool) or not isinstance(self.seed, int):
            raise ValueError(f"dare ties must be true or false and seed an integer, got ties={self.ties!r}, seed={self.seed!r}")

    def merge(self, experts: list[LoraExpert], stats: ActivationStats | None) -> MergeResult:
        weights = torch.tensor(expert_weights(self.weights, experts, 1.0))

        def combine(deltas: list[torch.Tensor]) -> torch.Tensor:
            if self.ties:
                return dare_ties(deltas, weights, self.density, self.majority_sign_method)
            return dare_linear(deltas, weights, self.density)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            layers = merge_deltas(experts, combine, self.rank)
        return MergeResult(layers=layers, info={"weights": weights.tolist(), "density": self.density, "ties": self.ties})
