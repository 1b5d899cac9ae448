"""Per-weight Co-Merge: the paper's wording taken literally, "which expert has the highest activation for each weight".

For weight ``(o, i)`` of an adapted layer, expert ``e`` writes ``delta W_e[o, i] * x_i`` into output
``o``. Its activation is the mean magnitude of that product over the activation inputs, with ``x``
the layer input of expert ``e``'s own model (base UNet plus that expert alone):
``a_e[o, i] = |delta W_e[o, i]| * mean |x_i|``, where ``x_i`` is input feature ``i`` (for a
convolution, one channel at one kernel offset). Each element of the merged update is copied from the
expert with the highest ``a_e[o, i]``; the dense result is re-factorised by SVD to ``rank``.

On a shared input the ``mean |x_i|`` factor is the same for every expert and the rule would pick
the largest ``|delta W_e[o, i]|``; measuring each expert on its own model's inputs is what makes it an
activation statistic. The direction-level ``comerge`` is the reading that keeps whole LoRA directions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from safetydpo.merging.activations import ActivationStats, NetworkInputs, collect_input_magnitudes
from safetydpo.merging.base import MERGES, MergeMethod, MergeResult, check_rank, max_rank, refactor
from safetydpo.lora_files import LoraExpert


@MERGES.register("comerge_weight")
@dataclass
class CoMergeWeight(MergeMethod):
    """Per layer and weight element, keep the most active expert's value; re-factorise to ``rank`` (default: largest expert rank)."""

    rank: int | None = None
    needs_activations = True

    def __post_init__(self) -> None:
        check_rank("comerge_weight", self.rank)

    def collect(self, unet: torch.nn.Module, experts: list[LoraExpert], inputs: Iterable[NetworkInputs]) -> ActivationStats:
        return collect_input_magnitudes(unet, experts, inputs)

    def merge(self, experts: list[LoraExpert], stats: ActivationStats | None) -> MergeResult:
        if stats is None:
            raise ValueError("comerge_weight needs activation statistics")
        layers, wins = {}, torch.zeros(len(experts), dtype=torch.float64)
        for name, first in experts[0].layers.items():
            deltas = torch.stack([expert.layers[name].delta() for expert in experts])  # (experts, out, in)
            activity = deltas.abs() * stats.scores[name][:, None, :]
            winners = activity.argmax(0, keepdim=True)
            merged = deltas.gather(0, winners).squeeze(0)
            layers[name] = refactor(merged, self.rank or max_rank(experts, name), first)
            changed = activity.amax(0).flatten() > 0  # an element no expert changes is won by nobody
            wins += torch.bincount(winners.flatten()[changed], minlength=len(experts)).double()
        share = (wins / wins.sum().clamp(min=1)).tolist()
        return MergeResult(
            layers=layers,
            info={
                "contribution_share": {expert.name: round(value, 6) for expert, value in zip(experts, share)},
                "activation_inputs": stats.num_inputs,
            },
        )
