"""The builder's rules for pair rows (ids safe as file names, category slugs) and the checked ``pairs.parquet`` read."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from safetydpo.data.builder.errors import BuildError
from safetydpo.data.coprov2 import CATEGORIES_COLUMN, PAIR_COLUMNS, read_table, require_values, row_categories, slugify

# Ids name image files and prefix feature tensors: no path separators, no dots.
_ID = re.compile(r"[A-Za-z0-9_\-]+")


def check_pair_row(row: dict[str, Any], where: str) -> dict[str, str]:
    """A row with the pair columns as clean strings, its categories normalised; errors name ``where``.

    A pair listed under several categories keeps them all in ``categories`` (``category`` first).
    """
    clean = {column: " ".join(("" if row.get(column) is None else str(row[column])).split()) for column in PAIR_COLUMNS}
    require_values(clean, PAIR_COLUMNS, where, BuildError)
    if not _ID.fullmatch(clean["id"]):
        raise BuildError(f"{where}: id '{clean['id']}' may only use letters, digits, '_' and '-'")
    categories = row_categories({**row, "category": clean["category"]})
    for name in categories:
        if slugify(name) != name:
            raise BuildError(f"{where}: category '{name}' may only use letters, digits, spaces, '-' and '_'")
    clean["category"] = categories[0]
    if len(categories) > 1:
        clean[CATEGORIES_COLUMN] = ",".join(categories)
    return clean


def check_unique_ids(rows: list[dict[str, str]], source: Path) -> None:
    """One line naming the first id that appears twice in ``source``."""
    seen: set[str] = set()
    for index, row in enumerate(rows):
        if row["id"] in seen:
            raise BuildError(f"{source} row {index}: id '{row['id']}' appears twice")
        seen.add(row["id"])


def read_pair_table(path: Path) -> list[dict[str, str]]:
    """A ``pairs.parquet``-format table (``safetydpo data import`` writes one), checked row by row."""
    rows = read_table(path, PAIR_COLUMNS, what="pair table", error=BuildError)
    if not rows:
        raise BuildError(f"pair table {path} has no rows")
    checked = [check_pair_row(row, f"{path} row {index}") for index, row in enumerate(rows)]
    check_unique_ids(checked, path)
    return checked
