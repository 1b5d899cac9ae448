"""Pretraining the ToyWorld text-to-image model: a small Stable Diffusion, trained from scratch.

Stage 1 fits an AutoencoderKL (32x32 RGB <-> 4x8x8 latents) on renders; stage 2 fits the
UNet2DConditionModel and the CLIP text model together on latents of captioned renders, with 10%
of captions dropped so classifier-free guidance works. Held-out attribute combinations are never
shown, so prompt following is measured on unseen prompts. Both stages are Lightning loops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from safetydpo.io import atomic_directory
from safetydpo.models.components import tokenize_prompts
from safetydpo.models.tokenizer import build_clip_tokenizer
from safetydpo.toyworld.stream import SceneStream
from safetydpo.toyworld.world import RESOLUTION

DEFAULT_PIPELINE = Path(__file__).parent / "assets" / "pipeline"
MAX_PROMPT_TOKENS = 20  # ToyWorld captions are at most 12 tokens; short contexts keep CPU training fast
SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


@dataclass
class PretrainSettings:
    """Steps and sizes of both stages; the defaults are the committed model's recipe."""

    seed: int = 0
    """Seed of the weights, the scene stream and every batch."""
    vae_steps: int = 1600
    """Stage 1: VAE training steps."""
    vae_batch_size: int = 32
    """Stage 1: images per VAE step."""
    vae_learning_rate: float = 2e-3
    """Stage 1: VAE learning rate."""
    diffusion_steps: int = 5000
    """Stage 2: UNet + text encoder training steps."""
    diffusion_batch_size: int = 128
    """Stage 2: captioned latents per step."""
    pool_size: int = 50_000
    """Stage 2: scenes encoded once into the latent pool the steps draw from."""
    learning_rate: float = 1e-3
    """Stage 2: UNet and text encoder learning rate."""
    prompt_dropout: float = 0.1
    """Stage 2: share of captions replaced by the empty prompt (for classifier-free guidance)."""


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        sample_size=RESOLUTION, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=16, mid_block_add_attention=False,
    )


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=MAX_PROMPT_TOKENS, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    )


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
    )


def _cosine_with_warmup(optimizer: torch.optim.Optimizer, total: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class VAEPretrainer(LightningModule):
    """Reconstruction (L1 + MSE) with a small KL term, as latent-diffusion autoencoders are trained."""

    def __init__(self, vae: AutoencoderKL, learning_rate: float, total_steps: int, kl_weight: float = 1e-6) -> None:
        super().__init__()
        self.vae = vae
        self.learning_rate, self.total_steps, self.kl_weight = learning_rate, total_steps, kl_weight

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        pixels = batch["pixels"] * 2 - 1
        posterior = self.vae.encode(pixels).latent_dist
        reconstruction = self.vae.decode(posterior.sample()).sample
        loss = F.l1_loss(reconstruction, pixels) + F.mse_loss(reconstruction, pixels) + self.kl_weight * posterior.kl().mean()
        self.log("vae_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.vae.parameters(), lr=self.learning_rate)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": _cosine_with_warmup(optimizer, self.total_steps, 50), "interval": "step"}}


class LatentPool(Dataset):
    """Captioned renders encoded once: (scaled VAE latent mean, scaled std, prompt token ids).

    Encoding every render and tokenising every caption once instead of every step makes the
    diffusion stage cost only the UNet and text encoder; latents are still sampled from the
    posterior at every step.
    """

    def __init__(self, vae: AutoencoderKL, tokenizer: CLIPTokenizer, size: int, seed: int, batch_size: int = 256) -> None:
        means, stds, ids = [], [], []
        scale = vae.config.scaling_factor
        stream = iter(DataLoader(SceneStream(seed, split="train"), batch_size=batch_size))
        with torch.no_grad():
            for _ in tqdm(range(math.ceil(size / batch_size)), desc="encoding renders"):
                batch = next(stream)
                posterior = vae.encode(batch["pixels"] * 2 - 1).latent_dist
                means.append(posterior.mean * scale)
                stds.append(posterior.std * scale)
                ids.append(tokenize_prompts(tokenizer, batch["prompt"]))
        self.means, self.stds, self.input_ids = torch.cat(means), torch.cat(stds), torch.cat(ids)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"mean": self.means[index], "std": self.stds[index], "input_ids": self.input_ids[index]}


