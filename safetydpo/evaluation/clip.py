"""CLIP image and text embeddings from a local open_clip or transformers checkpoint (Q16, CLIPScore, FID-CLIP).

Q16 and CLIPScore usually name the same ViT-L/14, so loaded encoders are cached per (spec, device)
and the weights sit in memory once per run.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from safetydpo.evaluation.errors import EvaluationError

BACKENDS: tuple[str, ...] = ("open_clip", "transformers")
LOCAL_DIR = "local-dir:"


@dataclass
class ClipSpec:
    """Which CLIP to load, from local files only (nothing is ever downloaded).

    ``backend: open_clip``: ``model`` is an open_clip architecture (``ViT-L-14-quickgelu`` is OpenAI's
    ViT-L/14) with ``pretrained`` a local weights file, or ``local-dir:FOLDER`` holding
    ``open_clip_config.json`` and ``open_clip_model.safetensors``.
    ``backend: transformers``: ``model`` is a folder written by ``CLIPModel.save_pretrained`` that also
    holds the processor files (``openai/clip-vit-large-patch14`` downloaded once); ``pretrained`` is unused.
    """

    backend: str = "open_clip"
    """Which library loads the model: ``open_clip`` or ``transformers``."""
    model: str = "ViT-L-14-quickgelu"
    """open_clip: an architecture name (then ``pretrained`` is its weights file; download tags like ``openai`` are
    refused) or ``local-dir:FOLDER``. transformers: a ``save_pretrained`` folder with the processor files."""
    pretrained: str | None = None
    """open_clip weights file for an architecture name (``.safetensors`` preferred); unused otherwise."""

    @classmethod
    def coerce(cls, value: ClipSpec | Mapping[str, Any] | None, owner: str) -> ClipSpec:
        """Accept a spec, a mapping from YAML, or ``None`` (the defaults); ``owner`` names the config key in errors."""
        if value is None or isinstance(value, ClipSpec):
            return value or cls()
        unknown = sorted(set(value) - {f.name for f in fields(cls)})
        if unknown:
            raise EvaluationError(f"{owner}: unknown key(s) {', '.join(unknown)}; valid keys: backend, model, pretrained")
        return cls(**value)


class ClipEncoder(ABC):
    """L2-normalised float32 embeddings, so a cosine similarity is a dot product."""

    @abstractmethod
    def _encode_images(self, images: list[Image.Image]) -> Tensor: ...

    @abstractmethod
    def _encode_texts(self, texts: list[str]) -> Tensor: ...

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image]) -> Tensor:
        return F.normalize(self._encode_images([image.convert("RGB") for image in images]).float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> Tensor:
        return F.normalize(self._encode_texts(list(texts)).float(), dim=-1)


class OpenClipEncoder(ClipEncoder):
    """open_clip model with its own evaluation transform and tokenizer (bundled BPE: no network)."""

    def __init__(self, spec: ClipSpec, device: torch.device) -> None:
        import open_clip

        model, pretrained = _open_clip_source(spec, open_clip.list_models())
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained, device=device)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model)
        self.device = device

    def _encode_images(self, images: list[Image.Image]) -> Tensor:
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device)
        return self.model.encode_image(pixels)

    def _encode_texts(self, texts: list[str]) -> Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device))


class TransformersClipEncoder(ClipEncoder):
    """transformers ``CLIPModel`` with the ``CLIPProcessor`` saved beside it."""

    def __init__(self, spec: ClipSpec, device: torch.device) -> None:
        from transformers import CLIPModel, CLIPProcessor

        folder = Path(spec.model).expanduser()
        if not (folder / "config.json").is_file():
            raise EvaluationError(
                f"transformers CLIP folder {folder} has no config.json (save it with CLIPModel.save_pretrained)"
            )
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        self.device = device

    def _encode_images(self, images: list[Image.Image]) -> Tensor:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        return _projected(self.model.get_image_features(pixel_values=pixels))

    def _encode_texts(self, texts: list[str]) -> Tensor:
        tokens = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True)
        return _projected(
            self.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
            )
        )


def _projected(output: Any) -> Tensor:
    """transformers 4 returns the projected embedding, transformers 5 a ModelOutput carrying it as ``pooler_output``."""
    return output if isinstance(output, Tensor) else output.pooler_output


def _open_clip_source(spec: ClipSpec, architectures: list[str]) -> tuple[str, str | None]:
    """(model, pretrained) for open_clip with ``~`` expanded, once both are known to be local."""
    if spec.model.startswith(LOCAL_DIR):
        folder = Path(spec.model[len(LOCAL_DIR) :]).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise EvaluationError(f"open_clip folder {folder} has no open_clip_config.json")
        return f"{LOCAL_DIR}{folder}", None
    if spec.model not in architectures:
        raise EvaluationError(
            f"'{spec.model}' is not an open_clip architecture (see open_clip.list_models()) nor local-dir:FOLDER"
        )
    weights = Path(spec.pretrained).expanduser() if spec.pretrained else None
    if weights is None or not weights.is_file():
        raise EvaluationError(
            f"open_clip {spec.model} needs `pretrained` set to a local weights file (got {spec.pretrained!r}); nothing is downloaded"
        )
    return spec.model, str(weights)


def load_clip(spec: ClipSpec, device: torch.device) -> ClipEncoder:
    """Load (once per spec and device) the encoder ``spec`` describes."""
    if spec.backend not in BACKENDS:
        raise EvaluationError(f"unknown CLIP backend '{spec.backend}'; valid choices: {', '.join(BACKENDS)}")
    return _load_cached(tuple(sorted(asdict(spec).items())), str(device))


@functools.lru_cache(maxsize=4)
def _load_cached(spec_items: tuple[tuple[str, Any], ...], device: str) -> ClipEncoder:
    spec = ClipSpec(**dict(spec_items))
    encoder = OpenClipEncoder if spec.backend == "open_clip" else TransformersClipEncoder
    return encoder(spec, torch.device(device))
