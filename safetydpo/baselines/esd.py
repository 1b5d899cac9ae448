"""ESD-u (Gandikota et al., ICCV 2023): a LoRA trained so the concept prompt predicts negatively guided noise."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from torch import Tensor

from safetydpo.baselines.base import BaselineError, check_family
from safetydpo.data.concepts import ConceptBatch
from safetydpo.models.components import encode_prompts
from safetydpo.models.expert import DPOExpertModule
from safetydpo.models.inputs import NOISE_STREAM, pair_generators
from safetydpo.quiet import ignore_warnings

#: ESD-u's LoRA targets: every attention and feed-forward layer except cross-attention (the paper's "noxattn").
NON_CROSS_ATTENTION = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


class ESDModule(DPOExpertModule):
    """``min ||eps_θ(x_t, c, t) − [eps*(x_t, ∅, t) − η (eps*(x_t, c, t) − eps*(x_t, ∅, t))]||²``, eps* the frozen model.

    Loading, LoRA, optimiser, checkpoints and export are ``DPOExpertModule``'s (``lora.target_modules``
    chooses the layers: ESD-u trains all but cross-attention, ``NON_CROSS_ATTENTION``); batches are
    concept prompts (``ConceptPromptDataModule``). ``x_t``: per step, seeded noise denoised by DDIM
    for a random number of the ``sampling_steps`` steps with the *frozen* model under the concept prompt at
    ``sample_guidance`` (ESD's code samples with the model being trained; the frozen one keeps the
    targets a fixed regression problem), and ``t`` is the DDIM timestep reached.

    Args:
        base_model: an SD 1.x/2.x diffusers pipeline folder or hub id.
        negative_guidance: η, how far past the unconditional prediction the concept is pushed (ESD: 1.0).
        sampling_steps: DDIM steps of the schedule ``x_t`` is drawn from (ESD: 50).
        sample_guidance: classifier-free guidance while drawing ``x_t`` (ESD: 3.0).
        **kwargs: ``DPOExpertModule``'s arguments (``lora``, ``learning_rate``, ``noise_seed``, ...).
    """

    def __init__(
        self, base_model: str, negative_guidance: float = 1.0, sampling_steps: int = 50, sample_guidance: float = 3.0, **kwargs: Any
    ) -> None:
        check_family(base_model, "esd_u", "model.init_args.base_model")
        if not (math.isfinite(negative_guidance) and negative_guidance > 0):
            raise BaselineError(f"esd_u: negative_guidance must be a finite number > 0 (ESD uses 1.0), got {negative_guidance}")
        if sampling_steps < 1:
            raise BaselineError(f"esd_u: sampling_steps must be >= 1 (ESD uses 50), got {sampling_steps}")
        if not math.isfinite(sample_guidance):
            raise BaselineError(f"esd_u: sample_guidance must be a finite number (ESD uses 3.0), got {sample_guidance}")
        super().__init__(base_model, **kwargs)
        # Concept prompts come without held-out preference pairs, so the inherited validation step never has a loader.
        ignore_warnings(r"You defined a `validation_step` but have no `val_dataloader`")
        self.sampler = DDIMScheduler.from_config(self.noise_scheduler.config)
        self.sampler.set_timesteps(sampling_steps)

    def _frozen(self, latents: Tensor, timestep: Tensor, embeds: Tensor) -> Tensor:
        self.unet.disable_adapters()
        try:
            return self.unet(latents, timestep, encoder_hidden_states=embeds).sample
        finally:
            self.unet.enable_adapters()

    def esd_errors(self, batch: ConceptBatch, step: int) -> Tensor:
        """Per-prompt squared error of the adapted prediction against ESD's target at ``step``'s seeded ``x_t``."""
        seed = self.hparams.noise_seed
        config = self.unet.config
        shape = (config.in_channels, config.sample_size, config.sample_size)
        noise = torch.stack([torch.randn(shape, generator=g) for g in pair_generators(seed, step, batch.positions, NOISE_STREAM)])
        rng = np.random.default_rng(np.random.SeedSequence([seed, step, len(batch)]))
        stop = int(rng.integers(0, len(self.sampler.timesteps)))
        embeds = encode_prompts(self.components, batch.prompts)
        empty = encode_prompts(self.components, [""]).expand_as(embeds)
        latents = noise.to(embeds) * self.sampler.init_noise_sigma
        with torch.no_grad():
            for timestep in self.sampler.timesteps[:stop]:
                uncond, cond = self._frozen(torch.cat([latents, latents]), timestep, torch.cat([empty, embeds])).chunk(2)
                guided = uncond + self.hparams.sample_guidance * (cond - uncond)
                latents = self.sampler.step(guided, timestep, latents).prev_sample
            timestep = self.sampler.timesteps[stop]
            uncond, cond = self._frozen(torch.cat([latents, latents]), timestep, torch.cat([empty, embeds])).chunk(2)
            target = uncond - self.hparams.negative_guidance * (cond - uncond)
        prediction = self.unet(latents, timestep, encoder_hidden_states=embeds).sample
        return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))

    def training_step(self, batch: ConceptBatch, batch_idx: int) -> Tensor:
        loss = self.esd_errors(batch, self.global_step).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"esd_u loss is not finite at step {self.global_step}; lower the learning rate")
        self.log("train/loss", loss, on_step=True, prog_bar=False, batch_size=len(batch))  # the name progress lines show
        self.log("train_loss", loss, on_step=True, prog_bar=True, batch_size=len(batch))
        return loss
