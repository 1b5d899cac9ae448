"""Merging expert files end to end: load, check, collect activations if needed, merge, save."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from safetydpo.data.datamodule import CoProV2DataModule
from safetydpo.merging.activations import ActivationStats, collect_activations
from safetydpo.merging.base import MERGES, MergeMethod
from safetydpo.merging.experts import LoraExpert, check_compatible, load_expert, lora_config_for, state_dict_for
from safetydpo.models.components import DiffusionComponents, encode_images, encode_prompts, freeze, load_components
from safetydpo.models.expert import LOSER_LATENT_STREAM, WINNER_LATENT_STREAM, noise_and_timesteps, pair_generators
from safetydpo.models.lora import save_lora


def activation_inputs(
    components: DiffusionComponents, datamodule: CoProV2DataModule, num_batches: int, seed: int
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Noisy latents of both renders of each pair at seeded timesteps, conditioned on the unsafe prompt."""
    device = components.unet.device
    loader = datamodule.train_dataloader()
    for step, batch in enumerate(tqdm(islice(loader, num_batches), total=min(num_batches, len(loader)), desc="activations")):
        positions = batch["position"]
        if "latents_winner" in batch:
            latents = torch.cat([batch["latents_winner"], batch["latents_loser"]]).to(device)
            embeds = batch["prompt_embeds"].to(device)
        else:
            generators = pair_generators(seed, step, positions, WINNER_LATENT_STREAM)
            generators += pair_generators(seed, step, positions, LOSER_LATENT_STREAM)
            latents = encode_images(components.vae, torch.cat([batch["pixels_winner"], batch["pixels_loser"]]), generators)
            embeds = encode_prompts(components, list(batch["prompt"]))
        scheduler = components.noise_scheduler
        noise, timesteps = noise_and_timesteps(latents, positions.repeat(2), seed, step, scheduler.config.num_train_timesteps)
        yield scheduler.add_noise(latents, noise, timesteps), timesteps, embeds.repeat(2, 1, 1).to(latents.dtype)


def merge_expert_files(
    expert_paths: list[str | Path],
    output_path: str | Path,
    method: str | MergeMethod = "comerge",
    pretrained_model_name_or_path: str | None = None,
    data_dir: str | None = None,
    num_batches: int = 8,
    batch_size: int = 4,
    resolution: int = 512,
    seed: int = 0,
    device: str | None = None,
) -> dict[str, Any]:
    """Merge expert LoRA files into one diffusers LoRA at ``output_path``; returns its model card.

    Activation-based methods (Co-Merge) run the base UNet over ``num_batches`` batches of pairs
    from every category of the CoProV2 dataset at ``data_dir``.
    """
    merge_method = MERGES.build(method)
    experts = [load_expert(path) for path in expert_paths]
    check_compatible(experts)
    experts = merge_method.prepare(experts)
    stats = None
    base = pretrained_model_name_or_path or experts[0].card.get("base_model")
    if merge_method.needs_activations:
        if not base or not data_dir:
            raise ValueError(f"{merge_method.registry_name} needs the base model and a dataset for activation statistics")
        stats = _activation_stats(experts, base, data_dir, num_batches, batch_size, resolution, seed, device)
    result = merge_method.merge(experts, stats)
    card = {
        "format": "safetydpo.merged/1",
        "method": merge_method.registry_name,
        "method_args": {k: v for k, v in vars(merge_method).items()},
        "base_model": base,
        "experts": [{"path": str(e.path), "category": e.card.get("category"), "concepts": e.card.get("concepts", [])} for e in experts],
        "categories": sorted({e.card["category"] for e in experts if e.card.get("category")}),
        **result.info,
    }
    save_lora(output_path, state_dict_for(result.layers), lora_config_for(result.layers), card)
    return card


def _activation_stats(
    experts: list[LoraExpert], base: str, data_dir: str, num_batches: int, batch_size: int, resolution: int, seed: int, device: str | None
) -> ActivationStats:
    components = load_components(base)
    freeze(components.unet, components.vae, components.text_encoder)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for module in (components.unet, components.vae, components.text_encoder):
        module.to(target)
    datamodule = CoProV2DataModule(data_dir, categories=None, val_fraction=0.0, resolution=resolution, batch_size=batch_size, seed=seed)
    datamodule.setup("fit")
    return collect_activations(components.unet, experts, activation_inputs(components, datamodule, num_batches, seed))
