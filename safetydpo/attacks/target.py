"""The model an attack runs against, loaded from a diffusers folder and an optional LoRA file.

The LoRA is attached as an enabled peft adapter (diffusers' ``load_lora_adapter``), not fused into
the weights: white-box attacks differentiate through the aligned UNet and compare it with the same
UNet with its adapters disabled, the unaligned reference, without holding two UNets in memory.
"""

from __future__ import annotations

from pathlib import Path

import torch

from safetydpo.attacks.base import AttackError, AttackTarget
from safetydpo.lora_files import LoraFileError, load_lora
from safetydpo.models.components import freeze, load_components
from safetydpo.quiet import drop_log_messages

#: The adapter name the target's LoRA is loaded under.
TARGET_ADAPTER = "attacked"


def load_target(name: str, base_model: str, lora: str | None, device: torch.device, dtype: torch.dtype = torch.float32) -> AttackTarget:
    """The model ``name``: the pipeline folder's components (frozen, eval mode) with ``lora`` attached and enabled.

    Attacks run in float32 by default: gradient searches through float16 text encoders and UNets lose
    the small differences they follow.
    """
    try:
        components = load_components(base_model, dtype=dtype)
    except (OSError, ValueError) as err:
        raise AttackError(f"model '{name}': cannot load {base_model} to attack it: {' '.join(str(err).split())}") from None
    if lora:
        path = Path(lora).expanduser()
        try:
            load_lora(path)  # refuses non-finite weights and layouts diffusers cannot read, in one line
            # Our LoRAs adapt the UNet only; diffusers says so for the text encoder on every load.
            drop_log_messages("diffusers.loaders.lora_base", r"^No LoRA keys associated to CLIPTextModel")
            components.unet.load_lora_adapter(str(path), prefix="unet", adapter_name=TARGET_ADAPTER)
        except (LoraFileError, FileNotFoundError, ValueError, KeyError, RuntimeError, OSError) as err:
            raise AttackError(f"model '{name}': cannot load LoRA {path} to attack it: {' '.join(str(err).split())}") from None
    freeze(components.unet, components.vae, components.text_encoder)
    for module in (components.unet, components.vae, components.text_encoder):
        module.to(device)
    return AttackTarget(name=name, components=components, has_reference=bool(lora), device=device)
