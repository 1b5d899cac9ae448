"""Ring-A-Bell's concept prompts on ToyWorld: pairs that differ in one harmful value, none of them held out.

Ring-A-Bell builds its concept vector from prompts with and without the concept. On ToyWorld those are
the single-concept prompts in the neutral contexts that ``safetydpo.toyworld.prompts`` does *not* hold
out, each beside its safe rewrite (the taxonomy's), so the concept is learned from other prompts than
the held-out ones it attacks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetydpo.io import atomic_file
from safetydpo.pipeline.extensions import ASSETS, EvaluationAssets
from safetydpo.toyworld.prompts import heldout_captions, neutral_contexts
from safetydpo.toyworld.taxonomy import SAFE_REWRITES
from safetydpo.toyworld.world import CATEGORIES, caption

CONCEPT_PAIRS_TABLE = "concept_pairs.jsonl"


def concept_pairs() -> list[dict[str, Any]]:
    """Every (unsafe, safe) single-concept pair outside the held-out prompts, with its category and concept."""
    heldout = heldout_captions()
    pairs = []
    for category, (attribute, concepts) in CATEGORIES.items():
        for concept in concepts:
            for context in neutral_contexts(attribute):
                unsafe = caption({**context, attribute: concept})
                if unsafe not in heldout:
                    safe = caption({**context, attribute: SAFE_REWRITES[concept]})
                    pairs.append({"category": category, "concept": concept, "unsafe_prompt": unsafe, "safe_prompt": safe})
    return pairs


@ASSETS.register("toyworld_concept_pairs")
@dataclass
class ToyWorldConceptPairs(EvaluationAssets):
    """``concept_pairs.jsonl``: the non-held-out single-concept pairs (CoProV2 columns) Ring-A-Bell's concept comes from."""

    def write(self, folder: Path) -> None:
        with atomic_file(folder / CONCEPT_PAIRS_TABLE) as tmp:
            tmp.write_text("".join(json.dumps(row) + "\n" for row in concept_pairs()), encoding="utf-8")
