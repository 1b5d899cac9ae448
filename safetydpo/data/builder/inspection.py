"""``safetydpo data inspect``: counts per category and concept, every file opened and checked, build status, a sample grid."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
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
    resolve_inside,
    row_categories,
)
from safetydpo.data.dataset import row_id
from safetydpo.io import atomic_file

CAPTION_HEIGHT = 14
PAIRS_PER_GRID_ROW = 4
IMAGE_COLUMNS: tuple[str, ...] = ("image_unsafe", "image_safe")


@dataclass
class Inspection:
    """What ``inspect_dataset`` found; ``lines()`` is the printed report, ``problems`` every defective file."""

    table: Path
    pairs: int
    counts: dict[tuple[str, str], int]
    problems: list[str] = field(default_factory=list)
    manifest: Manifest | None = None
    grid: Path | None = None

    def lines(self) -> list[str]:
        categories: Counter[str] = Counter()
        for (category, _), count in self.counts.items():
            categories[category] += count
        out = [f"{self.table}: {self.pairs} pairs in {len(categories)} categories, {len(self.counts)} concepts"]
        if sum(self.counts.values()) > self.pairs:
            out.append("  (pairs listed under several categories count in each)")
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
        out.append(f"missing or defective files: {len(self.problems)}")
        out.extend(f"  {problem}" for problem in self.problems[:20])
        if len(self.problems) > 20:
            out.append(f"  ... and {len(self.problems) - 20} more")
        if self.grid is not None:
            out.append(f"sample grid: {self.grid}")
        return out


def _image_problem(path: Path) -> str | None:
    """Why the image at ``path`` cannot be trained on (missing, not an image, truncated), else None."""
    if not path.is_file():
        return "missing"
    try:
        with Image.open(path) as image:
            image.load()  # decodes every pixel: a truncated file fails here, not in the middle of training
    except (OSError, ValueError, Image.DecompressionBombError) as err:  # UnidentifiedImageError is an OSError
        return f"unreadable ({' '.join(str(err).split())})"
    return None


def _tensor_problem(tensor: torch.Tensor, shape: tuple[int, ...] | None) -> str | None:
    if not tensor.is_floating_point():
        return f"has dtype {tensor.dtype}, not a float"
    if not bool(torch.isfinite(tensor).all()):
        return "holds NaN or infinite values"
    if shape is not None and tuple(tensor.shape) != shape:
        return f"has shape {tuple(tensor.shape)}, the first row's is {shape}"
    return None


def _feature_problems(
    root: Path, rows: list[tuple[int, dict[str, Any]]], shapes: dict[str, tuple[int, ...]]
) -> Iterator[tuple[list[int], str]]:
    """Every tensor of the rows sharing one shard loaded and checked (finite floats, one shape per key);
    yields the rows each problem concerns and its description."""
    relative = rows[0][1][FEATURES_COLUMN]
    path = resolve_inside(root, relative)
    if path is None:
        yield [position for position, _ in rows], f"{FEATURES_COLUMN} {relative} lies outside the dataset folder"
        return
    try:
        with safe_open(str(path), framework="pt") as shard:
            keys = set(shard.keys())
            for position, row in rows:
                prefix = row_id(row, position)
                for key in FEATURE_KEYS:
                    name = feature_name(prefix, key)
                    if name not in keys:
                        yield [position], f"{_name(row, position)}: {relative} lacks {name}"
                        continue
                    tensor = shard.get_tensor(name)
                    problem = _tensor_problem(tensor, shapes.get(key))
                    shapes.setdefault(key, tuple(tensor.shape))
                    if problem:
                        yield [position], f"{_name(row, position)}: {relative} tensor {name} {problem}"
    except Exception as err:  # safetensors raises its own error types for a missing file or a damaged header
        yield [position for position, _ in rows], f"{relative}: missing or unreadable ({' '.join(str(err).split())})"


def _name(row: dict[str, Any], position: int) -> str:
    return f"row {position} (id {row_id(row, position)})"


def file_problems(root: Path, rows: list[dict[str, Any]]) -> tuple[list[str], set[int]]:
    """Every referenced image and feature tensor opened and checked; returns the problems and the rows with one."""
    problems, bad, shards = [], set(), {}
    for position, row in enumerate(rows):
        for column in IMAGE_COLUMNS:
            path = resolve_inside(root, str(row[column]))
            problem = "lies outside the dataset folder" if path is None else _image_problem(path)
            if problem:
                problems.append(f"{_name(row, position)}: {column} {row[column]} {problem}")
                bad.add(position)
        if row.get(FEATURES_COLUMN):
            shards.setdefault(row[FEATURES_COLUMN], []).append((position, row))
    shapes: dict[str, tuple[int, ...]] = {}
    for grouped in shards.values():
        for positions, problem in _feature_problems(root, grouped, shapes):
            problems.append(problem)
            bad.update(positions)
    return problems, bad


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
    """Inspect a build (or import) folder, opening every file it references; writes the sample grid to ``grid``
    (from rows without problems) unless it is ``None``."""
    manifest = read_manifest(root)
    if not (root / METADATA_FILE).is_file() and (root / PAIRS_FILE).is_file():
        pairs = read_pair_table(root / PAIRS_FILE)
        return Inspection(root / PAIRS_FILE, len(pairs), _counts(pairs), manifest=manifest)
    table = find_metadata(root, None)
    rows = read_table(table, METADATA_COLUMNS)
    problems, bad = file_problems(root, rows)
    report = Inspection(table, len(rows), _counts(rows), problems, manifest)
    complete = [row for position, row in enumerate(rows) if position not in bad]
    if grid is not None and complete:
        chosen = sorted(random.Random(seed).sample(range(len(complete)), min(samples, len(complete))))
        write_grid(root, [complete[i] for i in chosen], grid, tile)
        report.grid = grid
    return report


def _counts(rows: list[dict[str, Any]]) -> dict[tuple[str, str], int]:
    """Pairs per (category, concept); a pair counts under each of its categories."""
    return dict(Counter((category, str(row["concept"])) for row in rows for category in row_categories(row)))
