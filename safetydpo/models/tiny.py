"""A Stable-Diffusion-architecture pipeline small enough to train on a CPU in seconds.

Tests and the quick-start job build it from configs in code, save it with ``save_pretrained``
and load it back through the same ``from_pretrained`` path a real SD 1.5 checkpoint takes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from collections.abc import Callable

from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from safetydpo.io import atomic_directory
from safetydpo.models.tokenizer import build_clip_tokenizer

TINY_RESOLUTION = 32


def build_tiny_pipeline(seed: int = 0, resolution: int = TINY_RESOLUTION, width: int = 32) -> StableDiffusionPipeline:
    """Randomly initialised SD pipeline: 2-level UNet with cross-attention, 2-level VAE, 2-layer CLIP text model."""
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=resolution // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(width, 2 * width),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=width,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        sample_size=resolution,
        in_channels=3,
        out_channels=3,
        block_out_channels=(width, width),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _clip_config(tokenizer: object, width: int, projection_dim: int | None = None) -> CLIPTextConfig:
    extra = {"projection_dim": projection_dim} if projection_dim else {}
    return CLIPTextConfig(
        vocab_size=len(tokenizer),  # type: ignore[arg-type]
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,  # type: ignore[attr-defined]
        bos_token_id=tokenizer.bos_token_id,  # type: ignore[attr-defined]
        eos_token_id=tokenizer.eos_token_id,  # type: ignore[attr-defined]
        pad_token_id=tokenizer.pad_token_id,  # type: ignore[attr-defined]
        **extra,
    )


def _tiny_vae(resolution: int, width: int, latent_channels: int = 4, **config: object) -> AutoencoderKL:
    return AutoencoderKL(
        sample_size=resolution,
        block_out_channels=(width, width),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=latent_channels,
        norm_num_groups=8,
        **config,
    )


def build_tiny_sdxl_pipeline(seed: int = 0, resolution: int = TINY_RESOLUTION, width: int = 16) -> StableDiffusionXLPipeline:
    """Randomly initialised SDXL pipeline: a 2-level UNet with SDXL's text-time embedding, two 2-layer CLIP encoders."""
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    text_encoder = CLIPTextModel(_clip_config(tokenizer, width))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer, width, projection_dim=width))
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=resolution // 2,
        block_out_channels=(2 * width, 4 * width),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * width,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + width,
        norm_num_groups=8,
    )
    return StableDiffusionXLPipeline(
        vae=_tiny_vae(resolution, width),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,  # SDXL's two tokenizers are both CLIP's BPE; building one is the slow part of a build
        unet=unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1),
    )


def build_tiny_sd3_pipeline(seed: int = 0, resolution: int = TINY_RESOLUTION, width: int = 16) -> StableDiffusion3Pipeline:
    """Randomly initialised SD3 pipeline: a 1-block MMDiT, two 2-layer CLIP encoders, no T5 (SD3's drop-T5 option)."""
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=resolution // 2,
        patch_size=2,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=2 * width,
        caption_projection_dim=16,
        pooled_projection_dim=2 * width,
        out_channels=4,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_vae(resolution, width, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=CLIPTextModelWithProjection(_clip_config(tokenizer, width, projection_dim=width)),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(tokenizer, width, projection_dim=width)),
        tokenizer_2=tokenizer,  # as SDXL's: both CLIP's BPE
        text_encoder_3=None,
        tokenizer_3=None,
    )


#: Tiny pipeline builders by model family (``safetydpo.models.denoisers`` names).
TINY_BUILDERS: dict[str, Callable[..., DiffusionPipeline]] = {
    "sd": build_tiny_pipeline, "sdxl": build_tiny_sdxl_pipeline, "sd3": build_tiny_sd3_pipeline,
}


def save_tiny_pipeline(out_dir: str | Path, seed: int = 0, family: str = "sd") -> Path:
    """Build the tiny pipeline of ``family`` and write it atomically in diffusers' folder layout."""
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        TINY_BUILDERS[family](seed).save_pretrained(tmp, safe_serialization=True)
    return out_dir
