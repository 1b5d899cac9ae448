"""``safetydpo data inspect``: counts per category and concept, missing files, build status, a sample grid."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from safetensors import safe_open

from safetydpo.data.builder.manifest import Manifest, read_manifest
from safetydpo.data.builder.pair_table import read_pair_table
from safetydpo.data.coprov2 import (
    FEATURE_KEYS,
    FEATURES_COLUMN,
    METADATA_COLUMNS,
    METADATA_FILE,
    PAIRS_FILE,
    feature_name,
    find_metadata,
    read_table,
)
from safetydpo.data.dataset import row_id
from safetydpo.io import atomic_file

CAPTION_HEIGHT = 14
PAIRS_PER_GRID_ROW = 4


@dataclass
class Inspection:
    """What ``inspect_dataset`` found; ``lines()`` is the printed report."""

    table: Path
    counts: dict[tuple[str, str], int]
    missing: list[str] = field(default_factory=list)
    manifest: Manifest | None = None
    grid: Path | None = None

    def lines(self) -> list[str]:
        categories: Counter[str] = Counter()
        for (category, _), count in self.counts.items():
            categories[category] += count
        out = [f"{self.table}: {sum(self.counts.values())} pairs in {len(categories)} categories, {len(self.counts)} concepts"]
        for category in sorted(categories):
            concepts = {concept: n for (c, concept), n in sorted(self.counts.items()) if c == category}
            out.append(f"  {category}: {categories[category]} ({', '.join(f'{k} {v}' for k, v in concepts.items())})")
        if self.manifest is not None:
            m = self.manifest
            out.append(f"build: {len(m.committed)}/{m.num_shards} shards committed, {'complete' if m.complete else 'incomplete'}")
            if m.pairs and "candidates" in m.pairs:
                accepted, candidates, rejected = m.pairs["accepted"], m.pairs["candidates"], m.pairs["rejected"]
                out.append(f"generation: {accepted} pairs from {candidates} candidates, rejected {rejected}")
                out.extend(f"  short: {name} {ratio}" for name, ratio in m.pairs["shortfall"].items())
        out.append(f"missing files: {len(self.missing)}")
        out.extend(f"  {problem}" for problem in self.missing[:20])
        if len(self.missing) > 20:
            out.append(f"  ... and {len(self.missing) - 20} more")
        if self.grid is not None:
            out.append(f"sample grid: {self.grid}")
        return out


def _feature_keys(root: Path, relative: str, cache: dict[str, set[str] | None]) -> set[str] | None:
    """Tensor names of a shard (read once), ``None`` if it is missing or unreadable."""
    if relative not in cache:
        try:
            with safe_open(str(root / relative), framework="pt") as shard:
                cache[relative] = set(shard.keys())
        except Exception:  # safetensors raises its own error types for a damaged header
            cache[relative] = None
    return cache[relative]


def missing_files(root: Path, rows: list[dict[str, Any]]) -> list[str]:
    """Every referenced image that is absent and every feature tensor that is absent or unreadable."""
    problems, shards = [], {}
    for position, row in enumerate(rows):
        name = f"row {position} (id {row_id(row, position)})"
        for column in ("image_unsafe", "image_safe"):
            if not (root / row[column]).is_file():
                problems.append(f"{name}: {column} {row[column]}")
        if row.get(FEATURES_COLUMN):
            keys = _feature_keys(root, row[FEATURES_COLUMN], shards)
            absent = [k for k in FEATURE_KEYS if keys is None or feature_name(row_id(row, position), k) not in keys]
            if absent:
                what = "missing or unreadable" if keys is None else f"lacks {', '.join(absent)}"
                problems.append(f"{name}: {row[FEATURES_COLUMN]} {what}")
    return problems


def write_grid(root: Path, rows: list[dict[str, Any]], path: Path, tile: int) -> None:
    """Pairs side by side (unsafe left, safe right) under a ``category/concept`` caption."""
    columns = min(PAIRS_PER_GRID_ROW, len(rows))
    grid_rows = -(-len(rows) // columns)
    cell_width, cell_height = 2 * tile, tile + CAPTION_HEIGHT
    grid = Image.new("RGB", (columns * cell_width, grid_rows * cell_height), "white")
    draw = ImageDraw.Draw(grid)
    for index, row in enumerate(rows):
        x, y = (index % columns) * cell_width, (index // columns) * cell_height
        draw.text((x + 2, y + 1), f"{row['category']}/{row['concept']}"[: cell_width // 6], fill="black")
        for offset, column in ((0, "image_unsafe"), (tile, "image_safe")):
            with Image.open(root / row[column]) as image:
                grid.paste(image.convert("RGB").resize((tile, tile)), (x + offset, y + CAPTION_HEIGHT))
    with atomic_file(path) as tmp:
        grid.save(tmp, format="PNG")


def inspect_dataset(root: Path, grid: Path | None, samples: int = 8, seed: int = 0, tile: int = 128) -> Inspection:
    """Inspect a build (or import) folder; writes the sample grid to ``grid`` unless it is ``None``."""
    manifest = read_manifest(root)
    if not (root / METADATA_FILE).is_file() and (root / PAIRS_FILE).is_file():
        pairs = read_pair_table(root / PAIRS_FILE)
        return Inspection(root / PAIRS_FILE, dict(Counter((r["category"], r["concept"]) for r in pairs)), manifest=manifest)
    table = find_metadata(root, None)
    rows = read_table(table, METADATA_COLUMNS)
    counts = dict(Counter((str(r["category"]), str(r["concept"])) for r in rows))
    report = Inspection(table, counts, missing_files(root, rows), manifest)
    complete = [row for row in rows if (root / row["image_unsafe"]).is_file() and (root / row["image_safe"]).is_file()]
    if grid is not None and complete:
        chosen = sorted(random.Random(seed).sample(range(len(complete)), min(samples, len(complete))))
        write_grid(root, [complete[i] for i in chosen], grid, tile)
        report.grid = grid
    return report

