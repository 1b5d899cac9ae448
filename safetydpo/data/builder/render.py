"""Rendering pairs with the model being aligned: both prompts, same seed, same settings, one batch."""

from __future__ import annotations

from dataclasses import dataclass

import diffusers
import torch
from diffusers import SchedulerMixin, StableDiffusionPipeline
from PIL import Image

from safetydpo.data.builder.config import RenderConfig
from safetydpo.data.builder.devices import resolve_device_dtype
from safetydpo.data.builder.errors import BuildError
from safetydpo.models.components import encode_prompts, load_components


@dataclass
class RenderedPairs:
    """Renders of a batch of pairs; latents are the sampler's final latents (scaled, as the UNet sees them)."""

    unsafe_images: list[Image.Image]
    safe_images: list[Image.Image]
    unsafe_latents: torch.Tensor
    safe_latents: torch.Tensor
    unsafe_embeds: torch.Tensor


class PairRenderer:
    """A diffusers Stable Diffusion pipeline built from the same components training loads.

    The components come from ``load_components`` and the prompt embeddings from ``encode_prompts``,
    exactly as ``DPOExpertModule`` computes them, so the stored ``prompt_embeds`` are the training
    condition. The pipeline's safety checker is never loaded: it would black out the unsafe
    renders the dataset needs as losers.
    """

    def __init__(self, config: RenderConfig) -> None:
        self.config = config
        device, dtype = resolve_device_dtype(config.device, config.dtype, "render")
        self.components = load_components(config.base_model, variant=config.variant)
        pipe = StableDiffusionPipeline.from_pretrained(
            config.base_model,
            unet=self.components.unet,
            vae=self.components.vae,
            text_encoder=self.components.text_encoder,
            tokenizer=self.components.tokenizer,
            safety_checker=None,
            feature_extractor=None,
            image_encoder=None,
            requires_safety_checker=False,
        )
        if config.scheduler:
            scheduler_cls = getattr(diffusers, config.scheduler, None)
            if not (isinstance(scheduler_cls, type) and issubclass(scheduler_cls, SchedulerMixin)):
                raise BuildError(f"render.scheduler '{config.scheduler}' is not a diffusers scheduler class (e.g. DDIMScheduler)")
            pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
        pipe.to(device)
        if pipe.unet.dtype != dtype:  # cast only when needed: diffusers warns on every dtype cast
            pipe.to(dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe

    @torch.inference_mode()
    def render(self, unsafe_prompts: list[str], safe_prompts: list[str], seeds: list[int]) -> RenderedPairs:
        """One pipeline call over unsafe + safe prompts; pair ``i`` starts both renders from seed ``seeds[i]``."""
        count = len(seeds)
        embeds = encode_prompts(self.components, unsafe_prompts + safe_prompts)
        negative = encode_prompts(self.components, [self.config.negative_prompt]).repeat(len(embeds), 1, 1)
        generators = [torch.Generator().manual_seed(seed) for seed in seeds * 2]
        latents = self.pipe(
            prompt_embeds=embeds,
            negative_prompt_embeds=negative,
            generator=generators,
            num_inference_steps=self.config.steps,
            guidance_scale=self.config.guidance_scale,
            height=self.config.height,
            width=self.config.width,
            output_type="latent",
        ).images
        vae = self.pipe.vae
        pixels = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        images = self.pipe.image_processor.postprocess(pixels, output_type="pil")
        latents, embeds = latents.float().cpu(), embeds.float().cpu()
        return RenderedPairs(
            unsafe_images=images[:count],
            safe_images=images[count:],
            unsafe_latents=latents[:count],
            safe_latents=latents[count:],
            unsafe_embeds=embeds[:count],
        )
