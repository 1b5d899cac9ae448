"""Stable Diffusion 1.x / 2.x: a UNet on one CLIP text encoder, DDPM noising, epsilon or v targets."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from safetydpo.models.components import DiffusionComponents, tokenize_prompts
from safetydpo.models.denoisers.base import DENOISERS, Conditioning, Denoiser


class DDPMFamily(Denoiser):
    """The DDPM side shared by SD and SDXL: uniform integer timesteps, ``add_noise``, the scheduler's prediction type."""

    def sample_timestep(self, components: DiffusionComponents, generator: torch.Generator) -> Tensor:
        return torch.randint(0, components.noise_scheduler.config.num_train_timesteps, (1,), generator=generator)

    def noisy_and_target(self, components: DiffusionComponents, latents: Tensor, noise: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        scheduler = components.noise_scheduler
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction_type = scheduler.config.prediction_type
        if prediction_type == "epsilon":
            return noisy, noise
        if prediction_type == "v_prediction":
            return noisy, scheduler.get_velocity(latents, noise, timesteps)
        raise ValueError(f"unsupported prediction_type '{prediction_type}'; use epsilon or v_prediction")

    def snr(self, components: DiffusionComponents, timesteps: Tensor) -> Tensor:
        from diffusers.training_utils import compute_snr

        return compute_snr(components.noise_scheduler, timesteps)


@DENOISERS.register("sd")
class StableDiffusion(DDPMFamily):
    """SD 1.x / 2.x: the text encoder's last hidden states condition the UNet's cross-attention."""

    pipeline_classes: ClassVar[tuple[str, ...]] = ("StableDiffusionPipeline",)

    def encode(self, components: DiffusionComponents, prompts: list[str]) -> Conditioning:
        ids = tokenize_prompts(components.tokenizer, prompts)
        return Conditioning(components.text_encoder(ids.to(components.text_encoder.device))[0])
