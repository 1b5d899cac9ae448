"""The LoRA file format: one home for writing and reading expert and merged LoRAs and their model cards.

A LoRA file is a diffusers-format UNet LoRA (``unet.<module>.lora_A.weight`` / ``lora_B.weight``,
safetensors, alpha/rank scale folded into ``lora_B``) that ``StableDiffusionPipeline.load_lora_weights``
loads. Beside it, ``<name>.json`` is its model card; the card's ``format`` names what wrote it and
its version. Files without a card (written by other tools) are read as cards ``{}``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from safetensors import SafetensorError, safe_open

from safetydpo.io import atomic_file, write_json_atomic

#: Card ``format`` of an expert written by ``LoraExport``.
EXPERT_FORMAT = "safetydpo.expert/1"
#: Card ``format`` of a LoRA written by ``merge_expert_files``.
MERGED_FORMAT = "safetydpo.merged/1"
#: Every card format this version reads.
KNOWN_FORMATS = (EXPERT_FORMAT, MERGED_FORMAT)

UNET_PREFIX = "unet."
_DOWN, _UP = ".lora_A.weight", ".lora_B.weight"


class LoraFileError(ValueError):
    """A LoRA file or card that cannot be read; the message names the file and what to do."""


@dataclass
class LoraFactors:
    """One adapted layer: ``delta W = up @ down`` (scale already folded into ``up``)."""

    down: torch.Tensor  # lora_A: (rank, in) or (rank, in, k, k)
    up: torch.Tensor  # lora_B: (out, rank) or (out, rank, 1, 1)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        """The dense weight update as a 2-D matrix (out, in·k·k)."""
        return self.up.flatten(1) @ self.down.flatten(1)


@dataclass
class LoraExpert:
    """A LoRA file: its layers keyed by UNet module name, plus its model card (``{}`` when absent)."""

    path: Path
    layers: dict[str, LoraFactors]
    card: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.stem


def card_path(path: str | Path) -> Path:
    """Where the model card of LoRA file ``path`` lives."""
    return Path(path).with_suffix(".json")


def hub_card_path(path: str | Path) -> Path:
    """Where the Hugging Face model card (Markdown, YAML front matter) of LoRA file ``path`` lives.

    ``<name>.md`` rather than ``README.md``: one folder holds every expert. Upload it as the repo's README.md.
    """
    return Path(path).with_suffix(".md")


def base_model_license(base_model: str) -> str:
    """The ``license`` of a local base model's own model card (hub snapshots ship it), else ``other``."""
    readme = Path(base_model).expanduser() / "README.md"
    try:
        text = readme.read_text(encoding="utf-8")
        meta = yaml.safe_load(text.split("---", 2)[1]) if text.startswith("---") else None
    except (OSError, IndexError, yaml.YAMLError):
        return "other"
    license_ = meta.get("license") if isinstance(meta, dict) else None
    return license_ if isinstance(license_, str) and license_ else "other"


def hub_card(card: dict[str, Any], weights: str) -> str:
    """A Hugging Face model card for a LoRA with ``card``: front matter the hub indexes, then how to load it."""
    base = str(card.get("base_model") or "")
    categories = [card["category"]] if card.get("category") else list(card.get("categories") or [])
    meta = {
        "base_model": base,
        "library_name": "diffusers",
        "license": base_model_license(base) if base else "other",
        "pipeline_tag": "text-to-image",
        "tags": ["safetydpo", "lora", "diffusers", "text-to-image", "safety", *categories],
    }
    what = (f"a SafetyDPO merge ({card['method']}) of {len(card.get('experts', []))} safety experts"
            if card.get("format") == MERGED_FORMAT else f"a SafetyDPO safety expert for **{card.get('category') or 'all categories'}**")
    details = {key: card[key] for key in ("concepts", "loss", "lora", "learning_rate", "steps", "method_args", "experts") if key in card}
    return (
        "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n"
        + f"# {Path(weights).stem}\n\nA LoRA for `{base}`: {what}, so that the model renders a safe image where the prompt asks "
        + f"for harmful content ({', '.join(categories) or 'every category'}).\n\n"
        + "```python\nfrom diffusers import StableDiffusionPipeline\n\n"
        + f"pipe = StableDiffusionPipeline.from_pretrained(\"{base}\")\npipe.load_lora_weights(\".\", weight_name=\"{Path(weights).name}\")\n```\n\n"
        + f"Training details (the full card is `{card_path(weights).name}`):\n\n```yaml\n"
        + yaml.safe_dump(details, sort_keys=False) + "```\n"
    )


