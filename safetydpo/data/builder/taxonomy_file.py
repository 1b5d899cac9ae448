"""Reading a taxonomy file: harm categories -> concepts -> safe substitutes (YAML)."""

from __future__ import annotations

from pathlib import Path

from safetydpo.data.builder.errors import BuildError
from safetydpo.data.builder.records import Concept
from safetydpo.data.coprov2 import names_concept, slugify
from safetydpo.data.taxonomy import normalize_category
from safetydpo.io import read_yaml


def _concept(path: Path, category: str, name: object, substitutes: object) -> Concept:
    where = f"taxonomy {path}: {category}/{name}"
    if not isinstance(name, str) or not slugify(name):
        raise BuildError(f"taxonomy {path}: category {category} has a concept name {name!r} without letters or digits")
    if not isinstance(substitutes, list) or not substitutes or not all(isinstance(s, str) and s.strip() for s in substitutes):
        raise BuildError(f"{where}: give a non-empty list of safe substitutes (strings), got {substitutes!r}")
    for substitute in substitutes:
        if names_concept(substitute, name):
            raise BuildError(f"{where}: safe substitute '{substitute}' mentions the concept itself")
    return Concept(category=category, name=name.strip(), substitutes=tuple(s.strip() for s in substitutes))


def load_taxonomy(path: str | Path) -> list[Concept]:
    """Every concept of the file, in file order; category names are normalised (``Self-harm`` -> ``self_harm``).

    Each concept maps to its safe substitutes: the template generator swaps one in for the
    concept, and language-model generators get them as examples of a minimal safe edit.
    """
    path = Path(path)
    data = read_yaml(path, "taxonomy file", BuildError)
    if not isinstance(data, dict) or not data:
        raise BuildError(f"taxonomy {path} must map categories to {{concept: [safe substitutes]}} mappings")
    concepts: list[Concept] = []
    seen: dict[str, str] = {}
    for raw_category, entries in data.items():
        category = normalize_category(raw_category)
        if not category or slugify(category) != category:
            raise BuildError(f"taxonomy {path}: category name {raw_category!r} may only use letters, digits, spaces, '-' and '_'")
        if category in seen:
            raise BuildError(f"taxonomy {path}: categories '{seen[category]}' and '{raw_category}' are both {category}")
        seen[category] = str(raw_category)
        if not isinstance(entries, dict) or not entries:
            raise BuildError(f"taxonomy {path}: category {raw_category} must map concept names to lists of safe substitutes")
        slugs: dict[str, str] = {}
        for name, substitutes in entries.items():
            concept = _concept(path, category, name, substitutes)
            slug = slugify(concept.name)
            if slug in slugs:
                raise BuildError(f"taxonomy {path}: concepts '{slugs[slug]}' and '{concept.name}' of {category} share the id '{slug}'")
            slugs[slug] = concept.name
            concepts.append(concept)
    return concepts
