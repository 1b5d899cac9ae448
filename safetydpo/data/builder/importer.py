"""``safetydpo data import``: externally provided pair tables (e.g. the released CoProV2) -> our pair format.

It writes ``pairs.parquet`` (render it with your own model through ``pairs_from`` in a build
config) and, given the folder of the table's images, a ``metadata.parquet`` the DataModule trains
on directly. Everything is checked before anything is written, so a failed import leaves the
output folder as it was.
"""

from __future__ import annotations

import filecmp
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetydpo.data.builder.errors import BuildError
from safetydpo.data.builder.lock import output_lock
from safetydpo.data.builder.manifest import MANIFEST_FILE
from safetydpo.data.builder.pair_table import check_pair_row, check_unique_ids
from safetydpo.data.builder.records import Concept
from safetydpo.data.builder.taxonomy_file import load_taxonomy
from safetydpo.data.coprov2 import (
    CATEGORIES_COLUMN,
    FEATURES_COLUMN,
    METADATA_FILE,
    METADATA_SCHEMA,
    PAIR_SCHEMA,
    PAIRS_FILE,
    RELEASED_COLUMNS,
    names_concept,
    read_table,
    released_images,
    resolve_inside,
    row_categories,
    write_table,
)
from safetydpo.io import atomic_file

LAYOUTS: tuple[str, ...] = ("auto", "coprov2", "pairs")
#: Our column names, and which a generic table must provide.
TABLE_COLUMNS: tuple[str, ...] = ("id", "category", "concept", "unsafe_prompt", "safe_prompt", "image_unsafe", "image_safe")
REQUIRED_TABLE_COLUMNS: tuple[str, ...] = ("category", "unsafe_prompt", "safe_prompt")
#: Seed of imported renders: unknown (the DataModule needs a value; training does not use it, evaluation
#: renders such prompts with its own ``generation.seed``).
UNKNOWN_SEED = -1
#: Where images from an ``--images`` folder outside the output folder are linked (or copied) to.
IMAGES_DIR = "images"


@dataclass
class ImportResult:
    """``categories``: pairs per category (a pair listed under several counts in each); ``copied``: images that
    could not be hard-linked into the output folder (another file system) and were copied."""

    pairs: int
    unpaired: int
    categories: dict[str, int]
    metadata: bool
    copied: int = 0


