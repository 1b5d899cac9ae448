"""Model families (SD 1.x/2.x, SDXL, SD3), one registered ``Denoiser`` per file, chosen from ``model_index.json``."""

from safetydpo.models.denoisers.base import DENOISERS, Conditioning, Denoiser, UnsupportedModelError, denoiser_for, denoiser_for_index
from safetydpo.models.denoisers.sd import StableDiffusion
from safetydpo.models.denoisers.sd3 import StableDiffusion3
from safetydpo.models.denoisers.sdxl import StableDiffusionXL

__all__ = [
    "DENOISERS", "Conditioning", "Denoiser", "StableDiffusion", "StableDiffusion3", "StableDiffusionXL",
    "UnsupportedModelError", "denoiser_for", "denoiser_for_index",
]
