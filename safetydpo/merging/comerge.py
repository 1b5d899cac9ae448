"""Co-Merge (SafetyDPO, arXiv 2412.10493, Sec. 3.3): the merged LoRA keeps the experts' most active weights.

The paper selects, for every LoRA weight, the expert whose activation on inputs spanning all
categories is highest. No reference code was released. Two choices make that rule well defined:

- The unit of selection is a rank direction (row ``r`` of ``lora_A`` with column ``r`` of
  ``lora_B``): the two only act together, so mixing experts within one direction would produce a
  direction no expert learned, while choosing whole layers would let one expert erase the others.
- Directions are read in each expert's principal basis (the SVD of its ``delta W``). A LoRA's
  raw directions are arbitrary (any invertible mixing of them gives the same ``delta W``) and each
  carries a slice of every learned edit, so keeping a few raw directions keeps a few slices of
  everything. Principal directions are ordered by strength, and keeping one keeps a whole component.

Per layer, the ``rank`` most active directions over all experts are kept (activity is defined in
``safetydpo.merging.activations``). The default ``rank`` is the experts' rank: the merged LoRA is
the size of one expert, as in the paper. Experts must share rank and layers (``check_compatible``);
``comerge_weight`` is the literal per-weight reading.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from safetydpo.merging.activations import ActivationStats
from safetydpo.merging.base import MERGES, MergeMethod, MergeResult, check_rank, refactor
from safetydpo.lora_files import LoraExpert, LoraFactors


def principal_directions(expert: LoraExpert) -> LoraExpert:
    """The same expert with each layer re-factorised by SVD: direction ``k`` is the ``k``-th strongest."""
    layers = {name: refactor(factors.delta(), factors.rank, factors) for name, factors in expert.layers.items()}
    return dataclasses.replace(expert, layers=layers)


@MERGES.register("comerge")
@dataclass
class CoMerge(MergeMethod):
    """Per layer, copy the ``rank`` most active principal directions, whichever experts they come from."""

    rank: int | None = None
    needs_activations = True
    needs_equal_ranks = True

    def __post_init__(self) -> None:
        check_rank("comerge", self.rank)

    def prepare(self, experts: list[LoraExpert]) -> list[LoraExpert]:
        return [principal_directions(expert) for expert in experts]

    def merge(self, experts: list[LoraExpert], stats: ActivationStats | None) -> MergeResult:
        if stats is None:
            raise ValueError("comerge needs activation statistics")
        layers, wins = {}, torch.zeros(len(experts))
        for name, first in experts[0].layers.items():
            scores = stats.scores[name]  # (experts, rank)
            kept = scores.flatten().topk(min(self.rank or first.rank, scores.numel())).indices
            owners, directions = kept // first.rank, kept % first.rank
            downs = torch.stack([expert.layers[name].down for expert in experts])
            ups = torch.stack([expert.layers[name].up for expert in experts])
            layers[name] = LoraFactors(
                down=downs[owners, directions].clone(),
                up=ups[owners, :, directions].movedim(0, 1).clone(),
            )
            wins += torch.bincount(owners, minlength=len(experts)).float()
        share = (wins / wins.sum()).tolist()
        return MergeResult(
            layers=layers,
            info={
                "contribution_share": {expert.name: round(value, 6) for expert, value in zip(experts, share)},
                "activation_inputs": stats.num_inputs,
            },
        )
