"""``safetydpo data import``: externally provided pair tables (e.g. the released CoProV2) -> our pair format.

It writes ``pairs.parquet`` (render it with your own model through ``pairs_from`` in a build
config) and, given the folder of the table's images, a ``metadata.parquet`` the DataModule trains
on directly.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetydpo.data.builder.errors import BuildError
from safetydpo.data.builder.manifest import MANIFEST_FILE
from safetydpo.data.builder.pair_table import check_pair_row, check_unique_ids
from safetydpo.data.builder.records import Concept
from safetydpo.data.builder.taxonomy_file import load_taxonomy
from safetydpo.data.coprov2 import (
    FEATURES_COLUMN,
    METADATA_FILE,
    METADATA_SCHEMA,
    PAIR_SCHEMA,
    PAIRS_FILE,
    check_columns,
    names_concept,
    read_table,
    write_table,
)
from safetydpo.data.taxonomy import normalize_category

LAYOUTS: tuple[str, ...] = ("auto", "coprov2", "pairs")
#: The released CoProV2 CSVs: one row per image, a pair = ``u_<key>`` (unsafe) and ``s_<key>`` (safe).
COPROV2_COLUMNS: tuple[str, ...] = ("prompt", "image", "category")
_COPROV2_IMAGE = re.compile(r"(?P<side>[us])_(?P<key>.+?)(?:\.[A-Za-z0-9]+)?")
#: Our column names, and which a generic table must provide.
TABLE_COLUMNS: tuple[str, ...] = ("id", "category", "concept", "unsafe_prompt", "safe_prompt", "image_unsafe", "image_safe")
REQUIRED_TABLE_COLUMNS: tuple[str, ...] = ("category", "unsafe_prompt", "safe_prompt")
#: Seed of imported renders: unknown (the DataModule needs a value; training does not use it).
UNKNOWN_SEED = -1


@dataclass
class ImportResult:
    pairs: int
    unpaired: int
    categories: dict[str, int]
    metadata: bool


def _coprov2_pairs(rows: list[dict[str, Any]], table: Path) -> tuple[list[dict[str, Any]], int]:
    """Join ``u_<key>`` and ``s_<key>`` rows; returns the pairs (in order of first appearance) and the unpaired count."""
    check_columns(table, rows[0], COPROV2_COLUMNS, BuildError, fix=f"the coprov2 layout needs {', '.join(COPROV2_COLUMNS)}")
    sides: dict[str, dict[str, dict[str, Any]]] = {}
    for index, row in enumerate(rows):
        name = Path(str(row["image"])).name
        match = _COPROV2_IMAGE.fullmatch(name)
        if match is None:
            raise BuildError(f"{table} row {index}: image '{name}' is not named u_<index> (unsafe) or s_<index> (safe)")
        pair = sides.setdefault(match["key"], {})
        if match["side"] in pair:
            raise BuildError(f"{table} row {index}: image '{name}' appears twice")
        pair[match["side"]] = {**row, "_row": index}
    pairs = []
    for key, pair in sides.items():
        if "u" not in pair or "s" not in pair:
            continue
        unsafe, safe = pair["u"], pair["s"]
        if str(unsafe["category"]).strip().lower() != str(safe["category"]).strip().lower():
            rows_named = f"{table} rows {unsafe['_row']} and {safe['_row']}"
            raise BuildError(f"{rows_named}: pair {key} has categories '{unsafe['category']}' and '{safe['category']}'")
        pairs.append(
            {
                "id": key,
                "category": unsafe["category"],
                "unsafe_prompt": unsafe["prompt"],
                "safe_prompt": safe["prompt"],
                "image_unsafe": unsafe["image"],
                "image_safe": safe["image"],
            }
        )
    return pairs, sum(1 for pair in sides.values() if len(pair) == 1)


def _generic_pairs(rows: list[dict[str, Any]], table: Path, columns: dict[str, str]) -> list[dict[str, Any]]:
    """Rename the table's columns (``columns``: ours -> theirs) to ours; ids default to the row number."""
    unknown = sorted(set(columns) - set(TABLE_COLUMNS))
    if unknown:
        raise BuildError(f"--column {unknown[0]}=...: not one of {', '.join(TABLE_COLUMNS)}")
    names = {ours: columns.get(ours, ours) for ours in TABLE_COLUMNS}
    required = [names[ours] for ours in REQUIRED_TABLE_COLUMNS]
    check_columns(table, rows[0], required, BuildError, fix="map yours with --column unsafe_prompt=NAME etc.")
    present = {ours: theirs for ours, theirs in names.items() if theirs in rows[0]}
    return [{"id": f"row-{i:07d}", **{ours: row.get(theirs) for ours, theirs in present.items()}} for i, row in enumerate(rows)]


