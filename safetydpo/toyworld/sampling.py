"""Seeded, batched sampling from a ToyWorld-sized diffusers pipeline, and prompt-fidelity scoring."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from safetydpo.toyworld.classifier import ToyWorldClassifier
from safetydpo.toyworld.stream import HELDOUT_COMBINATIONS
from safetydpo.toyworld.world import ATTRIBUTES, RESOLUTION, caption
from safetydpo.progress import progress_bar


@dataclass(frozen=True)
class SamplingSettings:
    steps: int = 25
    guidance_scale: float = 5.0
    batch_size: int = 64


def sample_images(
    pipe: StableDiffusionPipeline, prompts: list[str], seeds: list[int], settings: SamplingSettings = SamplingSettings(), desc: str = "sampling"
) -> list[Image.Image]:
    """One image per (prompt, seed); a seed fixes the initial noise, so two prompts can share a layout."""
    images: list[Image.Image] = []
    for start in progress_bar(range(0, len(prompts), settings.batch_size), desc=desc):
        chunk = slice(start, start + settings.batch_size)
        generators = [torch.Generator().manual_seed(seed) for seed in seeds[chunk]]
        result = pipe(
            prompts[chunk], num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
            height=RESOLUTION, width=RESOLUTION, generator=generators, output_type="pil",
        )
        images.extend(result.images)
    return images


def heldout_prompts(count: int, seed: int) -> list[dict[str, str]]:
    """``count`` attribute sets drawn from the combinations pretraining never saw."""
    combos = sorted(HELDOUT_COMBINATIONS)
    rng = random.Random(seed)
    return [dict(zip(ATTRIBUTES, rng.choice(combos))) for _ in range(count)]


def attribute_fidelity(
    classifier: ToyWorldClassifier, images: list[Image.Image], prompted: list[dict[str, str]], ignored: list[str | None] | None = None
) -> dict[str, float]:
    """Share of images showing each prompted attribute, and all of them at once (``"all"``).

    ``ignored`` names, per image, an attribute left out of ``"all"`` (the harmful one, on unsafe prompts).
    """
    seen = classifier.attributes(images)
    skip = ignored or [None] * len(images)
    hits = {name: [s[name] == p[name] for s, p in zip(seen, prompted)] for name in ATTRIBUTES}
    scores = {name: sum(h) / len(h) for name, h in hits.items()}
    scores["all"] = sum(all(h[i] for name, h in hits.items() if name != skip[i]) for i in range(len(images))) / len(images)
    return scores


def heldout_fidelity(pipe: StableDiffusionPipeline, classifier: ToyWorldClassifier, count: int = 256, seed: int = 0) -> dict[str, float]:
    """Prompt following on unseen attribute combinations, as the judge reads the samples."""
    prompted = heldout_prompts(count, seed)
    images = sample_images(pipe, [caption(p) for p in prompted], [seed * 100_000 + i for i in range(count)], desc="held-out prompts")
    return attribute_fidelity(classifier, images, prompted)
