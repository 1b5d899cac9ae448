"""Rendering pairs with the model being aligned: both prompts, same seed, same settings, one batch."""

from __future__ import annotations

from dataclasses import dataclass

import diffusers
import torch
from diffusers import SchedulerMixin
from PIL import Image

from safetydpo.data.builder.config import RenderConfig
from safetydpo.data.builder.devices import resolve_device_dtype
from safetydpo.data.builder.errors import BuildError
from safetydpo.models.components import decode_latents, encode_conditioning, load_components, sampling_pipeline
from safetydpo.sampling import speed_up


@dataclass
class RenderedPairs:
    """Renders of a batch of pairs; latents are the sampler's final latents (scaled, as the UNet sees them)."""

    unsafe_images: list[Image.Image]
    safe_images: list[Image.Image]
    unsafe_latents: torch.Tensor
    safe_latents: torch.Tensor
    unsafe_embeds: torch.Tensor
    unsafe_pooled: torch.Tensor | None  # SDXL / SD3: pooled text embeddings


class PairRenderer:
    """The model family's diffusers pipeline (SD, SDXL, SD3) built from the same components training loads.

    The components come from ``load_components`` and the prompt conditioning from ``encode_conditioning``,
    exactly as ``DPOExpertModule`` computes them, so the stored ``prompt_embeds`` are the training
    condition. The pipeline's safety checker is never loaded: it would black out the unsafe
    renders the dataset needs as losers.
    """

    def __init__(self, config: RenderConfig) -> None:
        self.config = config
        device, dtype = resolve_device_dtype(config.device, config.dtype, "render")
        self.components = load_components(config.base_model, variant=config.variant)
        pipe = sampling_pipeline(self.components, config.base_model)
        if config.scheduler:
            scheduler_cls = getattr(diffusers, config.scheduler, None)
            if not (isinstance(scheduler_cls, type) and issubclass(scheduler_cls, SchedulerMixin)):
                raise BuildError(f"render.scheduler '{config.scheduler}' is not a diffusers scheduler class (e.g. DDIMScheduler)")
            pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
        pipe.to(device)
        if self.components.unet.dtype != dtype:  # cast only when needed: diffusers warns on every dtype cast
            pipe.to(dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        speed_up(pipe, config.speed, "render.speed", BuildError)
        self.pipe = pipe

    @torch.inference_mode()
    def render(self, unsafe_prompts: list[str], safe_prompts: list[str], seeds: list[int]) -> RenderedPairs:
        """One pipeline call over unsafe + safe prompts; pair ``i`` starts both renders from seed ``seeds[i]``."""
        count = len(seeds)
        conditioning = encode_conditioning(self.components, unsafe_prompts + safe_prompts)
        negative = encode_conditioning(self.components, [self.config.negative_prompt]).repeat(2 * count)
        generators = [torch.Generator().manual_seed(seed) for seed in seeds * 2]
        latents = self.pipe(
            **conditioning.pipeline_kwargs(negative),
            generator=generators,
            num_inference_steps=self.config.steps,
            guidance_scale=self.config.guidance_scale,
            height=self.config.height,
            width=self.config.width,
            output_type="latent",
        ).images
        images = self.pipe.image_processor.postprocess(decode_latents(self.pipe.vae, latents), output_type="pil")
        latents, embeds = latents.float().cpu(), conditioning.embeds.float().cpu()
        pooled = None if conditioning.pooled is None else conditioning.pooled[:count].float().cpu()
        return RenderedPairs(
            unsafe_images=images[:count],
            safe_images=images[count:],
            unsafe_latents=latents[:count],
            safe_latents=latents[count:],
            unsafe_embeds=embeds[:count],
            unsafe_pooled=pooled,
        )
