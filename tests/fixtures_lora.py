"""LoRA files as other tools write them, for the tiny pipeline's UNet, and what diffusers makes of them.

Each writer produces exactly one format's properties: peft/diffusers keys with alpha in
``lora_adapter_metadata``; the ``unet.*.lora.down.weight`` keys of diffusers' older training scripts
(optionally with text-encoder LoRA beside them); kohya files (``lora_unet_*`` with ``.alpha``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_kohya
from peft import LoraConfig
from safetensors.torch import save_file

#: The attention projections SafetyDPO adapts by default (LoraSettings.target_modules).
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")

Layers = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (lora_A, lora_B), no scale applied


def random_layers(unet: torch.nn.Module, rank: int, seed: int) -> Layers:
    """Random LoRA factors of ``rank`` for every targeted Linear of ``unet``."""
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(TARGETS):
            down = torch.randn(rank, module.in_features, generator=generator) * 0.2
            layers[name] = (down, torch.randn(module.out_features, rank, generator=generator) * 0.2)
    return layers


def peft_keys(layers: Layers, prefix: str = "unet.") -> dict[str, torch.Tensor]:
    """``<prefix><module>.lora_A.weight`` / ``lora_B.weight``: the peft/diffusers key layout."""
    state = {}
    for name, (down, up) in layers.items():
        state[f"{prefix}{name}.lora_A.weight"] = down.contiguous()
        state[f"{prefix}{name}.lora_B.weight"] = up.contiguous()
    return state


def write_peft(path: Path, layers: Layers, alpha: float) -> Path:
    """A diffusers/peft LoRA whose alpha lives only in ``lora_adapter_metadata`` (scale alpha / rank, not folded in)."""
    rank = next(iter(layers.values()))[0].shape[0]
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted(layers))
    StableDiffusionPipeline.save_lora_weights(
        path.parent, unet_lora_layers=peft_keys(layers, prefix=""), weight_name=path.name, unet_lora_adapter_metadata=config.to_dict()
    )
    return path


def write_old_diffusers(path: Path, layers: Layers, text_encoder: Layers | None = None) -> Path:
    """``unet.<module>.lora.down.weight`` / ``lora.up.weight`` (and text-encoder ``lora_linear_layer`` keys), no alpha."""
    state = {key.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): value for key, value in peft_keys(layers).items()}
    for name, (down, up) in (text_encoder or {}).items():
        state[f"text_encoder.{name}.lora_linear_layer.down.weight"] = down
        state[f"text_encoder.{name}.lora_linear_layer.up.weight"] = up
    save_file(state, str(path))
    return path


def write_kohya(path: Path, layers: Layers, alpha: float) -> Path:
    """A kohya file (``lora_unet_<module>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``) via diffusers' converter."""
    state = convert_state_dict_to_kohya(peft_keys(layers))
    state = {key: torch.tensor(alpha) if key.endswith(".alpha") else value for key, value in state.items()}
    save_file(state, str(path))
    return path


def applied_update(pipeline_dir: Path, lora: Path) -> dict[str, torch.Tensor]:
    """What diffusers adds to each UNet weight: ``load_lora_weights`` then ``fuse_lora``, minus the base weights."""
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir)
    base = {name: param.detach().clone() for name, param in pipe.unet.named_parameters()}
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # fused weights stay, the adapter layers go
    return {name.removesuffix(".weight"): param.detach() - base[name] for name, param in pipe.unet.named_parameters()
            if not torch.equal(param, base[name])}
