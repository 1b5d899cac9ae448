"""CoProV2DataModule: splits, filters, determinism, precomputed features and one-line errors."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from safetydpo.data import CoProV2DataModule, DatasetError, normalize_category
from safetydpo.data.datamodule import anchor_pool, split_concepts
from safetydpo.data.coprov2 import METADATA_COLUMNS, read_table


def copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def datamodule(data_dir: Path, **kwargs) -> CoProV2DataModule:
    kwargs.setdefault("resolution", 32)
    kwargs.setdefault("batch_size", 2)
    dm = CoProV2DataModule(str(data_dir), **kwargs)
    dm.setup("fit")
    return dm


def test_category_spellings_are_normalised() -> None:
    assert normalize_category("Harrasment") == "harassment"
    assert normalize_category("Illegal Activity") == "illegal_activity"
    assert normalize_category("self-harm") == "self_harm"
    assert normalize_category(" Sexual ") == "sexual"


def test_split_by_concept_is_disjoint_and_deterministic(synthetic_data_dir: Path) -> None:
    dm = datamodule(synthetic_data_dir, val_fraction=0.3, seed=3)
    train = {row["concept"] for row in dm.train_set.rows}
    val = {row["concept"] for row in dm.val_set.rows}
    assert train and val and not train & val
    assert len(dm.train_set) + len(dm.val_set) == 4 * 3 * 8
    again = datamodule(synthetic_data_dir, val_fraction=0.3, seed=3)
    assert [r["id"] for r in again.val_set.rows] == [r["id"] for r in dm.val_set.rows]
    assert split_concepts(["a", "b"], 0.01, 0) [1], "a positive val_fraction holds out at least one concept"


def test_category_filter_keeps_one_category(synthetic_data_dir: Path) -> None:
    dm = datamodule(synthetic_data_dir, categories=["Violence"], val_fraction=0.0)
    assert {row["category"] for row in dm.train_set.rows} == {"violence"}
    assert len(dm.train_set) == 3 * 8 and len(dm.val_set) == 0
    assert dm.val_dataloader() == []


def test_batch_holds_winner_loser_and_unsafe_prompt(synthetic_data_dir: Path) -> None:
    dm = datamodule(synthetic_data_dir, categories=["sexual"], val_fraction=0.0)
    batch = next(iter(dm.train_dataloader()))
    assert batch.pixels_winner.shape == (2, 3, 32, 32)
    assert batch.pixels_winner.min() >= -1 and batch.pixels_winner.max() <= 1
    rows = {row["unsafe_prompt"]: row for row in dm.train_set.rows}
    for prompt in batch.prompts:
        assert prompt in rows, "the conditioning is the unsafe prompt"
    # the safe render (winner) is blue, the unsafe render (loser) is the concept's colour
    assert batch.pixels_winner[:, 2].mean() > batch.pixels_loser[:, 2].mean()


def test_shuffling_is_deterministic_and_changes_per_epoch(synthetic_data_dir: Path) -> None:
    def order(epoch: int) -> list[int]:
        dm = datamodule(synthetic_data_dir, val_fraction=0.0, seed=7)
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return [p for batch in loader for p in batch.positions.tolist()]

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(0)) == sorted(order(1))


def test_resume_skips_consumed_batches(synthetic_data_dir: Path) -> None:
    full = datamodule(synthetic_data_dir, val_fraction=0.0, seed=1)
    expected = [batch.positions.tolist() for batch in full.train_dataloader()]
    resumed = CoProV2DataModule(str(synthetic_data_dir), resolution=32, batch_size=2, val_fraction=0.0, seed=1)
    resumed.load_state_dict({"epoch": 0, "consumed_batches": 5})
    resumed.setup("fit")
    assert [batch.positions.tolist() for batch in resumed.train_dataloader()] == expected[5:]


def with_features(source: Path, data: Path, latent_size: Callable[[int], int] = lambda row: 8) -> Path:
    """A copy of ``source`` whose rows carry precomputed features (safe latents 1, unsafe -1)."""
    copy_dataset(source, data)
    table = pq.read_table(data / "metadata.parquet").to_pylist()
    tensors = {}
    for index, row in enumerate(table):
        size = latent_size(index)
        row["features"] = "features/shard-000.safetensors"
        tensors[f"{row['id']}.latent_safe"] = torch.full((4, size, size), 1.0)
        tensors[f"{row['id']}.latent_unsafe"] = torch.full((4, size, size), -1.0)
        tensors[f"{row['id']}.prompt_embeds"] = torch.zeros(77, 32)
    (data / "features").mkdir()
    save_file(tensors, data / "features" / "shard-000.safetensors")
    (data / "metadata.parquet").unlink()
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in table))
    return data


def test_precomputed_features_are_served(synthetic_data_dir: Path, tmp_path: Path) -> None:
    data = with_features(synthetic_data_dir, tmp_path / "data")
    batch = next(iter(datamodule(data, val_fraction=0.0).train_dataloader()))
    assert batch.precomputed and batch.latents_loser is not None and batch.prompt_embeds is not None
    assert batch.pixels_winner is None
    assert batch.latents_winner.mean().item() == 1.0 and batch.latents_loser.mean().item() == -1.0


def test_features_of_unequal_shapes_name_the_rows(synthetic_data_dir: Path, tmp_path: Path) -> None:
    data = with_features(synthetic_data_dir, tmp_path / "data", latent_size=lambda row: 8 if row % 2 else 16)
    loader = datamodule(data, val_fraction=0.0, batch_size=16).train_dataloader()
    with pytest.raises(DatasetError, match=r"row \d+ \(id=.*\): latents_winner has shape \(4, (8, 8|16, 16)\), row \d+ .* has .*rebuild its features"):
        next(iter(loader))


def test_missing_columns_error_names_them(synthetic_data_dir: Path, tmp_path: Path) -> None:
    data = copy_dataset(synthetic_data_dir, tmp_path / "data")
    table = pq.read_table(data / "metadata.parquet").drop_columns(["image_safe", "seed"])
    pq.write_table(table, data / "metadata.parquet")
    with pytest.raises(DatasetError, match=r"missing column\(s\) seed, image_safe; required columns: unsafe_prompt"):
        datamodule(data)


def test_empty_category_error_lists_present_ones(synthetic_data_dir: Path) -> None:
    with pytest.raises(DatasetError, match=r"category self_harm has no rows in .*; categories present: hate, sexual"):
        datamodule(synthetic_data_dir, categories=["Self-harm"])


def test_missing_image_error_names_the_row(synthetic_data_dir: Path, tmp_path: Path) -> None:
    data = copy_dataset(synthetic_data_dir, tmp_path / "data")
    (data / "images" / "u_violence_crimson_002.png").unlink()
    with pytest.raises(DatasetError, match=r"row \d+ \(id=violence_crimson_002, .*image_unsafe file .* not found"):
        datamodule(data)


def test_corrupt_image_error_names_the_row(synthetic_data_dir: Path, tmp_path: Path) -> None:
    data = copy_dataset(synthetic_data_dir, tmp_path / "data")
    (data / "images" / "s_hate_black_000.png").write_bytes(b"not a png at all")
    dm = datamodule(data, categories=["hate"], val_fraction=0.0, batch_size=24)
    with pytest.raises(DatasetError, match=r"id=hate_black_000.*cannot read image_safe image"):
        next(iter(dm.train_dataloader()))


def test_missing_directory_and_table(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        datamodule(tmp_path / "nope")
    with pytest.raises(DatasetError, match=r"no metadata table in .*: looked for metadata.parquet, metadata.jsonl"):
        datamodule(tmp_path)


def test_too_small_training_split(synthetic_data_dir: Path) -> None:
    with pytest.raises(DatasetError, match="fewer than batch_size=64"):
        datamodule(synthetic_data_dir, categories=["hate"], batch_size=64)


def test_anchor_pool_skips_safe_prompts_naming_a_trained_concept() -> None:
    rows = [{"safe_prompt": p} for p in ("a Crimson cube", "a crimsonish cube", "a blue cube", "scarlet, on grey", "discrimson")]
    assert anchor_pool(rows, ["crimson", "scarlet"]) == [2, 4], "any ending names the concept (the builder's rule), a prefix does not"


def test_anchors_are_safe_renders_of_other_rows_redrawn_each_epoch(synthetic_data_dir: Path) -> None:
    dm = datamodule(synthetic_data_dir, categories=["sexual"], val_fraction=0.0, anchors=True)
    pool = dm.train_set.anchor_pool
    assert len({row["category"] for row, _ in pool}) == 4, "anchors come from every category"
    loader = dm.train_dataloader()

    def epoch_anchors(epoch: int) -> list[tuple[int, int]]:
        loader.sampler.set_epoch(epoch)
        return sorted((p, a) for batch in loader for p, a in zip(batch.positions.tolist(), batch.anchor_positions.tolist()))

    first = epoch_anchors(0)
    assert first == epoch_anchors(0), "seeded"
    assert [p for p, _ in first] == [p for p, _ in epoch_anchors(1)] and first != epoch_anchors(1), "same pairs, new anchors"
    loader.sampler.set_epoch(0)
    batch = next(iter(loader))
    rows = {position: row for row, position in pool}
    for i, position in enumerate(batch.anchor_positions.tolist()):
        assert batch.anchor_prompts[i] == rows[position]["safe_prompt"]
        assert torch.equal(batch.anchor_pixels[i], dm.train_set._load_image(rows[position], position, "image_safe"))
    assert not next(iter(datamodule(synthetic_data_dir, categories=["sexual"], val_fraction=0.0).train_dataloader())).has_anchors


def test_anchors_need_a_safe_prompt_free_of_trained_concepts(synthetic_data_dir: Path, tmp_path: Path) -> None:
    data = copy_dataset(synthetic_data_dir, tmp_path / "data")
    rows = read_table(data / "metadata.parquet", METADATA_COLUMNS)
    (data / "metadata.parquet").unlink()
    lines = [json.dumps({**row, "safe_prompt": row["safe_prompt"] + ", not magenta"}) for row in rows]
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="anchors: every safe prompt in .*metadata.jsonl names a trained concept"):
        datamodule(data, categories=["sexual"], anchors=True)
