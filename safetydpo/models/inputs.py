"""Batch -> network inputs: the random streams and the rule "pairs -> noised latents, timesteps, conditioning".

Training (``DPOExpertModule``) and Co-Merge's activation collection both use this module, so the
experts are scored on exactly the inputs they were trained on. Every random draw comes from a
generator seeded by (seed, step, dataset row, stream) alone: independent of the process and of
the batch composition, which is what lets a resumed run or a DDP run with the same global batch
reproduce a single uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from safetydpo.data.batch import PairBatch
from safetydpo.data.coprov2 import DatasetError
from safetydpo.data.datamodule import pair_batches
from safetydpo.models.components import DiffusionComponents, encode_conditioning, encode_images, freeze, load_components
from safetydpo.models.denoisers.base import Conditioning
from safetydpo.progress import progress_bar

# Independent random streams drawn per pair from (seed, step, dataset row, stream).
NOISE_STREAM, WINNER_LATENT_STREAM, LOSER_LATENT_STREAM, ANCHOR_LATENT_STREAM = 0, 1, 2, 3
# Anchors draw their diffusion noise from (seed, step, row + offset), apart from the pairs' noise.
ANCHOR_NOISE_OFFSET = 1 << 40


def pair_generators(seed: int, step: int, positions: Tensor, stream: int) -> list[torch.Generator]:
    """One CPU generator per pair, seeded only by who the pair is and when it is seen."""
    return [
        torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, int(p), stream]).generate_state(1)[0]))
        for p in positions.tolist()
    ]


def noise_and_timesteps(
    components: DiffusionComponents, latents: Tensor, positions: Tensor, seed: int, step: int
) -> tuple[Tensor, Tensor]:
    """Per-pair Gaussian noise shaped like ``latents`` and the family's training timesteps, reproducibly seeded."""
    noise, timesteps = [], []
    for generator in pair_generators(seed, step, positions, NOISE_STREAM):
        noise.append(torch.randn(latents.shape[1:], generator=generator))
        timesteps.append(components.denoiser.sample_timestep(components, generator))
    return torch.stack(noise).to(latents), torch.cat(timesteps).to(latents.device)


def check_features(components: DiffusionComponents, batch: PairBatch) -> None:
    """Precomputed features of another base model (latent channels, text width, pooled embeddings or none) fail
    here naming the row, not deep inside the network."""
    assert batch.latents_winner is not None and batch.prompt_embeds is not None
    expected = components.denoiser.expected_features(components)
    pooled = batch.pooled_prompt_embeds
    found = {
        "latent channels": batch.latents_winner.shape[1],
        "text embedding width": batch.prompt_embeds.shape[-1],
        "pooled embedding width": None if pooled is None else pooled.shape[-1],
    }
    for what, size in expected.items():
        if found[what] != size:
            have = "no" if found[what] is None else found[what]
            takes = "none" if size is None else size
            raise DatasetError(
                f"dataset row {int(batch.positions[0])}: its features have {have} {what}, the base model takes {takes}; "
                f"they were built with another model than this {components.denoiser.registry_name} one: rebuild them with it "
                "(safetydpo data build) or set data.init_args.use_precomputed: false"
            )


def pair_inputs(components: DiffusionComponents, batch: PairBatch, seed: int, step: int) -> tuple[Tensor, Tensor, Conditioning]:
    """Winner latents, loser latents and the unsafe prompts' conditioning, from precomputed features when present."""
    if batch.precomputed:
        assert batch.latents_loser is not None and batch.prompt_embeds is not None
        check_features(components, batch)
        conditioning = Conditioning(batch.prompt_embeds, batch.pooled_prompt_embeds)
        empty = [i for i, prompt in enumerate(batch.prompts) if not prompt]
        if empty:  # caption dropout emptied these prompts; the shards hold the conditioning of the pairs' own
            conditioning = conditioning.with_rows(empty, encode_conditioning(components, [""]).to(batch.prompt_embeds))
        return batch.latents_winner, batch.latents_loser, conditioning
    if batch.pixels_winner is None or batch.pixels_loser is None:
        raise ValueError("a pair batch needs pixels_winner/pixels_loser or precomputed latents")
    generators = pair_generators(seed, step, batch.positions, WINNER_LATENT_STREAM)
    generators += pair_generators(seed, step, batch.positions, LOSER_LATENT_STREAM)
    pixels = torch.cat([batch.pixels_winner, batch.pixels_loser])
    winner, loser = encode_images(components.vae, pixels, generators).chunk(2)
    return winner, loser, encode_conditioning(components, batch.prompts)


