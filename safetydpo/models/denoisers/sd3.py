"""Stable Diffusion 3: an MMDiT transformer on two CLIP encoders and (optionally) T5, rectified-flow noising.

Training follows diffusers' SD3 training scripts (``train_dreambooth_lora_sd3.py``): the noised
latents are ``(1 - sigma) x + sigma noise``, the network predicts the velocity ``noise - x``, and
timesteps are drawn with the logit-normal density of
``diffusers.training_utils.compute_density_for_timestep_sampling`` (mean 0, std 1, the scripts'
defaults; no output preconditioning, so Diffusion-DPO compares velocity errors).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, SchedulerMixin, StableDiffusion3Pipeline
from diffusers.training_utils import compute_density_for_timestep_sampling
from torch import Tensor

from safetydpo.models.components import DiffusionComponents
from safetydpo.models.denoisers.base import DENOISERS, Conditioning, Denoiser


def _sigmas(components: DiffusionComponents, timesteps: Tensor, like: Tensor) -> Tensor:
    """sigma of each timestep, shaped to broadcast over ``like``: the flow scheduler's timesteps are sigma x T."""
    sigma = timesteps.to(like.device, torch.float32) / components.noise_scheduler.config.num_train_timesteps
    return sigma.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


@DENOISERS.register("sd3")
class StableDiffusion3(Denoiser):
    """Conditioning comes from ``StableDiffusion3Pipeline.encode_prompt`` (T5 tokens are zeros when the folder has none)."""

    pipeline_classes: ClassVar[tuple[str, ...]] = ("StableDiffusion3Pipeline",)
    pipeline_class: ClassVar[type[DiffusionPipeline]] = StableDiffusion3Pipeline
    network_name: ClassVar[str] = "transformer"
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2", "text_encoder_3")
    training_scheduler: ClassVar[type[SchedulerMixin]] = FlowMatchEulerDiscreteScheduler
    #: Logit-normal timestep density of diffusers' SD3 scripts (``--logit_mean``, ``--logit_std`` defaults).
    logit_mean: ClassVar[float] = 0.0
    logit_std: ClassVar[float] = 1.0

    def encode(self, components: DiffusionComponents, prompts: list[str]) -> Conditioning:
        encoder = self.prompt_pipeline(components)
        embeds, _, pooled, _ = encoder.encode_prompt(
            prompts, None, None, device=components.text_encoder.device, do_classifier_free_guidance=False
        )
        return Conditioning(embeds, pooled)

    def sample_timestep(self, components: DiffusionComponents, generator: torch.Generator) -> Tensor:
        scheduler = components.noise_scheduler
        u = compute_density_for_timestep_sampling("logit_normal", 1, self.logit_mean, self.logit_std, generator=generator)
        index = (u * scheduler.config.num_train_timesteps).long().clamp(max=len(scheduler.timesteps) - 1)
        return scheduler.timesteps[index].float()

    def noisy_and_target(self, components: DiffusionComponents, latents: Tensor, noise: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        sigma = _sigmas(components, timesteps, latents)
        return (1.0 - sigma) * latents + sigma * noise, noise - latents

    def snr(self, components: DiffusionComponents, timesteps: Tensor) -> Tensor:
        sigma = self.sigmas(components, timesteps)
        return ((1.0 - sigma) / sigma) ** 2

    def sigmas(self, components: DiffusionComponents, timesteps: Tensor) -> Tensor:
        return timesteps.float() / components.noise_scheduler.config.num_train_timesteps

    def prediction_type(self, components: DiffusionComponents) -> str:
        return "flow_matching"

    def network_kwargs(self, components: DiffusionComponents, latents: Tensor, conditioning: Conditioning) -> dict[str, Tensor | dict[str, Tensor]]:
        assert conditioning.pooled is not None, "SD3 conditioning has pooled embeddings"
        return {"encoder_hidden_states": conditioning.embeds, "pooled_projections": conditioning.pooled}

    def expected_features(self, components: DiffusionComponents) -> dict[str, int | None]:
        config = components.unet.config
        return {
            "latent channels": config.in_channels,
            "text embedding width": config.joint_attention_dim,
            "pooled embedding width": config.pooled_projection_dim,
        }
