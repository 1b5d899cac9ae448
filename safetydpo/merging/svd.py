"""Task arithmetic on dense updates re-factorised by SVD (peft ``combination_type="svd"``)."""

from __future__ import annotations

from dataclasses import dataclass

from safetydpo.merging.activations import ActivationStats
from safetydpo.merging.base import MERGES, MergeMethod, MergeResult, check_rank, expert_weights, merge_deltas
from safetydpo.lora_files import LoraExpert


@MERGES.register("svd")
@dataclass
class SVDMerge(MergeMethod):
    """``delta W = sum w_i B_i A_i`` truncated to ``rank`` (default: the largest expert rank, as peft) by SVD."""

    weights: list[float] | None = None
    rank: int | None = None

    def __post_init__(self) -> None:
        check_rank("svd", self.rank)

    def merge(self, experts: list[LoraExpert], stats: ActivationStats | None) -> MergeResult:
        weights = expert_weights(self.weights, experts, 1.0)
        layers = merge_deltas(experts, lambda deltas: sum(w * d for w, d in zip(weights, deltas)), self.rank)
        return MergeResult(layers=layers, info={"weights": weights})
