"""Linear average of the LoRA factors (peft ``add_weighted_adapter(combination_type="linear")``)."""

from __future__ import annotations

from dataclasses import dataclass

from safetydpo.merging.activations import ActivationStats
from safetydpo.merging.base import MERGES, MergeMethod, MergeResult, expert_weights
from safetydpo.lora_files import LoraExpert, LoraFactors


@MERGES.register("linear")
@dataclass
class LinearMerge(MergeMethod):
    """``A = sum w_i A_i`` and ``B = sum w_i B_i`` separately; weights default to 1/n (plain averaging).

    Like peft's ``linear`` combination it needs equal ranks, keeps the rank, and introduces cross
    terms ``B_i A_j``: the classic weak baseline for merging independently trained LoRAs.
    """

    weights: list[float] | None = None

    def merge(self, experts: list[LoraExpert], stats: ActivationStats | None) -> MergeResult:
        weights = expert_weights(self.weights, experts, 1.0 / len(experts))
        layers = {
            name: LoraFactors(
                down=sum(w * e.layers[name].down for w, e in zip(weights, experts)),
                up=sum(w * e.layers[name].up for w, e in zip(weights, experts)),
            )
            for name in experts[0].layers
        }
        return MergeResult(layers=layers, info={"weights": weights})
