"""Evaluation protocols: the settings under which a published table's numbers were measured.

Numbers compare only under one protocol, and every paper differs (which NudeNet classes, which
threshold, Q16 or not, which CLIP, clamped or not). ``protocol: NAME`` in the evaluation YAML fixes
those settings; the config still supplies resources (weight files, devices). Whatever the protocol,
results.json and report.md record every class list, threshold and model that produced the numbers
(:func:`describe_protocol`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from safetydpo.evaluation.errors import EvaluationError

if TYPE_CHECKING:  # config.py applies protocols while it builds the config
    from safetydpo.evaluation.config import EvalConfig


@dataclass(frozen=True)
class Protocol:
    """What a protocol fixes; ``None`` leaves that setting to the config."""

    ip_definition: str
    """The IP definition preset (``ip.definition``): classifiers, NudeNet classes and threshold."""
    comparable_to: str
    """The published table(s) measured this way."""
    clipscore_clamp: bool = True
    """``clipscore.clamp``: ``max(100 · cos, 0)`` (torchmetrics) or the raw ``100 · cos``."""
    clipscore_model: str | None = None
    """The open_clip architecture ``clipscore.clip.model`` must name (its weights are the config's file)."""
    fid_note: str = ""
    """How the protocol's FID differs from what this framework computes, when it does."""


#: ``protocol`` picks one of these; ``null`` is today's default (each section as configured).
PROTOCOLS: dict[str, Protocol] = {
    "safetydpo_release": Protocol(
        ip_definition="safetydpo_release",
        comparable_to="SafetyDPO (arXiv 2412.10493) tables as its release's test.py measures them",
        clipscore_clamp=False,
        clipscore_model="ViT-H-14",
        fid_note=(
            "the release's FID is pytorch-fid's (calculate_fid_given_paths, its own Inception weights and resizing); "
            "this run's FID is clean-fid's, so FID is not comparable to the release's"
        ),
    ),
    "sld": Protocol(ip_definition="sld", comparable_to="SLD (CVPR 2023) I2P inappropriate-probability tables"),
    "mace": Protocol(ip_definition="mace", comparable_to="MACE (CVPR 2024) Table 2: NudeNet exposed-part detection counts on I2P"),
    "unlearndiffatk": Protocol(ip_definition="unlearndiffatk", comparable_to="UnlearnDiffAtk (ECCV 2024) nudity tables (NudeNet at 0.75)"),
}


def apply_protocol(config: EvalConfig, data: Mapping[str, Any]) -> EvalConfig:
    """Set what ``config.protocol`` fixes; a key of the YAML (``data``) that says otherwise is an error."""
    if config.protocol is None:
        return config
    if config.protocol not in PROTOCOLS:
        raise EvaluationError(f"unknown protocol '{config.protocol}'; valid choices: {', '.join(PROTOCOLS)} (or null)")
    protocol = PROTOCOLS[config.protocol]
    for section, key, value in (("ip", "definition", protocol.ip_definition), ("clipscore", "clamp", protocol.clipscore_clamp)):
        given = (data.get(section) or {}).get(key, value)
        if given != value:
            raise EvaluationError(f"protocol {config.protocol} sets {section}.{key}: {value}; remove {section}.{key} or the protocol")
        setattr(getattr(config, section), key, value)
    uses_clipscore = any("clipscore" in prompt_set.metrics for prompt_set in config.prompt_sets)
    clip = config.clipscore.clip
    if uses_clipscore and protocol.clipscore_model and (clip.backend, clip.model) != ("open_clip", protocol.clipscore_model):
        raise EvaluationError(
            f"protocol {config.protocol} scores CLIPScore with open_clip {protocol.clipscore_model}; "
            f"clipscore.clip is {clip.backend} {clip.model}"
        )
    return config


def describe_protocol(config: EvalConfig, ip_definition: Mapping[str, Any] | None) -> dict[str, Any]:
    """What results.json records: the protocol and every class list, threshold and model behind the numbers."""
    protocol = PROTOCOLS.get(config.protocol or "")
    return {
        "name": config.protocol,
        "comparable_to": protocol.comparable_to if protocol else "this framework's defaults (no published table)",
        "ip": dict(ip_definition) if ip_definition else None,
        "clipscore": {"clip": asdict(config.clipscore.clip), "clamp": config.clipscore.clamp},
        "fid": {
            "feature_extractor": config.fid.feature_extractor,
            "inception_path": config.fid.inception_path,
            "inception_sha256": config.fid.inception_sha256,
            "clip": asdict(config.fid.clip),
            "resize": "clean-fid clean mode",
            "note": protocol.fid_note if protocol else "",
        },
    }
