"""CoProV2DataModule: a local CoProV2-style preference dataset as a LightningDataModule."""

from __future__ import annotations

import random
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from safetydpo.data.augment import PairAugmentation
from safetydpo.data.batch import PairBatch, collate_pairs
from safetydpo.data.coprov2 import FEATURES_COLUMN, METADATA_COLUMNS, DatasetError, find_metadata, names_concept, read_table, row_categories
from safetydpo.data.dataset import PreferencePairDataset, row_id
from safetydpo.data.sampler import ResumableDistributedSampler
from safetydpo.data.taxonomy import normalize_category
from safetydpo.quiet import ignore_warnings


def split_concepts(concepts: list[str], val_fraction: float, seed: int) -> tuple[set[str], set[str]]:
    """Deterministically split concepts so no concept is in both train and validation."""
    ordered = sorted(set(concepts))
    random.Random(seed).shuffle(ordered)
    num_val = round(len(ordered) * val_fraction)
    if val_fraction > 0 and len(ordered) > 1:
        num_val = min(max(num_val, 1), len(ordered) - 1)
    return set(ordered[num_val:]), set(ordered[:num_val])


def anchor_pool(rows: list[dict[str, Any]], concepts: list[str]) -> list[int]:
    """Rows whose safe prompt names none of ``concepts`` (``names_concept``, the builder's rule): safe content to keep."""
    unique = sorted(set(concepts))
    return [i for i, row in enumerate(rows) if not any(names_concept(row["safe_prompt"], concept) for concept in unique)]


