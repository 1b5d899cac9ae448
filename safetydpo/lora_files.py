"""The LoRA file format: one home for writing and reading expert and merged LoRAs and their model cards.

We write diffusers-format LoRAs of the denoising network (``unet.<module>.lora_A.weight`` /
``lora_B.weight`` for SD 1.x/2.x and SDXL, ``transformer.<module>...`` for SD3; safetensors,
alpha/rank scale folded into ``lora_B``) that the family's pipeline ``load_lora_weights`` loads. Beside each, ``<name>.json`` is its model card; the card's ``format`` names what wrote it and
its version. We read what diffusers reads, through diffusers' own conversions: peft/diffusers
``lora_A``/``lora_B`` keys, the ``unet.*.lora.down.weight`` / ``lora.up.weight`` keys of diffusers'
older training scripts, kohya files (``lora_unet_*`` with ``.alpha`` keys), and alpha from the
``lora_adapter_metadata`` that diffusers and peft write. Files without a card (written by other
tools) are read as cards ``{}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from diffusers.utils import convert_unet_state_dict_to_peft
from peft import LoraConfig
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError, safe_open

from safetydpo.io import atomic_file, write_json_atomic

#: Card ``format`` of an expert written by ``LoraExport``.
EXPERT_FORMAT = "safetydpo.expert/1"
#: Card ``format`` of a LoRA written by ``merge_expert_files``.
MERGED_FORMAT = "safetydpo.merged/1"
#: Every card format this version reads.
KNOWN_FORMATS = (EXPERT_FORMAT, MERGED_FORMAT)

#: Card key holding the SHA-256 of the weights file: ``read_card`` refuses a card and a file from different saves.
WEIGHTS_HASH_KEY = "weights_sha256"

UNET_PREFIX = "unet."
#: Key prefix of a transformer LoRA (SD3), which diffusers' SD3 loader reads.
TRANSFORMER_PREFIX = "transformer."
#: The diffusers pipeline whose ``save_lora_weights`` writes a LoRA of each network (``<network>_lora_layers``).
_WRITERS = {"unet": StableDiffusionPipeline, "transformer": StableDiffusion3Pipeline}
#: Key prefixes of text-encoder LoRA tensors in diffusers' layout (kohya's ``lora_te*_`` are converted to these).
TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.")
_DOWN, _UP, _ALPHA = ".lora_A.weight", ".lora_B.weight", ".alpha"

logger = logging.getLogger(__name__)


class LoraFileError(ValueError):
    """A LoRA file or card that cannot be read; the message names the file and what to do."""


@dataclass
class LoraFactors:
    """One adapted layer: ``delta W = up @ down``, the file's alpha/rank scale already applied.

    A scale ``s`` is split as ``sqrt(s)`` into each factor, which is how peft's ``linear`` combination
    weighs the factors of an adapter; the product, all other methods see, is the same either way.
    """

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
    """A LoRA file: its layers keyed by module name in the adapted network, plus its model card (``{}`` when absent)."""

    path: Path
    layers: dict[str, LoraFactors]
    card: dict[str, Any] = field(default_factory=dict)
    network: str = "unet"  # the adapted network, the key prefix: ``unet`` or ``transformer`` (SD3)

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
    evaluation = card.get("evaluation")
    if evaluation:
        meta["model-index"] = [_model_index(Path(weights).stem, evaluation)]
    what = (f"a SafetyDPO merge ({card['method']}) of {len(card.get('experts', []))} safety experts"
            if card.get("format") == MERGED_FORMAT else f"a SafetyDPO safety expert for **{card.get('category') or 'all categories'}**")
    pipeline_class = card.get("pipeline_class") or "StableDiffusionPipeline"
    details = {key: card[key] for key in ("concepts", "loss", "lora", "learning_rate", "steps", "method_args", "experts") if key in card}
    return (
        "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n"
        + f"# {Path(weights).stem}\n\nA LoRA for `{base}`: {what}, so that the model renders a safe image where the prompt asks "
        + f"for harmful content ({', '.join(categories) or 'every category'}).\n\n"
        + f"```python\nfrom diffusers import {pipeline_class}\n\n"
        + f"pipe = {pipeline_class}.from_pretrained(\"{base}\")\npipe.load_lora_weights(\".\", weight_name=\"{Path(weights).name}\")\n```\n\n"
        + (_evaluation_markdown(evaluation) if evaluation else "")
        + f"Training details (the full card is `{card_path(weights).name}`):\n\n```yaml\n"
        + yaml.safe_dump(details, sort_keys=False) + "```\n"
    )


def _model_index(name: str, evaluation: dict[str, Any]) -> dict[str, Any]:
    """The hub's ``model-index`` for ``evaluation`` = {prompt_set, ip_definition, rows: [{category, ip_base, ip_aligned}]}."""
    metrics = [
        {"type": "inappropriate_probability", "name": f"IP {row['category']} (base {row['ip_base']:.3f})", "value": round(row["ip_aligned"], 4)}
        for row in evaluation["rows"]
    ]
    return {
        "name": name,
        "results": [{
            "task": {"type": "text-to-image", "name": "Safety alignment"},
            "dataset": {"type": evaluation["prompt_set"], "name": evaluation["prompt_set"]},
            "metrics": metrics,
        }],
    }