class DiffusionPretrainer(LightningModule):
    """Epsilon-prediction loss for UNet and text encoder together, on pooled VAE latents."""

    def __init__(self, settings: PretrainSettings, tokenizer: CLIPTokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = build_text_encoder(self.tokenizer)
        self.unet = build_unet()
        self.scheduler = DDPMScheduler(**SCHEDULE)
        self.settings = settings
        self.register_buffer("empty_prompt_ids", tokenize_prompts(self.tokenizer, [""])[0], persistent=False)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        latents = batch["mean"] + batch["std"] * torch.randn_like(batch["std"])
        # One scalar draw per sample, the RNG sequence the committed model was trained with.
        dropped = torch.tensor([bool(torch.rand(()) < self.settings.prompt_dropout) for _ in range(len(latents))], device=self.device)
        ids = torch.where(dropped[:, None], self.empty_prompt_ids, batch["input_ids"])
        embeds = self.text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],), device=self.device)
        prediction = self.unet(self.scheduler.add_noise(latents, noise, timesteps), timesteps, encoder_hidden_states=embeds).sample
        loss = F.mse_loss(prediction, noise)
        self.log("diffusion_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        optimizer = torch.optim.AdamW(params, lr=self.settings.learning_rate, weight_decay=1e-2)
        total = self.settings.diffusion_steps
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": _cosine_with_warmup(optimizer, total, 200), "interval": "step"}}


def _fit(module: LightningModule, steps: int, loader: DataLoader) -> None:
    trainer = Trainer(max_steps=steps, max_epochs=-1, accelerator="auto", devices=1, logger=False,
                      enable_checkpointing=False, enable_model_summary=False, gradient_clip_val=1.0)
    trainer.fit(module, loader)


@torch.no_grad()
def _latent_scale(vae: AutoencoderKL, seed: int) -> float:
    """1 / std of the latents, so the UNet sees unit-variance inputs (SD's 0.18215, measured here)."""
    batch = next(iter(DataLoader(SceneStream(seed + 7, split="train"), batch_size=512)))
    return float(1.0 / vae.encode(batch["pixels"] * 2 - 1).latent_dist.mean.std())


def pretrain(out_dir: str | Path, settings: PretrainSettings) -> StableDiffusionPipeline:
    """Run both stages and write the pipeline (fp16 safetensors, diffusers layout) atomically."""
    seed_everything(settings.seed, workers=True)
    vae = build_vae()
    renders = DataLoader(SceneStream(settings.seed, split="train"), batch_size=settings.vae_batch_size)
    _fit(VAEPretrainer(vae, settings.vae_learning_rate, settings.vae_steps), settings.vae_steps, renders)
    vae.eval().requires_grad_(False).register_to_config(scaling_factor=_latent_scale(vae, settings.seed))
    tokenizer = build_clip_tokenizer(MAX_PROMPT_TOKENS)
    pool = LatentPool(vae, tokenizer, settings.pool_size, settings.seed + 1)  # before the models: its loader draws from the RNG
    generator = torch.Generator().manual_seed(settings.seed)
    diffusion = DiffusionPretrainer(settings, tokenizer)
    _fit(diffusion, settings.diffusion_steps, DataLoader(pool, settings.diffusion_batch_size, shuffle=True, generator=generator, drop_last=True))
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=diffusion.text_encoder, tokenizer=diffusion.tokenizer, unet=diffusion.unet,
        scheduler=DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    with atomic_directory(out_dir) as tmp:
        pipeline.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    return pipeline.to(torch.float32)