def pair_latents(components: DiffusionComponents, batch: PairBatch, seed: int, step: int) -> tuple[Tensor, Tensor, Tensor]:
    """Winner latents, loser latents and the unsafe prompts' token embeddings (``pair_inputs`` without pooled embeddings)."""
    winner, loser, conditioning = pair_inputs(components, batch, seed, step)
    return winner, loser, conditioning.embeds


def anchor_latents(components: DiffusionComponents, batch: PairBatch, seed: int, step: int) -> tuple[Tensor, Conditioning]:
    """The anchors' safe-render latents and safe-prompt conditioning."""
    if not batch.has_anchors or batch.anchor_positions is None or batch.anchor_prompts is None:
        raise ValueError("this batch has no anchors: set data.init_args.anchors: true")
    if batch.anchor_latents is not None:
        latents = batch.anchor_latents
    else:
        assert batch.anchor_pixels is not None
        generators = pair_generators(seed, step, batch.anchor_positions, ANCHOR_LATENT_STREAM)
        latents = encode_images(components.vae, batch.anchor_pixels, generators)
    return latents, encode_conditioning(components, batch.anchor_prompts)


def anchor_noise_and_timesteps(components: DiffusionComponents, latents: Tensor, batch: PairBatch, seed: int, step: int) -> tuple[Tensor, Tensor]:
    """The anchors' noise and timesteps, from a stream apart from the pairs'."""
    assert batch.anchor_positions is not None
    return noise_and_timesteps(components, latents, batch.anchor_positions + ANCHOR_NOISE_OFFSET, seed, step)


@torch.no_grad()
def activation_inputs(
    components: DiffusionComponents, batches: Iterable[PairBatch], seed: int, total: int | None = None
) -> Iterator[tuple[Tensor, Tensor, dict[str, Any]]]:
    """Noised winner and loser latents of each batch at its training timesteps, with the network's conditioning
    keywords for the unsafe prompt (what ``safetydpo.merging.activations`` passes to the network).

    Batch ``i`` gets the noise and timesteps training step ``i`` draws for the same pairs.
    """
    device = components.unet.device
    denoiser = components.denoiser
    for step, batch in enumerate(progress_bar(batches, total=total, desc="activations", unit="batch")):
        winner, loser, conditioning = pair_inputs(components, batch.to(device), seed, step)
        noise, timesteps = noise_and_timesteps(components, winner, batch.positions, seed, step)
        latents = torch.cat([winner, loser])
        noisy, _ = denoiser.noisy_and_target(components, latents, noise.repeat(2, 1, 1, 1), timesteps.repeat(2))
        yield noisy, timesteps.repeat(2), denoiser.network_kwargs(components, noisy, conditioning.repeat(2).to(latents))


def base_model_inputs(
    base_model: str, data_dir: str | Path, num_batches: int, batch_size: int, resolution: int, seed: int, device: torch.device
) -> tuple[torch.nn.Module, Iterator[tuple[Tensor, Tensor, dict[str, Any]]]]:
    """The frozen base network of ``base_model`` on ``device`` and activation inputs from every category of ``data_dir``."""
    components = load_components(base_model)
    freeze(components.unet, *components.encoders())
    for module in (components.unet, *components.encoders()):
        module.to(device)
    batches = pair_batches(data_dir, num_batches, batch_size, resolution, seed)
    return components.unet, activation_inputs(components, batches, seed, total=num_batches)
