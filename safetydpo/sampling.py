"""Speed options of the denoising loop, shared by the dataset renderer (``render.speed``) and the evaluation
generator (``generation.speed``).

None of them changes what is drawn beyond float rounding (like another batch size), so they are not part
of a build's fingerprint or of an evaluation's ``render.json``: a resumed run may switch them.
Precision is the ``dtype`` key next to them (bf16 and fp16 are the big win on GPUs); batching by equal
sampler settings is ``batch_size``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline

ATTENTION = ("sdpa", "eager")


@dataclass
class SpeedConfig:
    """How the sampler's networks run (docs/performance.md); the defaults are diffusers' own."""

    attention: str = "sdpa"
    """``sdpa``: diffusers' default processors, which call PyTorch's scaled_dot_product_attention (flash or
    memory-efficient kernels on CUDA); ``eager``: softmax(QKᵀ)V written out (``AttnProcessor``), for comparison."""
    channels_last: bool = False
    """NHWC memory layout for the denoiser's and VAE's convolutions (faster on recent GPUs, most with ``compile``)."""
    compile: bool = False
    """``torch.compile`` the denoiser and the VAE decoder; the first batch (and each new batch shape) is slow while it compiles."""

    def check(self, key: str, error: type[ValueError]) -> None:
        """``key`` names the config section in the one-line error."""
        if self.attention not in ATTENTION:
            raise error(f"{key}.attention '{self.attention}' is not one of: {', '.join(ATTENTION)}")


def speed_up(pipe: DiffusionPipeline, speed: SpeedConfig, key: str, error: type[ValueError]) -> DiffusionPipeline:
    """Apply ``speed`` to ``pipe`` in place (after its weights are final: LoRA fused, device and dtype set)."""
    speed.check(key, error)
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if denoiser is None:
        raise error(f"{key}: the pipeline {type(pipe).__name__} has neither a unet nor a transformer to speed up")
    if speed.attention == "eager":
        if not hasattr(denoiser, "set_default_attn_processor"):
            raise error(f"{key}.attention eager: {type(denoiser).__name__} has no default attention processor; use sdpa")
        denoiser.set_default_attn_processor()
    if speed.channels_last:
        denoiser.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if speed.compile:
        name = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
        setattr(pipe, name, torch.compile(denoiser))
        pipe.vae.decode = torch.compile(pipe.vae.decode)
    return pipe