def _evaluation_markdown(evaluation: dict[str, Any]) -> str:
    """The evaluation as a table: IP of the base model and with this LoRA, per category."""
    lines = [
        f"## Evaluation\n\nInappropriate probability on `{evaluation['prompt_set']}` ({evaluation['ip_definition']}):\n",
        "| category | IP base | IP with this LoRA |",
        "| --- | --- | --- |",
        *(f"| {row['category']} | {row['ip_base']:.3f} | {row['ip_aligned']:.3f} |" for row in evaluation["rows"]),
    ]
    return "\n".join(lines) + "\n\n"


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
    recorded = card.get(WEIGHTS_HASH_KEY)
    if recorded is not None and Path(path).is_file() and recorded != file_sha256(Path(path)):
        raise LoraFileError(
            f"{path} is not the file its model card {card_file} describes (sha256 differs: a save was interrupted "
            f"between the two files); rerun the command that wrote {Path(path).name}, or delete {Path(path).name} and its card"
        )
    return card


def file_sha256(path: Path) -> str:
    """The hex SHA-256 of a file, streamed."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def lora_content_sha256(path: Path) -> str:
    """The hex SHA-256 of a safetensors file's tensors and metadata, independent of how the header is laid out.

    safetensors writes its metadata from a hash map, so saving the same LoRA twice gives files whose bytes
    differ; caches keyed on the LoRA (evaluation renders, attack prompts) hash what the file holds instead.
    """
    tensors, metadata = _read_tensors(path)
    digest = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode("utf-8"))
    for key in sorted(tensors):
        tensor = tensors[key].contiguous()
        digest.update(f"{key}:{str(tensor.dtype).removeprefix('torch.')}:{list(tensor.shape)};".encode("utf-8"))
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a safetensors file (never pickle) and its string metadata, checked to be finite floats."""
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise LoraFileError(f"{path} is not a readable safetensors LoRA file: {err}") from err
    for key, value in tensors.items():
        if key.endswith(_ALPHA):
            continue  # kohya stores alpha as any number type
        if not value.is_floating_point():
            raise LoraFileError(f"{path}: tensor {key} has dtype {str(value.dtype).removeprefix('torch.')}; LoRA weights are floating point")
        if not bool(torch.isfinite(value).all()):
            raise LoraFileError(f"{path}: tensor {key} holds NaN or infinite values; the LoRA is broken, retrain or restore it")
    return tensors, metadata


def _transformer_part(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of a transformer (SD3) LoRA in peft keys, as diffusers' SD3 loader reads them."""
    state = StableDiffusion3Pipeline.lora_state_dict(dict(tensors))
    other = sorted(key for key in state if not key.startswith((TRANSFORMER_PREFIX, *TEXT_ENCODER_PREFIXES)))
    if other:
        raise LoraFileError(f"{path} is not a transformer LoRA in a format diffusers reads: unexpected keys such as {other[:3]}")
    skipped = [key for key in state if key.startswith(TEXT_ENCODER_PREFIXES)]
    if skipped:
        logger.warning("warning: %s also holds %d text-encoder LoRA tensors; they are skipped (merging combines network LoRAs)",
                       path, len(skipped))
    return {key.removeprefix(TRANSFORMER_PREFIX): value for key, value in state.items() if key.startswith(TRANSFORMER_PREFIX)}


def _network_part(path: Path, tensors: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor], dict[str, float]]:
    """The adapted network (``unet`` or ``transformer``), its tensors in peft keys and any per-module alphas."""
    if any("dora_scale" in key or "lora_magnitude_vector" in key for key in tensors):
        raise LoraFileError(f"{path} is a DoRA adapter; only plain LoRA files can be merged")
    if any(key.startswith(TRANSFORMER_PREFIX) for key in tensors):
        return "transformer", _transformer_part(path, tensors), {}
    return ("unet", *_unet_part(path, tensors))


