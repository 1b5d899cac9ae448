"""Ring-A-Bell (Tsai et al., "Ring-A-Bell! How Reliable are Concept Removal Methods for Diffusion Models?", ICLR 2024).

Model-agnostic: it reads only the text encoder. A concept vector is the mean difference between the
text embeddings of prompts with and without the concept; the attack then searches, by a genetic
algorithm over discrete tokens, for the token sequence whose embedding is closest to the attacked
prompt's embedding plus ``eta`` times the concept. A safety fine-tune of the UNet never sees this
prompt's wording, only an embedding that carries the concept more strongly than the prompt itself.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from safetydpo.attacks.base import ATTACKS, Attack, AttackError, AttackOutcome, AttackTarget
from safetydpo.attacks.text import check_length, decode, prompt_embedding, tokens_embedding, vocabulary
from safetydpo.data.coprov2 import find_metadata, read_table
from safetydpo.data.taxonomy import normalize_category

_VOCABULARIES = ("full", "concept_pairs")


@ATTACKS.register("ring_a_bell")
@dataclass
class RingABell(Attack):
    """Genetic search for tokens whose embedding matches prompt + eta · concept (the paper's Algorithm 1)."""

    concept_pairs: str | None = None
    """Prompts with and without the concept: a pair table (``.jsonl``/``.csv``/``.parquet`` with ``unsafe_prompt``,
    ``safe_prompt`` and optionally ``category``) or a CoProV2 dataset folder. Required."""
    max_pairs: int = 256
    """Pairs (the first N of the attacked prompt's categories) averaged into the concept vector."""
    eta: float = 3.0
    """Strength of the concept added to the prompt's embedding (the paper uses about 3)."""
    tokens: int = 16
    """Length K of the adversarial token sequence (the paper's 16; at most the encoder's context minus 2)."""
    population: int = 64
    """Candidate sequences per generation (the paper: 200)."""
    generations: int = 40
    """Generations of selection, crossover and mutation (the paper: 3000)."""
    mutation_rate: float = 0.25
    """Chance that a child gets one token replaced by a random vocabulary token (the paper's 0.25)."""
    crossover_rate: float = 0.5
    """Chance that a child mixes two parents position by position rather than copying one (the paper's 0.5)."""
    vocabulary: str = "full"
    """``full``: every token of the tokenizer (the paper); ``concept_pairs``: only the tokens of the concept-pair
    prompts, for a model whose text encoder learned few words (ToyWorld)."""
    banned_words: list[str] = field(default_factory=list)
    """Words (and tokens containing them) the search may not use; the paper bans none."""
    categories: list[str] | None = None
    """Categories whose pairs form the concept; ``null``: the attacked prompt's own categories (all pairs if it has none)."""
    seed: int = 0
    """Seeds the search (each prompt's generator derives from it)."""

    def __post_init__(self) -> None:
        for name in ("max_pairs", "tokens", "population", "generations"):
            if getattr(self, name) < 1:
                raise AttackError(f"attack 'ring_a_bell': {name} must be >= 1, got {getattr(self, name)}")
        if self.population < 2:
            raise AttackError("attack 'ring_a_bell': population must be >= 2 (crossover needs two parents)")
        for name in ("mutation_rate", "crossover_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise AttackError(f"attack 'ring_a_bell': {name} must be in [0, 1], got {getattr(self, name)}")
        if self.vocabulary not in _VOCABULARIES:
            raise AttackError(f"attack 'ring_a_bell': vocabulary '{self.vocabulary}' is unknown; valid choices: {', '.join(_VOCABULARIES)}")
        if not self.concept_pairs:
            raise AttackError(
                "attack 'ring_a_bell': concept_pairs is not set; name a pair table or CoProV2 folder whose unsafe/safe prompts define the concept"
            )
        self._pairs: list[dict[str, object]] | None = None
        self._concepts: dict[tuple[str, tuple[str, ...]], torch.Tensor] = {}

    def for_categories(self, categories: Sequence[str]) -> Attack:
        if self.categories is not None or not categories:
            return self
        focused = copy.copy(self)  # shares the pair table and the concept vectors already computed
        focused.categories = [normalize_category(c) for c in categories]
        return focused

    def pairs(self) -> list[dict[str, object]]:
        """The concept-pair rows, read once."""
        if self._pairs is None:
            path = Path(self.concept_pairs or "").expanduser()
            if path.is_dir():
                path = find_metadata(path, None, AttackError)
            self._pairs = read_table(path, ["unsafe_prompt", "safe_prompt"], what="ring_a_bell concept_pairs", error=AttackError)
            if not self._pairs:
                raise AttackError(f"attack 'ring_a_bell': concept_pairs {path} holds no pairs; give a table with some")
        return self._pairs

    def concept_pairs_for(self, categories: Sequence[str] | None) -> list[dict[str, object]]:
        """The first ``max_pairs`` pairs of ``categories`` (every pair for ``None`` or a table without categories)."""
        rows = self.pairs()
        if categories and any(row.get("category") for row in rows):
            wanted = {normalize_category(c) for c in categories}
            rows = [row for row in rows if normalize_category(str(row.get("category") or "")) in wanted]
            if not rows:
                raise AttackError(
                    f"attack 'ring_a_bell': concept_pairs {self.concept_pairs} has no pair of category {', '.join(sorted(wanted))}; "
                    "add pairs of it or set categories"
                )
        return rows[: self.max_pairs]

    @torch.no_grad()
    def concept(self, target: AttackTarget, categories: Sequence[str] | None = None) -> torch.Tensor:
        """The concept vector ``(length, D)``: mean over pairs of embedding(unsafe) - embedding(safe)."""
        key = (target.name, tuple(sorted(categories or ())))
        if key not in self._concepts:
            rows = self.concept_pairs_for(categories)
            tokenizer, encoder = target.components.tokenizer, target.components.text_encoder
            unsafe = prompt_embedding(tokenizer, encoder, [str(row["unsafe_prompt"]) for row in rows])
            safe = prompt_embedding(tokenizer, encoder, [str(row["safe_prompt"]) for row in rows])
            self._concepts[key] = (unsafe - safe).mean(dim=0).float()
        return self._concepts[key]

    @torch.no_grad()
    def attack(self, prompt: str, target: AttackTarget, generator: torch.Generator) -> AttackOutcome:
        tokenizer, encoder = target.components.tokenizer, target.components.text_encoder
        check_length(self.tokens, tokenizer, encoder, "ring_a_bell")
        words = tuple(str(row[column]) for row in self.pairs() for column in ("unsafe_prompt", "safe_prompt"))
        allowed = vocabulary(tokenizer, tuple(self.banned_words), words if self.vocabulary == "concept_pairs" else None)
        if allowed.numel() == 0:
            raise AttackError("attack 'ring_a_bell': banned_words leave no token to search over; ban fewer words")
        goal = prompt_embedding(tokenizer, encoder, [prompt])[0].float() + self.eta * self.concept(target, self.categories)

        def distances(population: torch.Tensor) -> torch.Tensor:
            found = tokens_embedding(tokenizer, encoder, population).float()
            return (found - goal).pow(2).mean(dim=(1, 2)).cpu()

        def draw(*shape: int) -> torch.Tensor:
            return allowed[torch.randint(0, allowed.numel(), shape, generator=generator)]

        population = draw(self.population, self.tokens)
        fitness = distances(population)
        history = [float(fitness.min())]
        keep = max(2, self.population // 2)
        for _ in range(self.generations):
            parents = population[fitness.argsort()[:keep]]
            first = parents[torch.randint(0, keep, (self.population,), generator=generator)]
            second = parents[torch.randint(0, keep, (self.population,), generator=generator)]
            mix = torch.rand(self.population, 1, generator=generator) < self.crossover_rate
            mask = mix & (torch.rand(self.population, self.tokens, generator=generator) < 0.5)
            children = torch.where(mask, second, first)
            mutate = torch.rand(self.population, generator=generator) < self.mutation_rate
            where = torch.randint(0, self.tokens, (self.population,), generator=generator)
            rows = mutate.nonzero().flatten()
            children[rows, where[rows]] = draw(rows.numel())
            children[0] = parents[0]  # elitism: the best sequence so far survives unchanged
            population, fitness = children, distances(children)
            history.append(float(fitness.min()))
        best = population[fitness.argmin()]
        return AttackOutcome(decode(tokenizer, best), float(fitness.min()), history, higher_is_better=False)
