"""Attaching a peft LoRA to the denoising network (UNet or SD3 transformer) and reading its weights out (the file format lives in ``safetydpo.lora_files``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from diffusers import ModelMixin
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict

ADAPTER_NAME = "default"


@dataclass
class LoraSettings:
    """LoRA hyper-parameters. ``alpha=None`` means alpha = rank (scale 1), as in the SafetyDPO release."""

    rank: int = 8
    alpha: float | None = None
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    dropout: float = 0.0
    init_weights: str = "gaussian"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1 (4 to 64 are usual), got {self.rank}")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"lora.alpha must be a positive number, or null for alpha = rank, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")

    def to_peft(self) -> LoraConfig:
        init: bool | str = True if self.init_weights == "kaiming" else self.init_weights
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha if self.alpha is not None else self.rank,
            target_modules=list(self.target_modules),
            lora_dropout=self.dropout,
            init_lora_weights=init,
        )


def _adaptable_module_names(unet: torch.nn.Module) -> list[str]:
    return [name for name, module in unet.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]


def _target_choices(names: list[str]) -> list[str]:
    """Short suffixes users can write in ``target_modules`` (``to_q``, ``to_out.0``, ``conv1`` ...)."""
    choices = set()
    for name in names:
        parts = name.split(".")
        choices.add(".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1])
    return sorted(choices)


def attach_lora(unet: ModelMixin, settings: LoraSettings) -> None:
    """Add a trainable LoRA adapter to the network ``unet`` (a UNet or a transformer); every target pattern must match at least one layer."""
    names = _adaptable_module_names(unet)
    unmatched = [
        target for target in settings.target_modules if not any(n == target or n.endswith(f".{target}") for n in names)
    ]
    if unmatched:
        raise ValueError(
            f"LoRA target_modules {unmatched} match no Linear/Conv2d layer of the UNet; "
            f"valid choices include: {', '.join(_target_choices(names))}"
        )
    unet.add_adapter(settings.to_peft(), adapter_name=ADAPTER_NAME)


def lora_state_dict(unet: ModelMixin) -> dict[str, torch.Tensor]:
    """The adapter's weights in peft key format with each layer's alpha/rank scale folded into ``lora_B``.

    Folding makes the file mean the same thing to every loader (diffusers, ComfyUI, A1111), since
    all of them agree on the meaning of a LoRA whose alpha equals its rank.
    """
    state = {key: value.detach().float().cpu().clone() for key, value in get_peft_model_state_dict(unet).items()}
    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.scaling:
            key = f"{name}.lora_B.weight"
            if key in state:
                state[key] *= module.scaling[ADAPTER_NAME]
    return state
