"""SDXL: a UNet on two CLIP text encoders (penultimate hidden states concatenated, pooled output of the second)
plus size-and-crop ids, DDPM noising, as diffusers' SDXL Diffusion-DPO training script conditions it."""

from __future__ import annotations

from typing import ClassVar

import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline
from torch import Tensor

from safetydpo.models.components import DiffusionComponents
from safetydpo.models.denoisers.base import DENOISERS, Conditioning
from safetydpo.models.denoisers.sd import DDPMFamily


@DENOISERS.register("sdxl")
class StableDiffusionXL(DDPMFamily):
    """Prompts are encoded by ``StableDiffusionXLPipeline.encode_prompt`` itself, so training sees what rendering sees.

    The micro-conditioning ``time_ids`` are (original size, crop top-left, target size) =
    (H, W, 0, 0, H, W) with H x W the image size of the latents: renders are uncropped, and the
    DataModule resizes and centre-crops images to the training resolution (diffusers' script records
    each image's size before resizing and its random crop; we do not keep them).
    """

    pipeline_classes: ClassVar[tuple[str, ...]] = ("StableDiffusionXLPipeline",)
    pipeline_class: ClassVar[type[DiffusionPipeline]] = StableDiffusionXLPipeline
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")

    def encode(self, components: DiffusionComponents, prompts: list[str]) -> Conditioning:
        encoder = self.prompt_pipeline(components)
        embeds, _, pooled, _ = encoder.encode_prompt(prompts, device=components.text_encoder.device, do_classifier_free_guidance=False)
        return Conditioning(embeds, pooled)

    def network_kwargs(self, components: DiffusionComponents, latents: Tensor, conditioning: Conditioning) -> dict[str, Tensor | dict[str, Tensor]]:
        assert conditioning.pooled is not None, "SDXL conditioning has pooled embeddings"
        scale = 2 ** (len(components.vae.config.block_out_channels) - 1)
        height, width = latents.shape[-2] * scale, latents.shape[-1] * scale
        time_ids = torch.tensor([height, width, 0, 0, height, width], device=latents.device, dtype=latents.dtype)
        return {
            "encoder_hidden_states": conditioning.embeds,
            "added_cond_kwargs": {"text_embeds": conditioning.pooled, "time_ids": time_ids.repeat(latents.shape[0], 1)},
        }

    def expected_features(self, components: DiffusionComponents) -> dict[str, int | None]:
        assert components.text_encoder_2 is not None
        return {
            "latent channels": components.unet.config.in_channels,
            "text embedding width": components.text_encoder.config.hidden_size + components.text_encoder_2.config.hidden_size,
            "pooled embedding width": components.text_encoder_2.config.projection_dim,
        }
