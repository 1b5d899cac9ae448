"""The CoProV2 on-disk format, in one place: file names, table schemas, feature keys, the table reader.

A dataset folder holds ``metadata.parquet`` (or ``metadata.jsonl``; the table the DataModule trains
on), optionally ``pairs.parquet`` (prompt pairs without renders, as ``safetydpo data build`` and
``import`` write them), the renders under ``images/`` and ``features/shard-NNNNN.safetensors``
shards of precomputed tensors. docs/data.md describes the columns. The rule for "does this prompt
name the concept" lives here too, because both the builder (no concept in a safe prompt) and the
DataModule (no trained concept in an anchor) must apply the same one.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import re
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from safetydpo.data.taxonomy import normalize_category
from safetydpo.io import atomic_file


class DatasetError(ValueError):
    """A preference dataset is malformed; the message names the file, row or column at fault."""


METADATA_FILE = "metadata.parquet"
#: Where the DataModule and the CoProV2 prompt source look for the metadata table, in order.
METADATA_CANDIDATES: tuple[str, ...] = (METADATA_FILE, "metadata.jsonl")
PAIRS_FILE = "pairs.parquet"

#: Optional column: every category of a pair listed under several (comma-separated, ``category`` first).
CATEGORIES_COLUMN = "categories"
#: Required columns of a pairs table.
PAIR_COLUMNS: tuple[str, ...] = ("id", "category", "concept", "unsafe_prompt", "safe_prompt")
PAIR_SCHEMA = pa.schema([(name, pa.string()) for name in (*PAIR_COLUMNS, CATEGORIES_COLUMN)])
#: Optional metadata column: relative path of a safetensors shard with this row's precomputed tensors.
FEATURES_COLUMN = "features"
METADATA_SCHEMA = pa.schema(
    [
        *PAIR_SCHEMA,
        ("seed", pa.int64()),
        ("image_unsafe", pa.string()),
        ("image_safe", pa.string()),
        (FEATURES_COLUMN, pa.string()),
    ]
)
#: Required columns of a metadata table (``id``, ``categories`` and ``features`` are optional).
METADATA_COLUMNS: tuple[str, ...] = ("unsafe_prompt", "safe_prompt", "category", "concept", "seed", "image_unsafe", "image_safe")
#: Tensor names inside a features shard, each prefixed by the row id (see ``feature_name``).
FEATURE_KEYS: tuple[str, ...] = ("latent_safe", "latent_unsafe", "prompt_embeds")
#: Tensor names a shard holds when the model has them: the pooled text embeddings of SDXL and SD3.
OPTIONAL_FEATURE_KEYS: tuple[str, ...] = ("pooled_prompt_embeds",)


#: Columns of the released CoProV2 CSVs (``CoProv2_train.csv``, ``CoProv2_test.csv``): one row per image.
RELEASED_COLUMNS: tuple[str, ...] = ("prompt", "image", "category")
# ``u_idx_0000000_0.jpg`` (unsafe side of pair idx_0000000_0), ``s_...`` (safe side), ``0000000_0.jpg`` (a test prompt).
_RELEASED_IMAGE = re.compile(r"(?:(?P<side>[us])_)?(?P<key>.+?)(?:\.[A-Za-z0-9]+)?")


def row_categories(row: Mapping[str, Any]) -> tuple[str, ...]:
    """Every category of a row, normalised, ``category`` first: one released pair can be listed under several."""
    extra = row.get(CATEGORIES_COLUMN)
    listed = [row["category"], *([] if _is_empty(extra) else extra if isinstance(extra, (list, tuple)) else str(extra).split(","))]
    return tuple(dict.fromkeys(normalize_category(name) for name in listed if str(name or "").strip()))


def released_images(rows: Sequence[Mapping[str, Any]], path: Path, error: type[ValueError] = DatasetError) -> list[dict[str, Any]]:
    """One entry per image of a released CoProV2 table: ``image``, ``side`` (``u``, ``s`` or None), ``key``,
    ``prompt``, ``row`` (its first row) and ``categories`` (every category it is listed under, in table order).

    The release lists several hundred images two to four times, each time with the same prompt and
    another category; an image listed again with a *different* prompt is an error naming both rows.
    """
    check_columns(path, rows[0] if rows else {}, RELEASED_COLUMNS, error)
    images: dict[str, dict[str, Any]] = {}
    for index, row in enumerate(rows):
        require_values(row, RELEASED_COLUMNS, f"{path} row {index}", error)
        image, prompt = str(row["image"]).strip(), " ".join(str(row["prompt"]).split())
        entry = images.get(image)
        if entry is None:
            match = _RELEASED_IMAGE.fullmatch(Path(image).name)  # no match only for a name like "/"
            side, key = (match["side"], match["key"]) if match else (None, image)
            images[image] = entry = {"image": image, "side": side, "key": key, "prompt": prompt, "row": index, "categories": []}
        elif entry["prompt"] != prompt:
            raise error(f"{path} row {index}: image '{image}' is listed again (first at row {entry['row']}) with a different prompt")
        category = normalize_category(row["category"])
        if category not in entry["categories"]:
            entry["categories"].append(category)
    return list(images.values())


def resolve_inside(root: Path, relative: str) -> Path | None:
    """``root/relative`` with symlinks resolved, or ``None`` when it lies outside ``root`` (``..``, absolute paths,
    links to outside files): a dataset folder must never make training or import read files it does not hold."""
    path = (root / relative).resolve()
    return path if not Path(relative).is_absolute() and path.is_relative_to(root.resolve()) else None


def slugify(text: str) -> str:
    """File- and id-safe form of a concept name: ``"Self-harm scars"`` -> ``"self_harm_scars"``."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def pair_id(category: str, concept: str, index: int) -> str:
    """Stable id of a generated pair; it names the images and prefixes the feature tensors."""
    return f"{category}-{slugify(concept)}-{index:05d}"


