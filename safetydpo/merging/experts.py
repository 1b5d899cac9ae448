"""Checking that a set of expert LoRAs (read by ``safetydpo.lora_files``) can be merged."""

from __future__ import annotations

from safetydpo.lora_files import LoraExpert


class ExpertMismatchError(ValueError):
    """Experts that cannot be merged; the message names the expert file and the difference."""


def check_compatible(experts: list[LoraExpert]) -> None:
    """Experts must share base model, adapted layers and per-layer rank and shapes (documented rule)."""
    if not experts:
        raise ExpertMismatchError("no experts to merge")
    first = experts[0]
    for expert in experts[1:]:
        base_a, base_b = first.card.get("base_model"), expert.card.get("base_model")
        if base_a and base_b and base_a != base_b:
            raise ExpertMismatchError(f"{expert.path} was trained on base model {base_b}, {first.path} on {base_a}")
        if set(expert.layers) != set(first.layers):
            extra = sorted(set(expert.layers) ^ set(first.layers))
            raise ExpertMismatchError(f"{expert.path} adapts different layers than {first.path}, e.g. {extra[0]}")
        for name, factors in expert.layers.items():
            reference = first.layers[name]
            if factors.down.shape != reference.down.shape or factors.up.shape != reference.up.shape:
                raise ExpertMismatchError(
                    f"{expert.path} layer {name} has LoRA shapes {tuple(factors.down.shape)}/{tuple(factors.up.shape)}, "
                    f"{first.path} has {tuple(reference.down.shape)}/{tuple(reference.up.shape)}; Co-Merge needs equal ranks"
                )
