"""Preference pairs for DPO: winner = safe render, loser = unsafe render, condition = unsafe prompt.

Each pair may also carry an *anchor*: the safe prompt and safe render of another row, on which the
trainer keeps the expert's predictions equal to the base model's. Anchors are re-drawn every epoch
from a pool, seeded by (seed, pair, epoch), so a small category still sees the whole pool.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from safetensors import safe_open
from torch.utils.data import Dataset
from torchvision.transforms import v2

from safetydpo.data.batch import PairSample
from safetydpo.data.coprov2 import FEATURE_KEYS, FEATURES_COLUMN, OPTIONAL_FEATURE_KEYS, DatasetError, feature_name, resolve_inside
from safetydpo.seeding import derive_seed

#: Feature shards a dataset keeps open per process (least recently opened closed first).
_OPEN_SHARDS = 4


def row_id(row: dict[str, Any], position: int) -> str:
    """The row's stable identifier: its ``id`` column, else its position in the metadata table."""
    return str(row.get("id", position))


def describe_row(row: dict[str, Any], position: int) -> str:
    return f"row {position} (id={row_id(row, position)}, category={row['category']}, concept={row['concept']})"


class PreferencePairDataset(Dataset):
    """Serves one CoProV2 pair per item, from images or from precomputed latents and text embeddings.

    ``positions`` are the rows' indices in the full metadata table; they name rows in errors and
    seed the per-pair diffusion noise, so a pair gets the same noise whatever split it lands in.
    """

    def __init__(
        self,
        root: Path,
        rows: list[dict[str, Any]],
        positions: list[int],
        resolution: int,
        use_precomputed: bool,
        anchor_pool: list[tuple[dict[str, Any], int]] | None = None,
        anchor_seed: int = 0,
    ) -> None:
        self.root = root
        self.rows = rows
        self.positions = positions
        self.anchor_pool = anchor_pool
        self.anchor_seed = anchor_seed
        self.use_precomputed = use_precomputed
        self.transform = v2.Compose(
            [
                v2.ToImage(),
                v2.Resize(resolution, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                v2.CenterCrop(resolution),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize([0.5], [0.5]),
            ]
        )
        self._shards: dict[Path, Any] = {}
        self._check_files()

    def __getstate__(self) -> dict[str, Any]:
        # Open shard handles stay in the process that opened them; a DataLoader worker opens its own.
        return {**self.__dict__, "_shards": {}}

    def __len__(self) -> int:
        return len(self.rows)

    def _referenced_files(self, row: dict[str, Any]) -> list[tuple[str, str]]:
        if self.use_precomputed:
            return [(FEATURES_COLUMN, row[FEATURES_COLUMN])]
        return [("image_safe", row["image_safe"]), ("image_unsafe", row["image_unsafe"])]

    def _check_files(self) -> None:
        """Fail before training starts, naming every row whose files are missing or lie outside ``root`` (up to five)."""
        problems = []
        for row, position in [*zip(self.rows, self.positions), *(self.anchor_pool or [])]:
            for column, relative in self._referenced_files(row):
                if not relative:
                    problems.append(f"{describe_row(row, position)}: column {column} is empty")
                elif (path := resolve_inside(self.root, str(relative))) is None:
                    problems.append(
                        f"{describe_row(row, position)}: {column} path '{relative}' lies outside the dataset folder {self.root} "
                        "(a '..', an absolute path or a link out of it); keep every file under the folder"
                    )
                elif not path.is_file():
                    problems.append(f"{describe_row(row, position)}: {column} file {self.root / relative} not found")
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise DatasetError("; ".join(problems[:5]) + more)

    def _load_image(self, row: dict[str, Any], position: int, column: str) -> torch.Tensor:
        path = self.root / row[column]
        try:
            with Image.open(path) as image:
                return self.transform(image.convert("RGB"))
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise DatasetError(f"{describe_row(row, position)}: cannot read {column} image {path}: {err}") from err

    def _load_features(self, row: dict[str, Any], position: int) -> dict[str, torch.Tensor]:
        path = self.root / row[FEATURES_COLUMN]
        prefix = row_id(row, position)
        try:
            shard = self._shards.get(path)
            if shard is None:
                # Opening a shard (header parse, mmap) costs more than reading one row from it: keep the
                # last few open (a few file handles), as consecutive rows come from the same shard.
                if len(self._shards) >= _OPEN_SHARDS:
                    self._shards.pop(next(iter(self._shards)))
                handle = safe_open(str(path), framework="pt")
                shard = self._shards[path] = (handle, set(handle.keys()))
            handle, names = shard
            present = [key for key in OPTIONAL_FEATURE_KEYS if feature_name(prefix, key) in names]
            return {key: handle.get_tensor(feature_name(prefix, key)) for key in (*FEATURE_KEYS, *present)}
        except Exception as err:  # safetensors raises its own error types for missing keys and bad headers
            raise DatasetError(f"{describe_row(row, position)}: cannot read features from {path}: {err}") from err

    def anchor_for(self, position: int, epoch: int) -> tuple[dict[str, Any], int]:
        """The anchor row (and its table position) that pair ``position`` gets in ``epoch``."""
        assert self.anchor_pool is not None, "this dataset has no anchors"
        return self.anchor_pool[derive_seed(self.anchor_seed, "anchor", position, epoch) % len(self.anchor_pool)]

    def __getitem__(self, index: int) -> PairSample:
        """Item ``index``; an index past the end carries an epoch (``epoch * len + item``, see the sampler)."""
        epoch, item = divmod(index, len(self.rows))
        row, position = self.rows[item], self.positions[item]
        sample = PairSample(position=position, prompt=row["unsafe_prompt"], row=describe_row(row, position))
        if self.use_precomputed:
            features = self._load_features(row, position)
            sample.latents_winner = features["latent_safe"]
            sample.latents_loser = features["latent_unsafe"]
            sample.prompt_embeds = features["prompt_embeds"]
            sample.pooled_prompt_embeds = features.get("pooled_prompt_embeds")
        else:
            sample.pixels_winner = self._load_image(row, position, "image_safe")
            sample.pixels_loser = self._load_image(row, position, "image_unsafe")
        if self.anchor_pool is not None:
            anchor, anchor_position = self.anchor_for(position, epoch)
            sample.anchor_position = anchor_position
            sample.anchor_prompt = anchor["safe_prompt"]
            if self.use_precomputed:
                sample.anchor_latents = self._load_features(anchor, anchor_position)["latent_safe"]
            else:
                sample.anchor_pixels = self._load_image(anchor, anchor_position, "image_safe")
        return sample
