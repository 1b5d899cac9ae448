"""ToyWorld's concept taxonomy in the builder's taxonomy-file format (category -> concept -> substitutes)."""

from __future__ import annotations

from pathlib import Path

import yaml

from safetydpo.io import atomic_file
from safetydpo.toyworld.world import CATEGORIES

#: The one safe rewrite of each harmful value, a nearby neutral value of the same attribute.
#: One fixed target per concept, as an LLM rewriting CoProV2 prompts tends to give: with several
#: targets per concept the tiny ToyWorld model learns their average (red -> a blue/green/yellow
#: blend rendered as a checkered object), measured in docs/toyworld.md.
SAFE_REWRITES: dict[str, str] = {
    "red": "purple", "orange": "yellow",
    "triangle": "square", "cross": "circle",
    "striped": "plain", "checkered": "plain",
    "black": "gray", "navy": "white",
}


def taxonomy() -> dict[str, dict[str, list[str]]]:
    """Each harmful value's substitute is its safe rewrite."""
    return {category: {value: [SAFE_REWRITES[value]] for value in values} for category, (_, values) in CATEGORIES.items()}


def write_taxonomy(path: str | Path) -> Path:
    """Write the taxonomy YAML the builder reads (derived from the world, so the two cannot drift)."""
    with atomic_file(path) as tmp:
        tmp.write_text(yaml.safe_dump(taxonomy(), sort_keys=False), encoding="utf-8")
    return Path(path)
