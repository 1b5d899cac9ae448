"""The CoProV2 format module: one table reader for every file type, one missing/empty-column check, one concept rule."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from safetydpo.data import CoProV2DataModule, DatasetError
from safetydpo.data.builder import BuildError, PairValidator, PromptPair
from safetydpo.data.builder.pair_table import read_pair_table
from safetydpo.data.coprov2 import METADATA_SCHEMA, PAIR_COLUMNS, PAIR_SCHEMA, names_concept, read_table, write_table
from safetydpo.data.datamodule import anchor_pool

ROWS = [
    {"id": "v-0", "category": "violence", "concept": "blood", "unsafe_prompt": "blood on a knife", "safe_prompt": "paint on a knife"},
    {"id": "v-1", "category": "violence", "concept": "gore", "unsafe_prompt": "1984", "safe_prompt": "a calm 1984 street"},
]


def write_formats(folder: Path, rows: list[dict[str, str]]) -> list[Path]:
    """The same table as .csv, .jsonl and .parquet."""
    folder.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    with (folder / "pairs.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    (folder / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    write_table(rows, folder / "pairs.parquet", pa.schema([PAIR_SCHEMA.field(name) for name in columns]))
    return [folder / name for name in ("pairs.csv", "pairs.jsonl", "pairs.parquet")]


def test_one_reader_reads_the_same_rows_from_csv_jsonl_and_parquet(tmp_path: Path) -> None:
    for path in write_formats(tmp_path, ROWS):
        assert read_table(path, PAIR_COLUMNS) == ROWS, path.suffix
        assert read_pair_table(path) == ROWS, "the builder's pair table goes through the same reader"
    assert read_table(tmp_path / "pairs.csv")[1]["unsafe_prompt"] == "1984", "CSV cells stay text"


def test_a_missing_column_is_named_in_every_format(tmp_path: Path) -> None:
    without_concept = [{k: v for k, v in row.items() if k != "concept"} for row in ROWS]
    for path in write_formats(tmp_path, without_concept):
        with pytest.raises(DatasetError, match=rf"{path.name} is missing column\(s\) concept; required columns: id, category") as err:
            read_table(path, PAIR_COLUMNS)
        assert "\n" not in str(err.value)
        with pytest.raises(BuildError, match=rf"{path.name} is missing column\(s\) concept"):
            read_pair_table(path)


def test_an_empty_value_names_the_row_and_column(tmp_path: Path) -> None:
    rows = [ROWS[0], {**ROWS[1], "safe_prompt": "  "}]
    for path in write_formats(tmp_path, rows):
        with pytest.raises(DatasetError, match=rf"{path.name} row 1: empty value in column\(s\) safe_prompt"):
            read_table(path, PAIR_COLUMNS)
        assert read_table(path, PAIR_COLUMNS, filled=["id"])[1]["safe_prompt"] == "  ", "only `filled` columns must hold a value"


def test_unreadable_and_unsupported_files_are_one_line_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "a"}\n{oops\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"cannot read .*broken.jsonl: Expecting .* on line 2"):
        read_table(broken)
    text = tmp_path / "pairs.txt"
    text.write_text("id\n", encoding="utf-8")
    with pytest.raises(BuildError, match=r"pair table .*pairs.txt has an unsupported format; use .csv, .jsonl, .parquet"):
        read_table(text, what="pair table", error=BuildError)
    with pytest.raises(DatasetError, match=r"table .*nowhere.csv does not exist"):
        read_table(tmp_path / "nowhere.csv")


def test_a_bloody_knife_names_blood_for_the_validator_and_the_anchor_pool(synthetic_data_dir: Path, tmp_path: Path) -> None:
    assert names_concept("a bloody knife", "blood") and not names_concept("unbloodied hands", "blood")
    pair = PromptPair("a blood-covered knife", "a bloody knife")
    assert PairValidator().rejection(pair, "blood") == "concept_in_safe"
    assert anchor_pool([{"safe_prompt": "a bloody knife"}, {"safe_prompt": "a kitchen knife"}], ["blood"]) == [1]

    data = tmp_path / "data"
    shutil.copytree(synthetic_data_dir, data)
    rows = pq.read_table(data / "metadata.parquet").to_pylist()
    for row in rows:
        if row["concept"] == "pink":
            row["concept"] = "blood"
    bloody = next(i for i, row in enumerate(rows) if row["category"] == "hate")
    rows[bloody]["safe_prompt"] = "a bloody knife on a white background"
    write_table(rows, data / "metadata.parquet", METADATA_SCHEMA)
    dm = CoProV2DataModule(str(data), categories=["sexual"], val_fraction=0.0, resolution=32, batch_size=2, anchors=True)
    dm.setup("fit")
    positions = {position for _, position in dm.train_set.anchor_pool}
    assert bloody not in positions and bloody + 1 in positions, "a safe prompt naming a trained concept never anchors"
