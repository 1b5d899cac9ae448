"""The denoiser interface: everything that differs between model families, chosen from ``model_index.json``.

A family is one registered class in one file. It says which network is adapted (a UNet or a
transformer), how prompts become conditioning (one to three text encoders, pooled embeddings),
what extra conditioning the network takes (SDXL's size and crop ids), the noising rule, the
training target and the timestep sampler. Training, precomputed features, the builder's
renderer, activation collection for Co-Merge and LoRA export all ask the family, so no other
module branches on it.
"""

from __future__ import annotations

import importlib
import json
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import diffusers
import torch
from diffusers import DDPMScheduler, DiffusionPipeline, SchedulerMixin
from torch import Tensor

from safetydpo.registry import Registry

if TYPE_CHECKING:
    from safetydpo.models.components import DiffusionComponents


class UnsupportedModelError(ValueError):
    """A pipeline folder of a family no registered denoiser handles; the message names the file and the choices."""


@dataclass
class Conditioning:
    """What the network sees of a batch of prompts: token embeddings and, for SDXL and SD3, pooled embeddings."""

    embeds: Tensor  # (batch, tokens, width)
    pooled: Tensor | None = None  # (batch, width)

    def _map(self, fn: Any) -> Conditioning:
        return Conditioning(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name)) for f in fields(self)})

    def to(self, like: Tensor) -> Conditioning:
        """On ``like``'s device, in its dtype."""
        return self._map(lambda tensor: tensor.to(like))

    def repeat(self, times: int) -> Conditioning:
        """The batch ``times`` over (winner and loser share their prompt)."""
        return self._map(lambda tensor: tensor.repeat(times, *([1] * (tensor.dim() - 1))))

    def select(self, rows: slice) -> Conditioning:
        return self._map(lambda tensor: tensor[rows])

    def with_rows(self, rows: list[int], other: Conditioning) -> Conditioning:
        """A copy whose ``rows`` hold ``other``'s single row (caption dropout's empty prompt)."""

        def put(mine: Tensor, theirs: Tensor | None) -> Tensor:
            out = mine.clone()
            out[rows] = theirs
            return out

        pooled = None if self.pooled is None else put(self.pooled, other.pooled)
        return Conditioning(put(self.embeds, other.embeds), pooled)

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        pooled = [part.pooled for part in parts]
        return Conditioning(
            torch.cat([part.embeds for part in parts]),
            None if any(p is None for p in pooled) else torch.cat(pooled),  # type: ignore[arg-type]
        )

    def pipeline_kwargs(self, negative: Conditioning) -> dict[str, Tensor]:
        """Keyword arguments of a diffusers text-to-image pipeline call that renders from these embeddings."""
        kwargs = {"prompt_embeds": self.embeds, "negative_prompt_embeds": negative.embeds}
        if self.pooled is not None and negative.pooled is not None:
            kwargs |= {"pooled_prompt_embeds": self.pooled, "negative_pooled_prompt_embeds": negative.pooled}
        return kwargs


