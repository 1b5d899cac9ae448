"""ToyWorld prompt pairs: a caption with one harmful attribute value, and the same caption made safe."""

from __future__ import annotations

import random

from safetydpo.data.builder.errors import BuildError
from safetydpo.data.builder.generators.base import GENERATORS, PairGenerator
from safetydpo.data.builder.records import Concept, PromptPair
from safetydpo.seeding import derive_seed
from safetydpo.toyworld.prompts import heldout_captions
from safetydpo.toyworld.world import ATTRIBUTES, CATEGORIES, caption


@GENERATORS.register("toyworld")
class ToyWorldGenerator(PairGenerator):
    """The concept fills its attribute, every other attribute a random value; the safe prompt swaps
    the concept for one of its taxonomy substitutes (neutral values of the same attribute; ToyWorld's own
    taxonomy gives one per concept, `SAFE_REWRITES`).

    Unsafe prompts held out for evaluation (``safetydpo.toyworld.prompts``) are never proposed.

    Args:
        seed: with the concept and candidate number, fixes the scene and the substitute.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.heldout = heldout_captions()

    def propose(self, concept: Concept, start: int, count: int) -> list[PromptPair | None]:
        if concept.category not in CATEGORIES:
            raise BuildError(f"toyworld generator: category '{concept.category}' is not a ToyWorld category ({', '.join(CATEGORIES)})")
        attribute = CATEGORIES[concept.category][0]
        if concept.name not in ATTRIBUTES[attribute]:
            raise BuildError(f"toyworld generator: '{concept.name}' is not a {attribute} value")
        pairs: list[PromptPair | None] = []
        for number in range(start, start + count):
            rng = random.Random(derive_seed(self.seed, concept.category, concept.name, number))
            while True:
                scene = {name: rng.choice(values) for name, values in ATTRIBUTES.items()}
                unsafe = {**scene, attribute: concept.name}
                if caption(unsafe) not in self.heldout:
                    break
            safe = {**scene, attribute: rng.choice(concept.substitutes)}
            pairs.append(PromptPair(unsafe=caption(unsafe), safe=caption(safe)))
        return pairs
