"""The pair stage: ask a generator for candidates, keep the valid, new ones, checkpoint per concept."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetydpo.data.builder.errors import BuildError
from safetydpo.data.builder.generators import PairGenerator
from safetydpo.data.builder.records import Concept
from safetydpo.data.builder.validation import PairValidator
from safetydpo.data.coprov2 import pair_id, slugify, words
from safetydpo.io import write_json_atomic
from safetydpo.progress import progress_bar

#: Per-concept generation results, so an interrupted build does not ask the generator twice.
PAIR_CHECKPOINTS = Path(".build") / "pairs"
#: Rejection reasons counted here, besides the validator's.
UNPARSABLE, DUPLICATE = "unparsable", "duplicate"


@dataclass
class ConceptResult:
    """The accepted pairs of one concept and what it took to get them."""

    category: str
    concept: str
    requested: int
    candidates: int = 0
    pairs: list[list[str]] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)


def collect_pairs(
    generator: PairGenerator, validator: PairValidator, concept: Concept, count: int, attempts_per_pair: int, batch_size: int
) -> ConceptResult:
    """Ask for candidates until ``count`` pairs pass validation and dedup, or ``count × attempts_per_pair`` candidates are spent.

    Duplicates are judged on the unsafe prompt (case and punctuation ignored): two pairs that
    differ only on the safe side would teach the same image twice.
    """
    result = ConceptResult(category=concept.category, concept=concept.name, requested=count)
    rejected: Counter[str] = Counter()
    seen: set[tuple[str, ...]] = set()
    budget = count * attempts_per_pair
    while len(result.pairs) < count and result.candidates < budget:
        wanted = min(batch_size, count - len(result.pairs), budget - result.candidates)
        candidates = generator.propose(concept, result.candidates, wanted)
        if len(candidates) != wanted:
            raise BuildError(f"generator '{generator.registry_name}' proposed {len(candidates)} candidates when asked for {wanted}")
        for candidate in candidates:
            result.candidates += 1
            if candidate is None:
                rejected[UNPARSABLE] += 1
                continue
            key = tuple(words(candidate.unsafe))
            reason = validator.rejection(candidate, concept.name) or (DUPLICATE if key in seen else None)
            if reason is not None:
                rejected[reason] += 1
                continue
            seen.add(key)
            result.pairs.append([candidate.unsafe, candidate.safe])
    result.rejected = dict(sorted(rejected.items()))
    return result


def _checkpoint(root: Path, concept: Concept) -> Path:
    return root / PAIR_CHECKPOINTS / concept.category / f"{slugify(concept.name)}.json"


def generate_pairs(
    root: Path,
    concepts: list[Concept],
    generator: PairGenerator,
    validator: PairValidator,
    per_concept: int,
    attempts_per_pair: int,
    batch_size: int,
) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """Pair rows (``PAIR_SCHEMA``) for every concept and the generation report.

    Each concept's result is written atomically as soon as it is done, and concepts already on
    disk are read back, so a resumed build neither loses nor repeats generator work.
    """
    results = []
    for concept in progress_bar(concepts, desc="pairs", unit="concept"):
        path = _checkpoint(root, concept)
        if path.is_file():
            results.append(ConceptResult(**json.loads(path.read_text(encoding="utf-8"))))
            continue
        result = collect_pairs(generator, validator, concept, per_concept, attempts_per_pair, batch_size)
        write_json_atomic(path, asdict(result))
        results.append(result)
    rows = [
        {"id": pair_id(r.category, r.concept, i), "category": r.category, "concept": r.concept, "unsafe_prompt": u, "safe_prompt": s}
        for r in results
        for i, (u, s) in enumerate(r.pairs)
    ]
    return rows, generation_report(results)


def generation_report(results: list[ConceptResult]) -> dict[str, Any]:
    """Totals, rejections by reason, and the concepts that fell short of their quota."""
    rejected: Counter[str] = Counter()
    for result in results:
        rejected.update(result.rejected)
    return {
        "candidates": sum(r.candidates for r in results),
        "accepted": sum(len(r.pairs) for r in results),
        "rejected": dict(sorted(rejected.items())),
        "shortfall": {f"{r.category}/{r.concept}": f"{len(r.pairs)}/{r.requested}" for r in results if len(r.pairs) < r.requested},
        "concepts": {
            f"{r.category}/{r.concept}": {"accepted": len(r.pairs), "candidates": r.candidates, "rejected": r.rejected} for r in results
        },
    }
