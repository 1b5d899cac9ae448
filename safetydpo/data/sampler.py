"""A shuffling sampler that resumes an interrupted epoch at the exact sample it stopped at."""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import Dataset, DistributedSampler


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` (order fixed by seed and epoch) that can skip an epoch's consumed head.

    Lightning restarts a mid-epoch dataloader from its first batch; skipping the samples that the
    checkpointed run already trained on makes the resumed run see the same batches, in the same
    order, as an uninterrupted one. Used with one replica too, so single- and multi-GPU runs share
    one ordering rule. With ``epoch_in_index`` each index is yielded as ``epoch * len(dataset) + index``
    so a dataset can vary what it serves per epoch (``PreferencePairDataset`` re-draws anchors)
    while dataloader workers stay stateless.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, epoch_in_index: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.epoch_in_index = epoch_in_index
        self._skip_epoch: int | None = None
        self._skip_samples = 0

    def skip(self, epoch: int, samples: int) -> None:
        """Drop the first ``samples`` indices of this replica's order in ``epoch`` (only that epoch)."""
        self._skip_epoch, self._skip_samples = epoch, samples

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self.epoch == self._skip_epoch:
            indices = indices[self._skip_samples :]
        if self.epoch_in_index:
            offset = self.epoch * len(self.dataset)
            indices = [offset + index for index in indices]
        return iter(indices)
