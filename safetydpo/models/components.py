"""Loading a diffusion checkpoint's components (any family with a registered denoiser) through ``from_pretrained``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, SchedulerMixin
from transformers import CLIPTokenizer, PreTrainedModel, PreTrainedTokenizerBase

if TYPE_CHECKING:
    from safetydpo.models.denoisers.base import Conditioning, Denoiser


def _sd_family() -> Denoiser:
    from safetydpo.models.denoisers.sd import StableDiffusion

    return StableDiffusion()


@dataclass
class DiffusionComponents:
    """What DPO training needs from a checkpoint: the network to adapt plus frozen encoders, and its family.

    ``unet`` is the adapted network whatever the family (SD3's is a transformer; the family's
    ``network_name`` says which). Text encoders beyond the first are ``None`` where the family or
    the checkpoint has none (SD 1.x/2.x; SD3 without T5).
    """

    unet: torch.nn.Module
    vae: AutoencoderKL
    text_encoder: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    noise_scheduler: SchedulerMixin
    text_encoder_2: PreTrainedModel | None = None
    tokenizer_2: PreTrainedTokenizerBase | None = None
    text_encoder_3: PreTrainedModel | None = None
    tokenizer_3: PreTrainedTokenizerBase | None = None
    denoiser: Denoiser = field(default_factory=_sd_family)

    def encoders(self) -> list[torch.nn.Module]:
        """The frozen input modules: the VAE and every text encoder present."""
        return [m for m in (self.vae, self.text_encoder, self.text_encoder_2, self.text_encoder_3) if m is not None]

    def modules(self) -> dict[str, Any]:
        """Every model and tokenizer present, under its pipeline component name (the network as ``unet`` or ``transformer``)."""
        named = {self.denoiser.network_name: self.unet, "vae": self.vae}
        for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"):
            if getattr(self, name) is not None:
                named[name] = getattr(self, name)
        return named

    def cast(self, dtype: torch.dtype) -> DiffusionComponents:
        """Cast the network, VAE and text encoders to ``dtype`` in place, as ``load_components`` does on load."""
        for module in (self.unet, *self.encoders()):
            # nn.Module.to: diffusers' override warns on every dtype cast, even with nothing to keep in float32.
            torch.nn.Module.to(module, dtype=dtype)
        return self


def components_from_pipeline(pipeline: DiffusionPipeline) -> DiffusionComponents:
    """A pipeline's components, with the training noise schedule built from its scheduler config as on load."""
    from safetydpo.models.denoisers.base import denoiser_for_index

    denoiser = denoiser_for_index({"_class_name": type(pipeline).__name__}, f"pipeline {type(pipeline).__name__}")
    return denoiser.assemble(
        {name: getattr(pipeline, name, None) for name in denoiser.component_names()}, pipeline.scheduler.config
    )


def _looks_local(name_or_path: str) -> bool:
    return name_or_path.startswith((".", "/", "~")) or Path(name_or_path).exists() or name_or_path.count("/") != 1


def load_components(
    name_or_path: str, revision: str | None = None, variant: str | None = None, dtype: torch.dtype = torch.float32
) -> DiffusionComponents:
    """Load from a local diffusers folder or a hub id (hub ids need a populated HF cache when offline).

    The family comes from the folder's ``model_index.json``. Weights are cast to ``dtype`` whatever
    precision they are stored in (the ToyWorld model is stored in fp16). The noise scheduler is the
    family's training scheduler (DDPM, or flow matching for SD3) built from the checkpoint's scheduler
    config, so training uses its schedule and prediction type whatever sampler it ships with.
    """
    from safetydpo.models.denoisers.base import denoiser_for

    if _looks_local(name_or_path) and not (Path(name_or_path).expanduser() / "model_index.json").is_file():
        raise FileNotFoundError(
            f"pretrained model '{name_or_path}' is not a diffusers pipeline folder (no model_index.json there)"
        )
    path = str(Path(name_or_path).expanduser()) if _looks_local(name_or_path) else name_or_path
    return denoiser_for(path, revision).load(path, revision=revision, variant=variant, dtype=dtype)


def sampling_pipeline(components: DiffusionComponents, base_model: str) -> DiffusionPipeline:
    """A diffusers pipeline around the components in memory (LoRA attached), for samples and renders.

    Only the sampler's config is read from ``base_model`` (the pipeline folder or hub id the components
    came from), so samples use the scheduler the model ships with, as evaluation does. Components the
    folder lists but training does not load (SD's post-hoc safety checker, image encoders) are left
    out: we look at the model, not the filter.
    """
    from safetydpo.models.denoisers.base import pipeline_index, unstored_components

    path = str(Path(base_model).expanduser()) if _looks_local(base_model) else base_model
    try:
        index = pipeline_index(path)
        loaded = components.modules()
        listed = {name: None for name, value in index.items() if isinstance(value, list) and name != "scheduler"}
        absent = {name: None for name in {**listed, **unstored_components(index)} if name not in loaded}
        no_checker = {"requires_safety_checker": False} if "safety_checker" in index else {}
        pipe = DiffusionPipeline.from_pretrained(path, **loaded, **absent, **no_checker)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"cannot build a sampling pipeline from '{base_model}': {err}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tokenize_prompts(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids padded (and truncated) to the tokenizer's full length, the context SD's text encoder expects."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids


@torch.no_grad()
def encode_conditioning(components: DiffusionComponents, prompts: list[str]) -> Conditioning:
    """The family's prompt conditioning (token embeddings, pooled embeddings where it has them)."""
    return components.denoiser.encode(components, prompts)


def encode_prompts(components: DiffusionComponents, prompts: list[str]) -> torch.Tensor:
    """Text-encoder hidden states for ``prompts`` (the token embeddings of ``encode_conditioning``)."""
    return encode_conditioning(components, prompts).embeds


@torch.no_grad()
def encode_images(vae: AutoencoderKL, pixels: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Scaled VAE latents of images in [-1, 1], sampled with one generator per image for reproducibility."""
    latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample(generators)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] from latents scaled as ``encode_images`` scales them."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return vae.decode(latents / vae.config.scaling_factor + shift, return_dict=False)[0]


def freeze(*modules: torch.nn.Module) -> None:
    """Disable gradients and dropout for modules that only provide inputs or the reference."""
    for module in modules:
        module.requires_grad_(False)
        module.eval()
