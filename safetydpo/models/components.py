"""Loading a Stable Diffusion checkpoint's components through diffusers/transformers ``from_pretrained``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer


@dataclass
class DiffusionComponents:
    """What DPO training needs from an SD 1.x/2.x checkpoint: the UNet to adapt plus frozen encoders."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler

    def cast(self, dtype: torch.dtype) -> DiffusionComponents:
        """Cast the UNet, VAE and text encoder to ``dtype`` in place, as ``load_components`` does on load."""
        for module in (self.unet, self.vae, self.text_encoder):
            # nn.Module.to: diffusers' override warns on every dtype cast, even with nothing to keep in float32.
            torch.nn.Module.to(module, dtype=dtype)
        return self


def components_from_pipeline(pipeline: StableDiffusionPipeline) -> DiffusionComponents:
    """A pipeline's components, with the DDPM noise schedule built from its scheduler config as on load."""
    return DiffusionComponents(
        unet=pipeline.unet,
        vae=pipeline.vae,
        text_encoder=pipeline.text_encoder,
        tokenizer=pipeline.tokenizer,
        noise_scheduler=DDPMScheduler.from_config(pipeline.scheduler.config),
    )


def _looks_local(name_or_path: str) -> bool:
    return name_or_path.startswith((".", "/", "~")) or Path(name_or_path).exists() or name_or_path.count("/") != 1


def load_components(
    name_or_path: str, revision: str | None = None, variant: str | None = None, dtype: torch.dtype = torch.float32
) -> DiffusionComponents:
    """Load from a local diffusers folder or a hub id (hub ids need a populated HF cache when offline).

    Weights are cast to ``dtype`` whatever precision they are stored in (the ToyWorld model is
    stored in fp16). The noise scheduler is always DDPM built from the checkpoint's scheduler
    config, so training uses its beta schedule and prediction type whatever sampler it ships with.
    """
    if _looks_local(name_or_path) and not (Path(name_or_path).expanduser() / "model_index.json").is_file():
        raise FileNotFoundError(
            f"pretrained model '{name_or_path}' is not a diffusers pipeline folder (no model_index.json there)"
        )
    path = str(Path(name_or_path).expanduser()) if _looks_local(name_or_path) else name_or_path
    common = {"revision": revision}
    weights = {"variant": variant, "dtype": dtype, **common}
    return DiffusionComponents(
        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", **weights),
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", **weights),
        text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **weights),
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **common),
        noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler", **common),
    )


def sampling_pipeline(components: DiffusionComponents, base_model: str) -> DiffusionPipeline:
    """A diffusers pipeline around the components in memory (LoRA attached), for samples during training.

    Only the sampler's config is read from ``base_model`` (the pipeline folder or hub id the components
    came from), so samples use the scheduler the model ships with, as evaluation does; the post-hoc safety
    checker is left out (we look at the model, not the filter).
    """
    path = str(Path(base_model).expanduser()) if _looks_local(base_model) else base_model
    try:
        pipe = DiffusionPipeline.from_pretrained(
            path,
            unet=components.unet,
            vae=components.vae,
            text_encoder=components.text_encoder,
            tokenizer=components.tokenizer,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"cannot build a sampling pipeline from '{base_model}': {err}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tokenize_prompts(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids padded (and truncated) to the tokenizer's full length, the context SD's text encoder expects."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids


@torch.no_grad()
def encode_prompts(components: DiffusionComponents, prompts: list[str]) -> torch.Tensor:
    """Text-encoder hidden states for ``prompts``."""
    ids = tokenize_prompts(components.tokenizer, prompts)
    return components.text_encoder(ids.to(components.text_encoder.device))[0]


@torch.no_grad()
def encode_images(vae: AutoencoderKL, pixels: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Scaled VAE latents of images in [-1, 1], sampled with one generator per image for reproducibility."""
    latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample(generators)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def freeze(*modules: torch.nn.Module) -> None:
    """Disable gradients and dropout for modules that only provide inputs or the reference."""
    for module in modules:
        module.requires_grad_(False)
        module.eval()