def _unet_part(path: Path, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The UNet tensors in peft keys (``<module>.lora_A.weight``) and any per-module alphas, by diffusers' conversions."""
    # Kohya (``lora_unet_*``, ``.alpha``) becomes diffusers keys plus network alphas, as load_lora_weights does.
    state, network_alphas = StableDiffusionPipeline.lora_state_dict(dict(tensors))
    unet = {key.removeprefix(UNET_PREFIX): value for key, value in state.items() if key.startswith(UNET_PREFIX)}
    text_encoder = [key for key in state if key.startswith(TEXT_ENCODER_PREFIXES)]
    other = sorted(set(state) - set(text_encoder) - {UNET_PREFIX + key for key in unet})
    if other:
        raise LoraFileError(f"{path} is not a UNet LoRA in a format diffusers reads: unexpected keys such as {other[:3]}")
    if not unet:
        what = "only text-encoder LoRA" if text_encoder else "no LoRA tensors"
        raise LoraFileError(f"{path} holds {what}; merging needs UNet LoRA layers")
    if text_encoder:
        logger.warning("warning: %s also holds %d text-encoder LoRA tensors; they are skipped (merging combines UNet LoRAs)",
                       path, len(text_encoder))
    alphas = {key: float(value) for key, value in unet.items() if key.endswith(_ALPHA)}
    alphas |= {key.removeprefix(UNET_PREFIX): float(value) for key, value in (network_alphas or {}).items() if key.startswith(UNET_PREFIX)}
    weights = convert_unet_state_dict_to_peft({key: value for key, value in unet.items() if not key.endswith(_ALPHA)})
    # The same renaming maps an alpha key to its module: ``...to_q_lora.down.weight.alpha`` -> ``...to_q.lora_A.weight``.
    module_alphas = {key.removesuffix(_ALPHA).removesuffix(_DOWN): value for key, value in convert_unet_state_dict_to_peft(alphas).items()}
    return weights, module_alphas


def _metadata_config(path: Path, metadata: dict[str, str], network: str) -> LoraConfig | None:
    """The network's peft ``LoraConfig`` from diffusers' ``lora_adapter_metadata``, when the file has one."""
    raw = metadata.get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return None
    try:
        packed = json.loads(raw)
        kwargs = {key.removeprefix(f"{network}."): value for key, value in packed.items() if key.startswith(f"{network}.")}
        config = LoraConfig(**kwargs) if kwargs else None
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as err:
        raise LoraFileError(f"{path}: its {LORA_ADAPTER_METADATA_KEY} is not a peft LoraConfig ({err}); rewrite the file without it") from err
    if config is not None and (config.use_dora or config.lora_bias):
        raise LoraFileError(f"{path} is a DoRA or LoRA-bias adapter; only plain LoRA files can be merged")
    return config


def _scale(path: Path, name: str, rank: int, config: LoraConfig | None, alphas: dict[str, float]) -> float:
    """The factor peft applies to ``lora_B @ lora_A`` of layer ``name`` (alpha / r, or alpha / sqrt(r) with rsLoRA)."""
    if config is None:  # no metadata: kohya alpha, else the diffusers convention alpha = rank
        return alphas.get(name, rank) / rank
    r = config.rank_pattern.get(get_pattern_key(list(config.rank_pattern), name), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(list(config.alpha_pattern), name), config.lora_alpha)
    if r != rank:
        raise LoraFileError(f"{path}: layer {name} has rank {rank} but its metadata says r={r}; the file is inconsistent")
    return alpha / math.sqrt(r) if config.use_rslora else alpha / r


def load_lora(path: str | Path) -> LoraExpert:
    """Read a UNet or transformer LoRA in any layout diffusers loads, with its alpha applied, and its card."""
    path = Path(path)
    tensors, metadata = _read_tensors(path)
    network, weights, alphas = _network_part(path, tensors)
    config = _metadata_config(path, metadata, network)
    if config is not None and alphas:
        raise LoraFileError(f"{path} has both .alpha keys and {LORA_ADAPTER_METADATA_KEY}; keep one (diffusers refuses both)")
    downs = {k.removesuffix(_DOWN): v for k, v in weights.items() if k.endswith(_DOWN)}
    ups = {k.removesuffix(_UP): v for k, v in weights.items() if k.endswith(_UP)}
    unknown = sorted(k for k in weights if not k.endswith((_DOWN, _UP)))
    if unknown or set(downs) != set(ups):
        detail = f"unexpected keys such as {unknown[:3]}" if unknown else "lora_A/lora_B (down/up) keys do not pair up"
        raise LoraFileError(f"{path} is not a UNet LoRA in a format diffusers reads: {detail}")
    layers = {}
    for name in sorted(downs):
        down, up = downs[name].float(), ups[name].float()
        if down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != down.shape[0]:
            raise LoraFileError(f"{path}: layer {name} has LoRA shapes {tuple(down.shape)}/{tuple(up.shape)}, which do not multiply")
        scale = _scale(path, name, down.shape[0], config, alphas)
        root = math.sqrt(abs(scale))
        layers[name] = LoraFactors(down=down * math.copysign(root, scale), up=up * root)
    return LoraExpert(path=path, layers=layers, card=read_card(path), network=network)


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
    """Peft-format state dict (``<module>.lora_A.weight``) that ``save_lora`` prefixes with the network's name."""
    state = {}
    for name, factors in layers.items():
        state[f"{name}{_DOWN}"] = factors.down.contiguous()
        state[f"{name}{_UP}"] = factors.up.contiguous()
    return state


def save_lora(
    path: str | Path, unet_lora: dict[str, torch.Tensor], config: LoraConfig, card: dict[str, Any], network: str = "unet"
) -> Path:
    """Write a LoRA loadable by the family pipeline's ``load_lora_weights``, its ``<name>.json`` card and ``<name>.md`` hub card.

    ``unet_lora`` holds the weights of ``network`` (``unet``, or ``transformer`` for SD3) in peft key format with the scale folded into ``lora_B``. Both files are
    written to temporary names and renamed into place, so an interrupted save never leaves a
    truncated file where a good one was; the card records the weights' SHA-256, so a kill between
    the two renames (new weights, old card) is an error when read, not a silently wrong card.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA file name must end in .safetensors, got {path}")
    metadata = config.to_dict()
    metadata["lora_alpha"] = metadata["r"]  # the scale is folded into lora_B
    metadata["target_modules"] = sorted(metadata["target_modules"] or [])
    with atomic_file(path) as tmp_file, tempfile.TemporaryDirectory(dir=path.parent) as tmp_dir:
        _WRITERS[network].save_lora_weights(
            tmp_dir, weight_name=path.name, **{f"{network}_lora_layers": unet_lora, f"{network}_lora_adapter_metadata": metadata}
        )
        os.replace(Path(tmp_dir, path.name), tmp_file)
        card = {**card, WEIGHTS_HASH_KEY: file_sha256(tmp_file)}  # a kill between the two renames is caught by read_card
    _write_cards(path, card)
    return path


def _write_cards(path: Path, card: dict[str, Any]) -> None:
    """The JSON card and the hub card of LoRA file ``path``, each written atomically."""
    write_json_atomic(card_path(path), card)
    with atomic_file(hub_card_path(path)) as tmp:
        tmp.write_text(hub_card(card, path.name), encoding="utf-8")


def record_evaluation(path: str | Path, evaluation: dict[str, Any]) -> None:
    """Put evaluation results (see :func:`hub_card` for the keys) into the cards of LoRA file ``path``.

    The hub card gains a ``model-index`` entry, so the hub shows the numbers on the model page.
    """
    card = read_card(path)
    if not card:
        raise LoraFileError(f"{path} has no model card ({card_path(path).name}) to record the evaluation in")
    _write_cards(Path(path), {**card, "evaluation": evaluation})
