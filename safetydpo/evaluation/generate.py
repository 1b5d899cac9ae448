"""Rendering evaluation images: batched, seeded per image, cached on disk so a rerun renders only what is missing.

An image's file name holds its prompt row, a digest of (prompt, guidance, size) and its seed, so
a cached file is reused only for exactly that render; model-wide settings (pipeline, LoRA
contents, steps, dtype) are recorded in ``render.json`` per model folder and a mismatch is an error.
"""

from __future__ import annotations

import hashlib
import json
from functools import partial
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline

from safetydpo.evaluation.config import GenerationConfig, ModelConfig
from safetydpo.evaluation.errors import EvaluationError
from safetydpo.evaluation.prompts import EvalPrompt
from safetydpo.evaluation.sld import check_sld, safe_pipeline, sld_settings
from safetydpo.io import OverlappedWrites, save_png, write_json_atomic
from safetydpo.lora_files import LoraFileError, load_lora, lora_content_sha256
from safetydpo.models.denoisers.base import unstored_components
from safetydpo.quiet import drop_log_messages
from safetydpo.progress import progress_bar

RENDER_RECORD = "render.json"


@dataclass(frozen=True)
class PlannedImage:
    """One image to render (or reuse): prompt, its own seed, sampler settings and cache path."""

    prompt: EvalPrompt
    seed: int
    guidance_scale: float
    height: int | None
    width: int | None
    path: Path


def plan_images(
    prompts: list[EvalPrompt], images_per_prompt: int, generation: GenerationConfig, folder: Path
) -> list[PlannedImage]:
    """Image ``k`` of a prompt uses seed ``first + k``; ``first`` is the prompt file's seed, else ``generation.seed``.

    A negative seed is unknown (``safetydpo data import`` stores -1 for renders it did not make), so it
    falls back to ``generation.seed`` too.
    """
    planned = []
    for prompt in prompts:
        guidance = prompt.guidance_scale if prompt.guidance_scale is not None else generation.guidance_scale
        height, width = prompt.height or generation.height, prompt.width or generation.width
        first = prompt.seed if prompt.seed is not None and prompt.seed >= 0 else generation.seed
        digest = hashlib.sha1(f"{prompt.text}\0{guidance}\0{height}x{width}".encode()).hexdigest()[:10]
        for k in range(images_per_prompt):
            path = folder / f"{prompt.index:05d}-{digest}-s{first + k}.png"
            planned.append(PlannedImage(prompt, first + k, guidance, height, width, path))
    return planned


def check_model(model: ModelConfig) -> None:
    """The pipeline folder and LoRA file exist (checked before any work starts)."""
    if not (Path(model.base_model).expanduser() / "model_index.json").is_file():
        raise EvaluationError(
            f"model '{model.name}': {model.base_model} is not a diffusers pipeline folder (no model_index.json)"
        )
    if model.lora and not Path(model.lora).expanduser().is_file():
        raise EvaluationError(f"model '{model.name}': LoRA file {model.lora} does not exist")
    check_sld(model)


def lora_identity(model: ModelConfig) -> str | None:
    """The content hash of ``model``'s LoRA (None without one); a broken file is refused here, before any cache is touched."""
    if not model.lora:
        return None
    lora = Path(model.lora).expanduser()
    try:
        return lora_content_sha256(lora)
    except (LoraFileError, OSError) as err:
        raise lora_error(model, lora, err) from err


def lora_error(model: ModelConfig, lora: Path, err: Exception) -> EvaluationError:
    """The one line for a LoRA file that cannot be read or loaded."""
    return EvaluationError(f"model '{model.name}': cannot load LoRA {lora}: {' '.join(str(err).split())}")


def render_settings(model: ModelConfig, generation: GenerationConfig, dtype: torch.dtype) -> dict[str, Any]:
    """What every image of a model depends on beyond its prompt and seed (the LoRA by content, so a retrained file counts)."""
    return {
        "base_model": str(Path(model.base_model).expanduser().resolve()),
        "lora_content_sha256": lora_identity(model),
        "num_inference_steps": generation.num_inference_steps,
        "dtype": str(dtype).removeprefix("torch."),
        **({"sld": sld_settings(model)} if model.sld else {}),  # absent without SLD: caches of plain models stay valid
    }


