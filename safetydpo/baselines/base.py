"""What every concept-erasure baseline shares: its error type, the model families it edits, the edit registry."""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from safetydpo.lora_files import EXPERT_FORMAT, LoraFactors, lora_config_for, save_lora, state_dict_for
from safetydpo.models.components import DiffusionComponents
from safetydpo.registry import Registry

#: Pipeline classes (``model_index.json`` ``_class_name``) whose UNet and CLIP text encoder the baselines edit.
SUPPORTED_PIPELINES: tuple[str, ...] = ("StableDiffusionPipeline", "StableDiffusionPipelineSafe")


class BaselineError(ValueError):
    """Bad baseline input (model family, concepts, options); one line naming the option and the fix."""


def check_family(base_model: str, method: str, option: str = "base_model") -> None:
    """Refuse a local pipeline folder of a family the baselines were not written for (SDXL, SD3, Flux, ...).

    The published ESD and UCE edit SD 1.x/2.x: one CLIP text encoder feeding ``attn2`` cross-attention of a
    ``UNet2DConditionModel``; other families have two text encoders or a transformer denoiser. Hub ids are
    checked when their components load.
    """
    index = Path(base_model).expanduser() / "model_index.json"
    if not index.is_file():
        return
    family = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    if family not in SUPPORTED_PIPELINES:
        raise BaselineError(
            f"{method}: {option} {base_model} is a {family}; {method} supports Stable Diffusion 1.x/2.x pipelines "
            f"({', '.join(SUPPORTED_PIPELINES)}): use such a base model or another method"
        )


class WeightEdit(ABC):
    """A closed-form edit of the base model's weights, exported as a LoRA; subclasses are dataclasses in BASELINES."""

    registry_name: ClassVar[str]

    @abstractmethod
    def edit(self, components: DiffusionComponents) -> dict[str, Tensor]:
        """``{UNet module name: weight update}`` of every layer the edit changes; the components stay unchanged."""


BASELINES: Registry[WeightEdit] = Registry("baseline")


def exact_factors(delta: Tensor) -> LoraFactors:
    """``delta`` as LoRA factors of its exact (numerical) rank: ``up @ down`` reproduces it to float32 rounding.

    The rank is ``torch.linalg.matrix_rank``'s (singular values above ``max(shape) * eps * s_max`` in
    float64), so a LoRA of that rank loses nothing of the edit and stores no direction it does not have.
    """
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    rank = max(int(torch.linalg.matrix_rank(delta.double())), 1)
    root = s[:rank].sqrt()
    return LoraFactors(down=(root[:, None] * vh[:rank]).float(), up=(u[:, :rank] * root).float())


def export_edit(path: str | Path, deltas: dict[str, Tensor], card: dict[str, object]) -> Path:
    """Write weight updates as a diffusers/peft UNet LoRA (``load_lora_weights`` loads it) with its model cards."""
    layers = {name: exact_factors(delta) for name, delta in sorted(deltas.items())}
    return save_lora(path, state_dict_for(layers), lora_config_for(layers), card)


def run_edit(method: WeightEdit, base_model: str, out: str | Path) -> Path:
    """Edit ``base_model``'s weights with ``method`` and write the update as LoRA ``out`` (``.safetensors``) with its card."""
    from safetydpo.models.components import freeze, load_components

    if Path(out).suffix != ".safetensors":
        raise BaselineError(f"{method.registry_name}: --out must end in .safetensors, got {out}")
    check_family(base_model, method.registry_name, "--base-model")
    components = load_components(base_model)
    freeze(components.unet, components.vae, components.text_encoder)
    deltas = method.edit(components)
    # An expert's card (merges, evaluation and the hub card read it as one), naming the baseline that made it.
    card = {"format": EXPERT_FORMAT, "base_model": base_model, "category": None, "baseline": method.registry_name,
            "method_args": dataclasses.asdict(method)}
    return export_edit(out, deltas, card)
