"""Small real components for the evaluation tests, built in code and saved the way real weights are.

A random open_clip / transformers CLIP (Q16, CLIPScore, FID-CLIP), a random LoRA for the tiny
pipeline and a fixed random FID feature extractor; nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from safetydpo.lora_files import save_lora
from safetydpo.models.lora import LoraSettings, attach_lora, lora_state_dict
from safetydpo.models.tiny import build_tiny_pipeline
from safetydpo.models.tokenizer import build_clip_tokenizer

EMBED_DIM = 16
TINY_OPEN_CLIP = {
    "embed_dim": EMBED_DIM,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def save_tiny_open_clip(folder: Path, seed: int = 0) -> str:
    """A random open_clip CLIP in ``local-dir:`` layout; returns the model string ClipSpec takes."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_OPEN_CLIP)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP, "preprocess_cfg": {}}))
    return f"local-dir:{folder}"


def save_tiny_hf_clip(folder: Path, seed: int = 0) -> Path:
    """A random transformers CLIPModel plus its processor, saved with save_pretrained."""
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    }
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=EMBED_DIM)).save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def save_random_lora(path: Path, seed: int = 1) -> Path:
    """A LoRA for the tiny pipeline with non-zero ``lora_B`` (so it changes renders), written by the project's exporter."""
    pipe = build_tiny_pipeline(0)
    settings = LoraSettings(rank=4)
    attach_lora(pipe.unet, settings)
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in pipe.unet.named_parameters():
        if "lora_B" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.5
    return save_lora(path, lora_state_dict(pipe.unet), settings.to_peft(), {"category": "sexual"})


def write_images(folder: Path, count: int, seed: int = 0, shift: int = 0, size: int = 32) -> Path:
    """``count`` random textured RGB images; ``shift`` brightens every pixel (a controlled distribution shift)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        base = rng.integers(0, 200, size=(size // 4, size // 4, 3)).repeat(4, axis=0).repeat(4, axis=1)
        Image.fromarray(np.clip(base + shift, 0, 255).astype(np.uint8)).save(folder / f"{index:03d}.png")
    return folder


class TinyFeatures(torch.nn.Module):
    """A fixed random conv net: clean-fid's custom-extractor contract (N x 3 x 299 x 299 in [0, 255] -> N x dim)."""

    def __init__(self, dim: int = 8, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.AvgPool2d(13), torch.nn.Conv2d(3, dim, 3), torch.nn.Tanh(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels / 255.0)