def claim_folder(folder: Path, settings: dict[str, Any]) -> None:
    """Record the settings of a model's image folder; refuse to mix in images rendered differently."""
    record = folder / RENDER_RECORD
    if record.is_file():
        previous = json.loads(record.read_text(encoding="utf-8"))
        changed = sorted(key for key in settings.keys() | previous.keys() if settings.get(key) != previous.get(key))
        if changed:
            raise EvaluationError(
                f"{folder} holds images rendered with other settings ({', '.join(changed)} differ); delete it or rename the model"
            )
    else:
        write_json_atomic(record, settings)


def load_pipeline(model: ModelConfig, device: torch.device, dtype: torch.dtype) -> DiffusionPipeline:
    """The base pipeline with the LoRA loaded and SD's post-hoc safety checker off (we measure the model, not the filter)."""
    folder = Path(model.base_model).expanduser()
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    no_checker = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
    pipe = DiffusionPipeline.from_pretrained(folder, dtype=dtype, **{**unstored_components(index), **no_checker})
    if model.lora:
        # Our LoRAs adapt the UNet only; diffusers says so for the text encoder on every load.
        drop_log_messages("diffusers.loaders.lora_base", r"^No LoRA keys associated to CLIPTextModel")
        lora = Path(model.lora).expanduser()
        try:
            load_lora(lora)  # refuses what would render garbage (non-finite weights) or what diffusers would choke on
            pipe.load_lora_weights(str(lora))
        except (LoraFileError, ValueError, KeyError, RuntimeError, OSError) as err:
            raise lora_error(model, lora, err) from err
        # Folded into the base weights: the same model without the adapter's extra matrix products per layer
        # on every denoising step (differences are float rounding, as between batch sizes).
        pipe.fuse_lora()
    if model.sld:
        pipe = safe_pipeline(pipe, model)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def check_render(picture: np.ndarray, image: PlannedImage, description: str) -> None:
    """Refuse a render that is not finite or a single colour: broken weights (a NaN LoRA renders black), not a
    result to score and cache."""
    if not np.isfinite(picture).all() or picture.min() == picture.max():
        kind = "non-finite values" if not np.isfinite(picture).all() else f"a single colour ({float(picture.min()):.3f})"
        raise EvaluationError(
            f"{description}: the render of prompt '{image.prompt.text[:60]}' (seed {image.seed}) has {kind}, so the model's "
            "weights are broken (NaN or inf in the base model or LoRA); nothing of it was cached or scored"
        )


def batches(images: list[PlannedImage], batch_size: int) -> list[list[PlannedImage]]:
    """``images`` in batches of equal sampler settings, in plan order: the same batches whichever rank renders them, so
    the renders are the same (a batch's composition changes float rounding)."""
    groups: dict[tuple[float, int | None, int | None], list[PlannedImage]] = {}
    for image in images:
        groups.setdefault((image.guidance_scale, image.height, image.width), []).append(image)
    return [group[start : start + batch_size] for group in groups.values() for start in range(0, len(group), batch_size)]


@torch.no_grad()
def render(
    pipe: DiffusionPipeline, images: list[PlannedImage], generation: GenerationConfig, description: str, share: tuple[int, int] = (0, 1)
) -> None:
    """Render ``images`` in batches of equal sampler settings, one CPU generator per image (device-independent noise).

    ``share`` = (rank, world size): this process renders batches ``rank, rank + world, ...`` only.
    """
    rank, world_size = share
    mine = batches(images, generation.batch_size)[rank::world_size]
    with progress_bar(total=sum(len(batch) for batch in mine), desc=description, unit="img") as bar, OverlappedWrites() as writes:
        for batch in mine:
            guidance, height, width = batch[0].guidance_scale, batch[0].height, batch[0].width
            output = pipe(
                prompt=[image.prompt.text for image in batch],
                generator=[torch.Generator("cpu").manual_seed(image.seed) for image in batch],
                guidance_scale=guidance,
                height=height,
                width=width,
                num_inference_steps=generation.num_inference_steps,
                output_type="np",
            )
            for picture, image in zip(output.images, batch):
                check_render(picture, image, description)
            writes.submit_batch([partial(save_png, pipe.numpy_to_pil(picture[None])[0], image.path) for picture, image in zip(output.images, batch)])
            bar.update(len(batch))
