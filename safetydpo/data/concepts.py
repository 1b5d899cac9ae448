"""ConceptPromptDataModule: prompts that name the concepts to erase, for objectives that need no image pairs (ESD)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler

from safetydpo.data.coprov2 import DatasetError


@dataclass
class ConceptBatch:
    """Concept prompts and their row numbers (the rows seed the per-prompt noise, as pair rows do)."""

    prompts: list[str]
    positions: Tensor

    def __len__(self) -> int:
        return len(self.prompts)


class ConceptPromptDataModule(LightningDataModule):
    """Serves shuffled batches of concept prompts, reshuffled every epoch from ``seed``.

    Args:
        prompts: the concept prompts (ESD-u's paper uses the concept's name, e.g. ``nudity``; whole captions that
            show the concept work too).
        concepts: the concept names the model card records; ``None``: the prompts themselves.
        batch_size: prompts per step and device.
        seed: shuffling seed.
        num_workers: dataloader worker processes.
    """

    def __init__(
        self, prompts: list[str], concepts: list[str] | None = None, batch_size: int = 4, seed: int = 0, num_workers: int = 0
    ) -> None:
        super().__init__()
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise DatasetError("data.init_args.prompts must be a non-empty list of non-empty concept prompts, e.g. [nudity]")
        if batch_size < 1:
            raise DatasetError(f"data.init_args.batch_size must be >= 1, got {batch_size}")
        self.save_hyperparameters()
        self.prompts = list(prompts)
        self.train_concepts = list(concepts or prompts)  # read by LoraExport's model card
        self.data_dir = ""

    def _collate(self, rows: list[int]) -> ConceptBatch:
        return ConceptBatch([self.prompts[i] for i in rows], torch.tensor(rows))

    def train_dataloader(self) -> DataLoader:
        sampler = RandomSampler(range(len(self.prompts)), generator=torch.Generator().manual_seed(self.hparams.seed))
        return DataLoader(
            list(range(len(self.prompts))), batch_size=self.hparams.batch_size, sampler=sampler,
            collate_fn=self._collate, num_workers=self.hparams.num_workers,
        )
