"""Checking that a set of expert LoRAs (read by ``safetydpo.lora_files``) can be merged, and onto which base model."""

from __future__ import annotations

import logging
import os

from safetydpo.lora_files import LoraExpert, card_path

logger = logging.getLogger(__name__)


class ExpertMismatchError(ValueError):
    """Experts that cannot be merged; the message names the expert file and the difference."""


def check_compatible(experts: list[LoraExpert], equal_ranks: bool = False) -> None:
    """Experts must adapt the same layers with the same weight shapes; ranks may differ unless ``equal_ranks``."""
    if not experts:
        raise ExpertMismatchError("no experts to merge")
    first = experts[0]
    for expert in experts[1:]:
        families = (expert.card.get("model_family"), first.card.get("model_family"))
        if expert.network != first.network or (all(families) and families[0] != families[1]):
            theirs, ours = (f"{family or '?'} ({e.network} LoRA)" for family, e in zip(families, (expert, first)))
            raise ExpertMismatchError(
                f"{expert.path} is an expert of another model family than {first.path}: {theirs} vs {ours}; "
                "merge only experts trained on one base model"
            )
        if set(expert.layers) != set(first.layers):
            extra = sorted(set(expert.layers) ^ set(first.layers))
            raise ExpertMismatchError(f"{expert.path} adapts different layers than {first.path}, e.g. {extra[0]}")
        for name, factors in expert.layers.items():
            reference = first.layers[name]
            if (factors.down.shape[1:], factors.up.shape[0]) != (reference.down.shape[1:], reference.up.shape[0]):
                raise ExpertMismatchError(
                    f"{expert.path} layer {name} updates a weight of shape {tuple(factors.delta().shape)}, "
                    f"{first.path} one of {tuple(reference.delta().shape)}; "
                    "the experts belong to different models"
                )
            if equal_ranks and factors.rank != reference.rank:
                raise ExpertMismatchError(
                    f"{expert.path} layer {name} has rank {factors.rank}, {first.path} rank {reference.rank}; "
                    "Co-Merge needs equal ranks (cat, svd, ties, dare, linear and comerge_weight combine any ranks)"
                )


def _same_model(a: str, b: str) -> bool:
    """Two names of one base model: equal, or local paths to the same folder."""
    return a == b or (os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))


def merge_base_model(experts: list[LoraExpert], requested: str | None) -> str | None:
    """The base model the experts' cards name (all the same, and ``requested`` if given), else ``requested``.

    An expert without a card (another tool's file) cannot be checked: one warning line says so.
    """
    known = [(expert, expert.card["base_model"]) for expert in experts if expert.card.get("base_model")]
    unknown = [expert for expert in experts if not expert.card.get("base_model")]
    if unknown:
        names = ", ".join(str(e.path) for e in unknown)
        logger.warning("warning: no model card names the base model of %s; it is not checked against the other experts or --base-model", names)
    for expert, base in known[1:]:
        if not _same_model(base, known[0][1]):
            raise ExpertMismatchError(f"{expert.path} was trained on base model {base}, {known[0][0].path} on {known[0][1]}")
    if known and requested and not _same_model(requested, known[0][1]):
        raise ExpertMismatchError(
            f"base model {requested} is not the one the experts were trained on ({known[0][1]}, from {card_path(known[0][0].path)}); "
            "merge against that model or leave the base model unset"
        )
    return requested or (known[0][1] if known else None)
