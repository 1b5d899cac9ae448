"""Merging expert LoRA files: read, check, score on given inputs if the method needs it, merge, write.

This module takes a UNet and an iterable of UNet inputs rather than building them, so merging
depends on no training code; ``safetydpo.models.inputs.activation_inputs`` makes the inputs
training uses.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from safetydpo.lora_files import MERGED_FORMAT, load_lora, lora_config_for, save_lora, state_dict_for
from safetydpo.merging.activations import collect_activations
from safetydpo.merging.base import MERGES, MergeMethod
from safetydpo.merging.experts import check_compatible


def merge_expert_files(
    expert_paths: list[str | Path],
    output_path: str | Path,
    method: str | dict[str, Any] | MergeMethod = "comerge",
    *,
    unet: torch.nn.Module | None = None,
    inputs: Iterable[tuple[Tensor, Tensor, Tensor]] | None = None,
    base_model: str | None = None,
) -> dict[str, Any]:
    """Merge expert LoRA files into one diffusers LoRA at ``output_path``; returns its model card.

    ``method`` is a registered name, ``{"name"|"class_path", ...}`` spec or instance. Activation-based
    methods (Co-Merge) run ``unet`` (base weights: adapters disabled) over ``inputs``, batches of
    ``(noisy_latents, timesteps, text_embeds)``. ``base_model`` is recorded in the card (default:
    the experts' cards).
    """
    merge_method = MERGES.build(method)
    experts = [load_lora(path) for path in expert_paths]
    check_compatible(experts)
    experts = merge_method.prepare(experts)
    stats = None
    if merge_method.needs_activations:
        if unet is None or inputs is None:
            raise ValueError(
                f"{merge_method.registry_name} needs activation statistics: give the base UNet and inputs "
                "(safetydpo merge --data DATASET_DIR)"
            )
        stats = collect_activations(unet, experts, inputs)
    result = merge_method.merge(experts, stats)
    card = {
        "format": MERGED_FORMAT,
        "method": merge_method.registry_name,
        "method_args": dict(vars(merge_method)),
        "base_model": base_model or experts[0].card.get("base_model"),
        "experts": [{"path": str(e.path), "category": e.card.get("category"), "concepts": e.card.get("concepts", [])} for e in experts],
        "categories": sorted({e.card["category"] for e in experts if e.card.get("category")}),
        **result.info,
    }
    save_lora(output_path, state_dict_for(result.layers), lora_config_for(result.layers), card)
    return card
