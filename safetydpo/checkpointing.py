"""Checkpoint writes that a killed job cannot truncate, wherever the system temp folder lives."""

from __future__ import annotations

from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from safetydpo.io import atomic_file


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves each Lightning checkpoint to a temporary file beside it, then renames it into place.

    Lightning stages a checkpoint in the system temp folder and moves it to its target. When the two
    are on different filesystems (node-local ``/tmp``, shared checkpoint folder on a cluster) that
    move is a copy, and a job killed mid-copy leaves a truncated ``last.ckpt``. A rename inside one
    folder is atomic: the target is the old file or the complete new one. Remote (fsspec URL) paths
    keep Lightning's own behaviour. Set it with ``trainer.plugins`` (the shipped configs do).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_file(path) as tmp:
            torch.save(checkpoint, tmp)
