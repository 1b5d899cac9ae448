"""Merging expert LoRA files: read, check, score on given inputs if the method needs it, merge, write.

This module takes a UNet and an iterable of UNet inputs rather than building them, so merging
depends on no training code; ``safetydpo.models.inputs.activation_inputs`` makes the inputs
training uses. ``plan_merge`` does every check that needs no UNet, so a command can refuse bad
input before it loads a model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safetydpo.locking import output_lock
from safetydpo.merging.activations import NetworkInputs
from safetydpo.lora_files import MERGED_FORMAT, LoraExpert, load_lora, lora_config_for, save_lora, state_dict_for
from safetydpo.merging.base import MERGES, MergeMethod
from safetydpo.merging.experts import check_compatible, merge_base_model


class MergeError(ValueError):
    """A merge that cannot be written as asked; the message names the file or layer and what to do."""


@dataclass
class MergePlan:
    """A checked merge: the method, the experts as read, the output file and the base model to record."""

    method: MergeMethod
    experts: list[LoraExpert]
    output: Path
    base_model: str | None


def _output_path(output_path: str | Path, expert_paths: list[str | Path]) -> Path:
    """The merged file's path: a ``.safetensors`` name that is no folder and none of the experts."""
    output = Path(output_path)
    if output.suffix != ".safetensors":
        raise MergeError(f"merged LoRA file name must end in .safetensors, got {output}")
    if output.is_dir():
        raise MergeError(f"output {output} is a folder; give a file name such as {output / 'merged.safetensors'}")
    for path in expert_paths:
        if output.resolve() == Path(path).resolve():
            raise MergeError(f"output {output} is also an expert; writing it would overwrite that expert, choose another output file")
    return output


def plan_merge(
    expert_paths: list[str | Path],
    output_path: str | Path,
    method: str | dict[str, Any] | MergeMethod = "comerge",
    base_model: str | None = None,
) -> MergePlan:
    """Build the method, read and check the experts and the base model (default: the experts' cards)."""
    merge_method = MERGES.build(method)
    output = _output_path(output_path, expert_paths)
    experts = [load_lora(path) for path in expert_paths]
    check_compatible(experts, equal_ranks=merge_method.needs_equal_ranks)
    return MergePlan(merge_method, experts, output, merge_base_model(experts, base_model))


def run_merge(
    plan: MergePlan,
    unet: torch.nn.Module | None = None,
    inputs: Iterable[NetworkInputs] | None = None,
) -> dict[str, Any]:
    """Merge a checked plan and write the LoRA; returns its model card. See ``merge_expert_files``.

    One merge at a time writes an output file (the lock file beside it, ``.NAME.lock``).
    """
    with output_lock(plan.output.parent / f".{plan.output.name}.lock", "merge", MergeError):
        return _run_merge(plan, unet, inputs)


def _run_merge(plan: MergePlan, unet: torch.nn.Module | None, inputs: Iterable[NetworkInputs] | None) -> dict[str, Any]:
    method = plan.method
    experts = method.prepare(plan.experts)
    stats = None
    if method.needs_activations:
        if unet is None or inputs is None:
            raise ValueError(
                f"{method.registry_name} needs activation statistics: give the base UNet and inputs "
                "(safetydpo merge --data DATASET_DIR)"
            )
        stats = method.collect(unet, experts, inputs)
    result = method.merge(experts, stats)
    for name, factors in result.layers.items():
        if not (torch.isfinite(factors.down).all() and torch.isfinite(factors.up).all()):
            raise MergeError(f"{method.registry_name} gave non-finite values in layer {name}; nothing was written (check the activation inputs)")
    card = {
        "format": MERGED_FORMAT,
        "method": method.registry_name,
        "method_args": dict(vars(method)),
        "base_model": plan.base_model,
        "experts": [{"path": str(e.path), "category": e.card.get("category"), "concepts": e.card.get("concepts", [])} for e in experts],
        "categories": sorted({e.card["category"] for e in experts if e.card.get("category")}),
        # The family the experts' cards name (checked equal), so the merged card tells users which pipeline loads it.
        **{key: experts[0].card[key] for key in ("model_family", "pipeline_class") if experts[0].card.get(key)},
        **result.info,
    }
    save_lora(plan.output, state_dict_for(result.layers), lora_config_for(result.layers), card, network=experts[0].network)
    return card


def merge_expert_files(
    expert_paths: list[str | Path],
    output_path: str | Path,
    method: str | dict[str, Any] | MergeMethod = "comerge",
    *,
    unet: torch.nn.Module | None = None,
    inputs: Iterable[NetworkInputs] | None = None,
    base_model: str | None = None,
) -> dict[str, Any]:
    """Merge expert LoRA files into one diffusers LoRA at ``output_path``; returns its model card.

    ``method`` is a registered name, ``{"name"|"class_path", ...}`` spec or instance. Activation-based
    methods (Co-Merge) run ``unet`` (base weights: adapters disabled) over ``inputs``, batches of
    ``(noisy_latents, timesteps, text_embeds)``. ``base_model`` is recorded in the card (default:
    the experts' cards) and must be the model the experts' cards name.
    """
    return run_merge(plan_merge(expert_paths, output_path, method, base_model), unet=unet, inputs=inputs)
