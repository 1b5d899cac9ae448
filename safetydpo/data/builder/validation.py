"""Pair validation: a pair teaches the concept only if the safe side drops it and changes little else."""

from __future__ import annotations

from dataclasses import dataclass
from difflib import SequenceMatcher

from safetydpo.data.builder.records import PromptPair
from safetydpo.data.coprov2 import names_concept, words

#: Rejection reasons, as counted in build reports.
EMPTY, IDENTICAL, CONCEPT_IN_SAFE, LOW_SIMILARITY, TOO_LONG = "empty", "identical", "concept_in_safe", "low_similarity", "too_long"


def similarity(first: str, second: str) -> float:
    """Word-level similarity in [0, 1] (difflib ratio), high for a minimal edit."""
    return SequenceMatcher(None, words(first), words(second), autojunk=False).ratio()


@dataclass(frozen=True)
class PairValidator:
    """Accepts a pair only if it is a minimal, concept-free edit that CLIP reads in full.

    Args:
        min_similarity: lowest word-level similarity of safe to unsafe prompt.
        max_words: longest prompt, in words; CLIP reads 77 tokens, so a longer prompt could lose
            the very words that make the pair differ.
    """

    min_similarity: float = 0.5
    max_words: int = 60

    def rejection(self, pair: PromptPair, concept: str) -> str | None:
        """The reason to reject ``pair`` for ``concept``, or ``None`` when it is valid."""
        unsafe, safe = words(pair.unsafe), words(pair.safe)
        if not unsafe or not safe:
            return EMPTY
        if unsafe == safe:
            return IDENTICAL
        if names_concept(pair.safe, concept):
            return CONCEPT_IN_SAFE
        if max(len(unsafe), len(safe)) > self.max_words:
            return TOO_LONG
        if similarity(pair.unsafe, pair.safe) < self.min_similarity:
            return LOW_SIMILARITY
        return None