def read_card(path: str | Path) -> dict[str, Any]:
    """The model card beside LoRA file ``path``; ``{}`` when there is none, an error when it is unreadable."""
    card_file = card_path(path)
    if not card_file.is_file():
        return {}
    try:
        card = json.loads(card_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LoraFileError(f"model card {card_file} is not readable JSON ({err}); restore it or delete it to read the LoRA without one") from err
    if not isinstance(card, dict):
        raise LoraFileError(f"model card {card_file} is not a JSON object; restore it or delete it")
    written_by = card.get("format")
    if written_by is not None and written_by not in KNOWN_FORMATS:
        raise LoraFileError(
            f"model card {card_file} has format {written_by!r}, which this safetydpo does not read "
            f"(it reads {', '.join(KNOWN_FORMATS)}); upgrade safetydpo"
        )
    return card


def load_lora(path: str | Path) -> LoraExpert:
    """Read a diffusers-format UNet LoRA and its card with safetensors, never pickle."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as err:
        raise LoraFileError(f"{path} is not a readable safetensors LoRA file: {err}") from err
    downs = {k[len(UNET_PREFIX) : -len(_DOWN)]: v for k, v in tensors.items() if k.startswith(UNET_PREFIX) and k.endswith(_DOWN)}
    ups = {k[len(UNET_PREFIX) : -len(_UP)]: v for k, v in tensors.items() if k.startswith(UNET_PREFIX) and k.endswith(_UP)}
    unknown = sorted(k for k in tensors if not (k.startswith(UNET_PREFIX) and k.endswith((_DOWN, _UP))))
    if unknown or not downs or set(downs) != set(ups):
        detail = f"unexpected keys such as {unknown[:3]}" if unknown else "lora_A/lora_B keys do not pair up"
        raise LoraFileError(f"{path} is not a UNet LoRA in diffusers/peft format: {detail}")
    layers = {name: LoraFactors(downs[name], ups[name]) for name in sorted(downs)}
    return LoraExpert(path=path, layers=layers, card=read_card(path))


def lora_config_for(layers: dict[str, LoraFactors]) -> LoraConfig:
    """A peft config describing ``layers`` (one rank for all; other ranks go in rank_pattern)."""
    ranks = {name: factors.rank for name, factors in layers.items()}
    rank = max(ranks.values())
    return LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted(layers),
        rank_pattern={name: r for name, r in ranks.items() if r != rank},
        alpha_pattern={name: r for name, r in ranks.items() if r != rank},
    )


def state_dict_for(layers: dict[str, LoraFactors]) -> dict[str, torch.Tensor]:
    """Peft-format state dict (``<module>.lora_A.weight``) that ``save_lora`` prefixes with ``unet.``."""
    state = {}
    for name, factors in layers.items():
        state[f"{name}{_DOWN}"] = factors.down.contiguous()
        state[f"{name}{_UP}"] = factors.up.contiguous()
    return state


def save_lora(path: str | Path, unet_lora: dict[str, torch.Tensor], config: LoraConfig, card: dict[str, Any]) -> Path:
    """Write a LoRA loadable by ``StableDiffusionPipeline.load_lora_weights``, its ``<name>.json`` card and ``<name>.md`` hub card.

    ``unet_lora`` is in peft key format with the scale folded into ``lora_B``. Both files are
    written to temporary names and renamed into place, so an interrupted save never leaves a
    truncated file where a good one was.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA file name must end in .safetensors, got {path}")
    metadata = config.to_dict()
    metadata["lora_alpha"] = metadata["r"]  # the scale is folded into lora_B
    metadata["target_modules"] = sorted(metadata["target_modules"] or [])
    with atomic_file(path) as tmp_file, tempfile.TemporaryDirectory(dir=path.parent) as tmp_dir:
        StableDiffusionPipeline.save_lora_weights(
            tmp_dir, unet_lora_layers=unet_lora, weight_name=path.name, unet_lora_adapter_metadata=metadata
        )
        os.replace(Path(tmp_dir, path.name), tmp_file)
    write_json_atomic(card_path(path), card)
    with atomic_file(hub_card_path(path)) as tmp:
        tmp.write_text(hub_card(card, path.name), encoding="utf-8")
    return path