def _coprov2_pairs(rows: list[dict[str, Any]], table: Path) -> tuple[list[dict[str, Any]], int]:
    """Join ``u_<key>`` and ``s_<key>`` images; returns the pairs (in order of first appearance) and the unpaired count.

    A pair belongs to every category either of its images is listed under, the unsafe image's first.
    """
    images = released_images(rows, table, BuildError)
    if not any(image["side"] for image in images):
        raise BuildError(
            f"{table} has no u_/s_ image pairs (names like '{images[0]['image']}'): it is a prompt list such as the "
            "release's CoProv2_test.csv, not training pairs; evaluate on it as it is (prompt_sets: source coprov2, "
            f"path {table})"
        )
    sides: dict[str, dict[str, dict[str, Any]]] = {}
    for image in images:
        if image["side"] is None:
            raise BuildError(f"{table} row {image['row']}: image '{image['image']}' is not named u_<index> (unsafe) or s_<index> (safe)")
        sides.setdefault(image["key"], {})[image["side"]] = image
    pairs = []
    for key, pair in sides.items():
        if "u" not in pair or "s" not in pair:
            continue
        unsafe, safe = pair["u"], pair["s"]
        categories = list(dict.fromkeys(unsafe["categories"] + safe["categories"]))
        pairs.append(
            {
                "id": key,
                "category": categories[0],
                CATEGORIES_COLUMN: ",".join(categories),
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
    missing = [column for column in required if column not in rows[0]]
    if missing:
        raise BuildError(f"{table} is missing column(s) {', '.join(missing)}; map yours with --column unsafe_prompt=NAME etc.")
    present = {ours: theirs for ours, theirs in names.items() if theirs in rows[0]}
    return [{"id": f"row-{i:07d}", **{ours: row.get(theirs) for ours, theirs in present.items()}} for i, row in enumerate(rows)]


def _taxonomy_concept(pair: dict[str, str], concepts: list[Concept]) -> str:
    """The first taxonomy concept of the pair's categories that its unsafe prompt names, else its category.

    The DataModule splits train/validation by concept, so a table without concepts gets them from
    a taxonomy where it can (the released CoProV2 has no concept column). A pair has one concept
    whatever its categories, so it is never in training and validation at once.
    """
    for category in row_categories(pair):
        for concept in concepts:
            if concept.category == category and names_concept(pair["unsafe_prompt"], concept.name):
                return concept.name
    return pair["category"]


def _source_images(pairs: list[dict[str, Any]], raw: list[dict[str, Any]], images: Path) -> list[dict[str, Path]]:
    """Each pair's image files under ``images`` (resolved), all checked to exist and to lie inside it."""
    found, missing = [], []
    for pair, source in zip(pairs, raw):
        paths = {}
        for column in ("image_unsafe", "image_safe"):
            if not source.get(column):
                raise BuildError(f"pair {pair['id']} has no {column}; --images needs image columns in the table")
            path = resolve_inside(images, str(source[column]))
            if path is None:
                raise BuildError(f"pair {pair['id']}: {column} '{source[column]}' lies outside --images {images}; keep the images under it")
            if not path.is_file():
                missing.append(str(path))
            paths[column] = path
        found.append(paths)
    if missing:
        raise BuildError(f"{len(missing)} image file(s) of the table are missing under {images}, first: {missing[0]}")
    return found


def _place(source: Path, target: Path) -> bool:
    """Hard-link ``source`` to ``target`` (copy it atomically across file systems); True when copied.

    An identical target (the same file, or a copy with the same size and time) is kept, so a rerun
    of an interrupted import only places what is missing.
    """
    if target.exists():
        if os.path.samefile(source, target) or filecmp.cmp(source, target, shallow=True):
            return False
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)  # a link appears whole; never chmod it (that would change the user's original)
        return False
    except OSError:
        with atomic_file(target) as tmp:
            shutil.copy2(source, tmp)
        return True


def _metadata_rows(pairs: list[dict[str, Any]], files: list[dict[str, Path]], images: Path, out_dir: Path) -> tuple[list[dict[str, Any]], int]:
    """Rows whose image paths stay inside ``out_dir``: images already under it are used in place, others are
    linked into ``out_dir/images`` (the DataModule refuses paths that leave its folder). Returns rows and copies."""
    root, image_root = out_dir.resolve(), images.resolve()
    inside = image_root.is_relative_to(root)
    rows, copied = [], 0
    for pair, paths in zip(pairs, files):
        relative = {}
        for column, path in paths.items():
            if inside:
                relative[column] = path.relative_to(root).as_posix()
            else:
                target = Path(IMAGES_DIR) / path.relative_to(image_root)
                if resolve_inside(root, target.parent.as_posix()) is None:
                    raise BuildError(f"{out_dir / target.parent} links out of {out_dir}; the DataModule reads only files inside it, remove the link")
                copied += _place(path, root / target)
                relative[column] = target.as_posix()
        rows.append({**pair, "seed": UNKNOWN_SEED, **relative, FEATURES_COLUMN: None})
    return rows, copied


def import_table(
    table: Path,
    out_dir: Path,
    layout: str = "auto",
    images: Path | None = None,
    taxonomy: Path | None = None,
    columns: dict[str, str] | None = None,
) -> ImportResult:
    """Write ``out_dir/pairs.parquet`` (and ``metadata.parquet`` when ``images`` is given) from ``table``.

    One import (or build) at a time writes ``out_dir``; a failed import into a new folder removes it.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise BuildError(f"--out {out_dir} is a file; name a folder")
    created = not out_dir.exists()
    try:
        with output_lock(out_dir, "import"):
            return _import_table(table, out_dir, layout, images, taxonomy, columns)
    except BaseException:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _import_table(
    table: Path, out_dir: Path, layout: str, images: Path | None, taxonomy: Path | None, columns: dict[str, str] | None
) -> ImportResult:
    if layout not in LAYOUTS:
        raise BuildError(f"layout '{layout}' is not one of {', '.join(LAYOUTS)}")
    if (out_dir / MANIFEST_FILE).is_file():
        raise BuildError(f"{out_dir} is a build folder ({MANIFEST_FILE}); import into a new folder")
    if images is None and (out_dir / METADATA_FILE).is_file():
        raise BuildError(f"{out_dir} holds a {METADATA_FILE} that this import would leave stale; pass --images or import into a new folder")
    rows = read_table(table, error=BuildError)
    if not rows:
        raise BuildError(f"table {table} has no rows")
    if layout == "auto":
        layout = "coprov2" if all(c in rows[0] for c in RELEASED_COLUMNS) and "unsafe_prompt" not in (columns or {}) else "pairs"
    if layout == "coprov2":
        raw, unpaired = _coprov2_pairs(rows, table)
    else:
        raw, unpaired = _generic_pairs(rows, table, columns or {}), 0
    concepts = load_taxonomy(taxonomy) if taxonomy else []
    pairs = []
    for index, row in enumerate(raw):
        pair = check_pair_row({**row, "concept": row.get("concept") or "unset"}, f"{table} pair {index} (id {row['id']})")
        if not row.get("concept"):
            pair["concept"] = _taxonomy_concept(pair, concepts)
        pairs.append(pair)
    check_unique_ids(pairs, table)
    copied = 0
    if images is not None:  # every image is checked before the first file is written
        metadata, copied = _metadata_rows(pairs, _source_images(pairs, raw, images), images, out_dir)
        write_table(metadata, out_dir / METADATA_FILE, METADATA_SCHEMA)
    write_table(pairs, out_dir / PAIRS_FILE, PAIR_SCHEMA)
    categories: dict[str, int] = {}
    for pair in pairs:
        for category in row_categories(pair):
            categories[category] = categories.get(category, 0) + 1
    return ImportResult(pairs=len(pairs), unpaired=unpaired, categories=categories, metadata=images is not None, copied=copied)