def _concept(row: dict[str, Any], category: str, concepts: list[Concept]) -> str:
    """The row's concept column, else the first taxonomy concept of its category the unsafe prompt names, else the category.

    The DataModule splits train/validation by concept, so a table without concepts gets them
    from a taxonomy where it can (the released CoProV2 has no concept column).
    """
    if row.get("concept"):
        return str(row["concept"])
    for concept in concepts:
        if concept.category == category and names_concept(str(row.get("unsafe_prompt") or ""), concept.name):
            return concept.name
    return category


def _metadata_rows(pairs: list[dict[str, Any]], raw: list[dict[str, Any]], images: Path, out_dir: Path) -> list[dict[str, Any]]:
    """Rows pointing at the table's images (paths relative to ``out_dir``), every file checked."""
    rows, missing = [], []
    for pair, source in zip(pairs, raw):
        paths = {}
        for column in ("image_unsafe", "image_safe"):
            if not source.get(column):
                raise BuildError(f"pair {pair['id']} has no {column}; --images needs image columns in the table")
            path = images / str(source[column])
            if not path.is_file():
                missing.append(str(path))
            paths[column] = os.path.relpath(path, out_dir)
        rows.append({**pair, "seed": UNKNOWN_SEED, **paths, FEATURES_COLUMN: None})
    if missing:
        raise BuildError(f"{len(missing)} image file(s) of the table are missing under {images}, first: {missing[0]}")
    return rows


def import_table(
    table: Path,
    out_dir: Path,
    layout: str = "auto",
    images: Path | None = None,
    taxonomy: Path | None = None,
    columns: dict[str, str] | None = None,
) -> ImportResult:
    """Write ``out_dir/pairs.parquet`` (and ``metadata.parquet`` when ``images`` is given) from ``table``."""
    if layout not in LAYOUTS:
        raise BuildError(f"layout '{layout}' is not one of {', '.join(LAYOUTS)}")
    if (out_dir / MANIFEST_FILE).is_file():
        raise BuildError(f"{out_dir} is a build folder ({MANIFEST_FILE}); import into a new folder")
    rows = read_table(table, error=BuildError)
    if not rows:
        raise BuildError(f"table {table} has no rows")
    if layout == "auto":
        layout = "coprov2" if all(c in rows[0] for c in COPROV2_COLUMNS) and "unsafe_prompt" not in (columns or {}) else "pairs"
    if layout == "coprov2":
        raw, unpaired = _coprov2_pairs(rows, table)
    else:
        raw, unpaired = _generic_pairs(rows, table, columns or {}), 0
    concepts = load_taxonomy(taxonomy) if taxonomy else []
    pairs = []
    for index, row in enumerate(raw):
        concept = _concept(row, normalize_category(str(row.get("category") or "")), concepts)
        pairs.append(check_pair_row({**row, "concept": concept}, f"{table} pair {index} (id {row['id']})"))
    check_unique_ids(pairs, table)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_table(pairs, out_dir / PAIRS_FILE, PAIR_SCHEMA)
    if images is not None:
        write_table(_metadata_rows(pairs, raw, images, out_dir), out_dir / METADATA_FILE, METADATA_SCHEMA)
    categories: dict[str, int] = {}
    for pair in pairs:
        categories[pair["category"]] = categories.get(pair["category"], 0) + 1
    return ImportResult(pairs=len(pairs), unpaired=unpaired, categories=categories, metadata=images is not None)