class Denoiser(ABC):
    """One model family; registered in DENOISERS under a short name recorded in expert cards."""

    registry_name: ClassVar[str]
    #: ``_class_name`` values of ``model_index.json`` this family serves.
    pipeline_classes: ClassVar[tuple[str, ...]]
    #: The adapted network's component name: the pipeline's keyword and the key prefix of LoRA files.
    network_name: ClassVar[str] = "unet"
    #: The text encoders' component names, each with its tokenizer (``text_encoder_2`` -> ``tokenizer_2``).
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)

    #: The family's diffusers pipeline, for families that encode prompts with its ``encode_prompt`` (``prompt_pipeline``).
    pipeline_class: ClassVar[type[DiffusionPipeline]]

    #: The scheduler training noises with, built from the checkpoint's scheduler config.
    training_scheduler: ClassVar[type[SchedulerMixin]] = DDPMScheduler

    def component_names(self) -> list[str]:
        """The pipeline components training loads: the network, the VAE, every text encoder and its tokenizer."""
        tokenizers = [name.replace("text_encoder", "tokenizer") for name in self.text_encoders]
        return [self.network_name, "vae", *self.text_encoders, *tokenizers]

    def assemble(self, parts: dict[str, Any], scheduler_config: Any) -> DiffusionComponents:
        """Components from loaded parts (by pipeline name; a missing optional encoder is ``None``)."""
        from safetydpo.models.components import DiffusionComponents

        named = {("unet" if name == self.network_name else name): part for name, part in parts.items() if part is not None}
        return DiffusionComponents(noise_scheduler=self.training_scheduler.from_config(scheduler_config), denoiser=self, **named)

    def load(self, path: str, revision: str | None, variant: str | None, dtype: torch.dtype) -> DiffusionComponents:
        """The components training needs, each through the ``from_pretrained`` of the class ``model_index.json`` names.

        A text encoder the index lists as null (SD3 saved without T5) is left out.
        """
        index = pipeline_index(path, revision)
        parts: dict[str, Any] = {}
        for name in self.component_names():
            library, class_name = (index.get(name) or [None, None])[:2]
            if class_name is None:
                if name in (self.network_name, "vae", "text_encoder", "tokenizer"):
                    raise UnsupportedModelError(f"{path}/model_index.json lists no '{name}'; a {self.registry_name} pipeline needs one")
                continue
            if library not in ("diffusers", "transformers"):  # the index must not make us import anything else
                raise UnsupportedModelError(f"{path}/model_index.json: '{name}' comes from '{library}'; expected diffusers or transformers")
            cls = getattr(importlib.import_module(library), class_name)
            options: dict[str, Any] = {"revision": revision}
            if not name.startswith("tokenizer"):
                options |= {"variant": variant, "dtype": dtype}
            parts[name] = cls.from_pretrained(path, subfolder=name, **options)
        return self.assemble(parts, self.training_scheduler.load_config(path, subfolder="scheduler", revision=revision))

    @abstractmethod
    def encode(self, components: DiffusionComponents, prompts: list[str]) -> Conditioning:
        """Prompt conditioning exactly as the family's diffusers pipeline computes it."""

    def prompt_pipeline(self, components: DiffusionComponents) -> DiffusionPipeline:
        """A ``pipeline_class`` around ``components``' own modules (no weight is copied), built once per components
        object, for families whose conditioning is that pipeline's ``encode_prompt``: building a pipeline inspects
        every module, which costs more than encoding a batch. Rebuilt if a component was swapped since."""
        parts = {name: getattr(components, "unet" if name == self.network_name else name) for name in self.component_names()}
        key = id(components)
        pipe = _PROMPT_PIPELINES.get(key)
        if pipe is None or not all(getattr(pipe, name, None) is part for name, part in parts.items()):
            if key not in _PROMPT_PIPELINES:  # dropped with the components, before their id can be reused
                weakref.finalize(components, _PROMPT_PIPELINES.pop, key, None)
            pipe = _PROMPT_PIPELINES[key] = self.pipeline_class(**parts, scheduler=components.noise_scheduler)
        return pipe

    @abstractmethod
    def sample_timestep(self, components: DiffusionComponents, generator: torch.Generator) -> Tensor:
        """One training timestep, shape ``(1,)``, drawn from ``generator`` alone."""

    @abstractmethod
    def noisy_and_target(self, components: DiffusionComponents, latents: Tensor, noise: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        """The noised latents the network sees at ``timesteps`` and what it is trained to predict."""

    @abstractmethod
    def snr(self, components: DiffusionComponents, timesteps: Tensor) -> Tensor:
        """Per-sample signal-to-noise ratio at ``timesteps`` (for timestep-weighted losses)."""

    def sigmas(self, components: DiffusionComponents, timesteps: Tensor) -> Tensor | None:
        """Per-sample noise level sigma of flow-matching families; ``None`` for DDPM ones."""
        return None

    def prediction_type(self, components: DiffusionComponents) -> str:
        """What the network predicts: the scheduler's ``epsilon`` / ``v_prediction``, or ``flow_matching`` (velocity)."""
        return components.noise_scheduler.config.prediction_type

    def network_kwargs(self, components: DiffusionComponents, latents: Tensor, conditioning: Conditioning) -> dict[str, Tensor | dict[str, Tensor]]:
        """Keyword arguments of the network's forward besides the noisy latents and ``timestep``."""
        return {"encoder_hidden_states": conditioning.embeds}

    def predict(self, components: DiffusionComponents, network: Any, noisy: Tensor, timesteps: Tensor, conditioning: Conditioning) -> Tensor:
        """The network's output (``network`` is the module or its compiled wrapper)."""
        kwargs = self.network_kwargs(components, noisy, conditioning.to(noisy))
        return network(noisy, timestep=timesteps, **kwargs, return_dict=False)[0]

    def expected_features(self, components: DiffusionComponents) -> dict[str, int | None]:
        """Sizes precomputed features must have: latent channels, text embedding width, pooled width (None: no pooled)."""
        return {
            "latent channels": components.unet.config.in_channels,
            "text embedding width": components.text_encoder.config.hidden_size,
            "pooled embedding width": None,
        }


DENOISERS: Registry[Denoiser] = Registry("model family")

#: ``Denoiser.prompt_pipeline``'s pipelines, by ``id`` of their components (which are unhashable dataclasses).
_PROMPT_PIPELINES: dict[int, DiffusionPipeline] = {}


def pipeline_index(name_or_path: str, revision: str | None = None) -> dict[str, Any]:
    """A pipeline's ``model_index.json`` (local folder, or a hub id from the HF cache)."""
    local = Path(name_or_path).expanduser() / "model_index.json"
    if local.is_file():
        try:
            return json.loads(local.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UnsupportedModelError(f"{local} is not readable JSON ({err}); restore the pipeline folder") from None
    return dict(DiffusionPipeline.load_config(name_or_path, revision=revision))


def unstored_components(index: dict[str, Any]) -> dict[str, None]:
    """``None`` for each component the index's pipeline class takes that the folder does not store (an SD3 folder
    saved without T5 lists ``text_encoder_3`` as null): ``from_pretrained`` refuses to load it unless they are passed."""
    cls = getattr(diffusers, str(index.get("_class_name")), None)
    if not (isinstance(cls, type) and issubclass(cls, DiffusionPipeline)):
        return {}
    expected, _ = cls._get_signature_keys(cls)  # what diffusers' own from_pretrained checks the folder against
    return {name: None for name in expected if not (index.get(name) or [None])[0]}


def denoiser_for_index(index: dict[str, Any], where: str) -> Denoiser:
    """The registered family whose ``pipeline_classes`` holds the index's ``_class_name``."""
    name = index.get("_class_name")
    for cls in DENOISERS.classes().values():
        if name in cls.pipeline_classes:
            return cls()
    supported = ", ".join(f"{c} ({family})" for family, cls in DENOISERS.classes().items() for c in cls.pipeline_classes)
    raise UnsupportedModelError(f"{where}: pipeline class '{name}' is not a supported model family; expected one of: {supported}")


def denoiser_for(name_or_path: str, revision: str | None = None) -> Denoiser:
    """The family of the pipeline at ``name_or_path``, from its ``model_index.json``."""
    where = str(Path(name_or_path).expanduser() / "model_index.json")
    return denoiser_for_index(pipeline_index(name_or_path, revision), where)