class CoProV2DataModule(LightningDataModule):
    """Serves (winner = safe image, loser = unsafe image, condition = unsafe prompt) batches.

    Args:
        data_dir: folder holding the metadata table and the files its rows reference.
        categories: keep only pairs in any of these categories (one expert per category; a pair listed under
            several, see ``row_categories``, serves each of their experts); ``None`` keeps all.
        metadata: table file name inside ``data_dir``; default ``metadata.parquet`` or ``metadata.jsonl``.
        val_fraction: share of *concepts* held out for validation.
        resolution: square image size fed to the VAE (ignored with precomputed latents).
        batch_size: pairs per step and device.
        num_workers: dataloader worker processes.
        seed: fixes the concept split and the shuffling order of every epoch.
        use_precomputed: read latents/text embeddings from the ``features`` shards; ``None`` = when present
            (and ``flip`` is ``none``).
        anchors: give every pair an anchor, the safe prompt and safe render of a row from any category
            whose safe prompt names none of the trained concepts (re-drawn each epoch, seeded). The model's
            ``anchor_weight`` keeps predictions on anchors at the base model's, so an expert changes
            only what its concepts ask for (see docs/losses.md).
        caption_dropout: share of training pairs whose prompt becomes the empty prompt, drawn per
            (seed, pair, epoch) (the release's ``--proportion_empty_prompts``; see ``PairAugmentation``).
        flip: horizontal flips of training pairs: ``none``, ``paired`` (both images together) or
            ``independent`` (each image on its own draw, as the release does); needs images, not latents.
    """

    def __init__(
        self,
        data_dir: str,
        categories: list[str] | None = None,
        metadata: str | None = None,
        val_fraction: float = 0.1,
        resolution: int = 512,
        batch_size: int = 4,
        num_workers: int = 0,
        seed: int = 0,
        use_precomputed: bool | None = None,
        anchors: bool = False,
        caption_dropout: float = 0.0,
        flip: str = "none",
    ) -> None:
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (pairs per step and device), got {batch_size}")
        if resolution < 8 or resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {resolution}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (0 loads in the training process), got {num_workers}")
        self.augmentation = PairAugmentation(caption_dropout=caption_dropout, flip=flip)
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.categories = [normalize_category(name) for name in categories] if categories else None
        self.train_set: PreferencePairDataset | None = None
        self.val_set: PreferencePairDataset | None = None
        self.train_concepts: list[str] = []
        self._epoch = 0
        self._consumed_batches = 0
        self._resume_point: dict[str, int] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        path = find_metadata(self.data_dir, self.hparams.metadata)
        rows = read_table(path, METADATA_COLUMNS)
        row_cats = [row_categories(row) for row in rows]  # a released pair can be listed under several categories
        seen: dict[str, int] = {}
        for position, (row, names) in enumerate(zip(rows, row_cats)):
            row["category"] = names[0]
            first = seen.setdefault(row_id(row, position), position)
            if first != position:  # one row per pair keeps a pair out of training and validation at once
                raise DatasetError(
                    f"{path} rows {first} and {position} share id '{row_id(row, position)}'; list each pair once "
                    "(several categories go in its 'categories' column)"
                )
        available = sorted({name for names in row_cats for name in names})
        if self.categories is not None:
            unknown = [name for name in self.categories if name not in available]
            if unknown:
                raise DatasetError(
                    f"category {', '.join(unknown)} has no rows in {path}; categories present: {', '.join(available)}"
                )
        keep = [i for i, names in enumerate(row_cats) if self.categories is None or set(names) & set(self.categories)]
        pool = anchor_pool(rows, [rows[i]["concept"] for i in keep]) if self.hparams.anchors else None
        if pool == []:
            raise DatasetError(f"anchors: every safe prompt in {path} names a trained concept, so there is nothing to anchor on")
        use_precomputed = self._resolve_precomputed(rows, keep + (pool or []), path)
        train_concepts, val_concepts = split_concepts(
            [rows[i]["concept"] for i in keep], self.hparams.val_fraction, self.hparams.seed
        )
        self.train_concepts = sorted(train_concepts)
        self.train_set = self._dataset(rows, [i for i in keep if rows[i]["concept"] in train_concepts], use_precomputed, pool)
        self.val_set = self._dataset(rows, [i for i in keep if rows[i]["concept"] in val_concepts], use_precomputed, pool)
        if len(self.train_set) < self.hparams.batch_size:
            raise DatasetError(
                f"training split of {path} has {len(self.train_set)} pairs, fewer than batch_size="
                f"{self.hparams.batch_size}; add data, lower batch_size or val_fraction"
            )

    def _resolve_precomputed(self, rows: list[dict[str, Any]], keep: list[int], path: Path) -> bool:
        requested = self.hparams.use_precomputed
        has_features = [bool(rows[i].get(FEATURES_COLUMN)) for i in keep]
        flips = self.augmentation.flip != "none"  # the features hold latents of the unflipped images
        if requested and flips:
            raise DatasetError(f"flip: {self.augmentation.flip} needs images, not {path}'s latents; set use_precomputed: false or flip: none")
        if requested is None:
            return bool(has_features) and all(has_features) and not flips
        if requested and not all(has_features):
            first = keep[has_features.index(False)]
            raise DatasetError(f"use_precomputed=true but {path} row {first} has no '{FEATURES_COLUMN}' shard")
        return requested

    def _dataset(
        self, rows: list[dict[str, Any]], positions: list[int], use_precomputed: bool, pool: list[int] | None
    ) -> PreferencePairDataset:
        return PreferencePairDataset(
            root=self.data_dir,
            rows=[rows[i] for i in positions],
            positions=positions,
            resolution=self.hparams.resolution,
            use_precomputed=use_precomputed,
            anchor_pool=None if pool is None else [(rows[i], i) for i in pool],
            anchor_seed=self.hparams.seed,
        )

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        trainer = self.trainer
        sampler = ResumableDistributedSampler(
            self.train_set,
            num_replicas=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
            seed=self.hparams.seed,
            epoch_in_index=self.hparams.anchors,
        )
        if self._resume_point is not None:
            sampler.skip(self._resume_point["epoch"], self._resume_point["consumed_batches"] * self.hparams.batch_size)
        return self._loader(self.train_set, sampler=sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        assert self.val_set is not None, "call setup() first"
        if len(self.val_set):
            return self._loader(self.val_set, shuffle=False)
        # val_fraction 0 (or too few concepts to hold any out): no validation by design, which Lightning warns about.
        ignore_warnings(r"Total length of `list` across ranks is zero")
        return []

    def _loader(self, dataset: PreferencePairDataset, **kwargs: Any) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            num_workers=workers,
            persistent_workers=workers > 0,
            collate_fn=collate_pairs,
            **kwargs,
        )

    # Exact mid-epoch resume: count the batches the model actually consumed (prefetched ones excluded).
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is not None and trainer.training:
            if trainer.current_epoch != self._epoch:
                self._epoch, self._consumed_batches = trainer.current_epoch, 0
            self._consumed_batches += 1
            batch = self.augmentation(batch, self.hparams.seed, trainer.current_epoch)
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "consumed_batches": self._consumed_batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume_point = dict(state_dict)
        self._epoch, self._consumed_batches = state_dict["epoch"], state_dict["consumed_batches"]


def pair_batches(
    data_dir: str | Path,
    num_batches: int,
    batch_size: int,
    resolution: int,
    seed: int,
    metadata: str | None = None,
    use_precomputed: bool | None = None,
) -> Iterator[PairBatch]:
    """The first ``num_batches`` shuffled batches of pairs from every category (Co-Merge's activation inputs)."""
    datamodule = CoProV2DataModule(
        str(data_dir), categories=None, metadata=metadata, val_fraction=0.0, resolution=resolution,
        batch_size=batch_size, seed=seed, use_precomputed=use_precomputed,
    )
    datamodule.setup("fit")
    yield from islice(datamodule.train_dataloader(), num_batches)