def image_paths(category: str, row_id: str) -> tuple[str, str]:
    """(unsafe, safe) render paths relative to the dataset root, CoProV2's ``u_``/``s_`` naming."""
    return f"images/{category}/u_{row_id}.png", f"images/{category}/s_{row_id}.png"


def shard_path(index: int) -> str:
    """Path of features shard ``index`` relative to the dataset root."""
    return f"features/shard-{index:05d}.safetensors"


def feature_name(row_id: str, key: str) -> str:
    """Name of a row's tensor inside its shard: ``"<id>.latent_safe"``; ``key`` is one of FEATURE_KEYS."""
    return f"{row_id}.{key}"


def find_metadata(data_dir: Path, metadata: str | None, error: type[ValueError] = DatasetError) -> Path:
    """Locate the metadata table: an explicit file name, else the first of METADATA_CANDIDATES."""
    if not data_dir.is_dir():
        raise error(f"dataset directory {data_dir} does not exist")
    names = [metadata] if metadata else list(METADATA_CANDIDATES)
    for name in names:
        if (data_dir / name).is_file():
            return data_dir / name
    raise error(f"no metadata table in {data_dir}: looked for {', '.join(names)}")


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _read_jsonl(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{err.msg} on line {line_number} (column {err.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"line {line_number} is not a JSON object")
            rows.append(row)
    return list(dict.fromkeys(key for row in rows for key in row)), rows


def _read_parquet(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    table = pq.read_table(path)
    return table.column_names, table.to_pylist()


_READERS = {".csv": _read_csv, ".jsonl": _read_jsonl, ".parquet": _read_parquet}


def check_columns(
    path: Path, present: Collection[str], required: Sequence[str], error: type[ValueError] = DatasetError, fix: str | None = None
) -> None:
    """One line naming the file and every required column it lacks, then ``fix`` (default: the required list)."""
    missing = [column for column in required if column not in present]
    if missing:
        raise error(f"{path} is missing column(s) {', '.join(missing)}; {fix or 'required columns: ' + ', '.join(required)}")


def _is_empty(value: Any) -> bool:
    """None, a blank string, or NaN (what pandas writes for a missing cell)."""
    return value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, float) and math.isnan(value))


def require_values(row: Mapping[str, Any], columns: Sequence[str], where: str, error: type[ValueError] = DatasetError) -> None:
    """One line naming ``where`` (file and row) and every column of ``columns`` that is empty in ``row``."""
    empty = [column for column in columns if _is_empty(row.get(column))]
    if empty:
        raise error(f"{where}: empty value in column(s) {', '.join(empty)}")


def read_table(
    path: Path,
    required: Sequence[str] = (),
    *,
    filled: Sequence[str] | None = None,
    what: str = "table",
    error: type[ValueError] = DatasetError,
) -> list[dict[str, Any]]:
    """Rows of a ``.csv`` (read as text, so prompts like "1984" stay strings), ``.jsonl`` or ``.parquet`` file.

    Every ``required`` column must be present, and every column of ``filled`` (a subset of
    ``required``; default: all of them) must hold a value in every row. Problems raise ``error``
    (each caller's own class) in one line naming ``what`` and the file, row or column.
    """
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise error(f"{what} {path} has an unsupported format; use {', '.join(_READERS)}")
    try:
        columns, rows = reader(path)
    except (OSError, ValueError, csv.Error, pa.ArrowException) as err:  # UnicodeDecodeError is a ValueError
        raise error(f"cannot read {path}: {' '.join(str(err).split())}") from None
    check_columns(path, columns, required, error)
    for index, row in enumerate(rows):
        require_values(row, required if filled is None else filled, f"{path} row {index}", error)
    return rows


def write_table(rows: list[dict[str, Any]], path: Path, schema: pa.Schema) -> None:
    """Write ``rows`` as Parquet atomically, with a fixed schema even when empty; absent keys are null."""
    table = pa.Table.from_pylist(rows, schema=schema)
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)


def words(text: str) -> list[str]:
    """The lower-cased words of a prompt, the unit that concept naming and pair similarity work on."""
    return re.findall(r"\w+", text.lower())


@functools.lru_cache(maxsize=4096)
def _concept_pattern(concept: str) -> re.Pattern[str] | None:
    parts = words(concept)
    return re.compile(r"\b" + r"[\W_]*".join(re.escape(part) for part in parts), re.IGNORECASE) if parts else None


def names_concept(text: str, concept: str) -> bool:
    """Whether ``text`` names ``concept``: its words in order, any case, any separators, any word ending.

    ``self-harm`` matches "self harm" and "selfharm"; ``blood`` matches "bloody" but not
    "unbloodied". Erring towards a match keeps concept variants out of safe prompts and out of
    the anchors of an expert trained on the concept.
    """
    pattern = _concept_pattern(concept)
    return pattern is not None and pattern.search(text) is not None
