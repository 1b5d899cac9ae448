"""Checkpoints: writes that a killed job cannot truncate, and resumes that cannot silently change the run."""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import LightningModule
from lightning.pytorch.core.optimizer import _init_optimizers_and_lr_schedulers
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from safetydpo.io import atomic_file

#: Model arguments a resumed run must share with its checkpoint: they decide what the trained LoRA
#: weights belong to (the base model, the adapter's shape and scale, the category it removes).
MODEL_IDENTITY_KEYS: tuple[str, ...] = ("base_model", "revision", "variant", "category", "lora.rank", "lora.alpha", "lora.target_modules")

_MISSING = object()


class ResumeMismatchError(ValueError):
    """The checkpoint being resumed was trained for another model than the config describes."""


def remove_stale_temporaries(folder: Path, before: float) -> list[Path]:
    """Delete ``.<name>.ckpt.*.tmp`` files (a save a kill interrupted) last written before ``before`` (a time stamp).

    The age test spares the temporary file of a save in progress in another process.
    """
    removed = []
    for tmp in folder.glob(".*.ckpt.*.tmp"):
        try:
            if tmp.is_file() and tmp.stat().st_mtime < before:
                tmp.unlink()
                removed.append(tmp)
        except FileNotFoundError:  # its writer renamed or removed it meanwhile
            continue
    return removed


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (a full disk): the message names the file and the free space."""


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse to start a run whose first ``what`` would not fit on ``folder``'s disk (``needed`` bytes)."""
    folder = next((parent for parent in (folder, *folder.parents) if parent.exists()), folder)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise CheckpointWriteError(
            f"{folder} has {free / 2**20:.1f} MiB free but a {what} needs about {needed / 2**20:.1f} MiB; "
            "free disk space or write it to another disk"
        )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves each Lightning checkpoint to a temporary file beside it, then renames it into place.

    Lightning stages a checkpoint in the system temp folder and moves it to its target. When the two
    are on different filesystems (node-local ``/tmp``, shared checkpoint folder on a cluster) that
    move is a copy, and a job killed mid-copy leaves a truncated ``last.ckpt``. A rename inside one
    folder is atomic: the target is the old file or the complete new one. The temporary files a killed
    save left are deleted when a run resumes from that folder or first saves into it. Loading is
    ``weights_only`` unless asked otherwise: a checkpoint is data, never a program. Remote (fsspec
    URL) paths keep Lightning's own behaviour. Set it with ``trainer.plugins`` (the shipped configs do).
    """

    def __init__(self) -> None:
        super().__init__()
        self._started = time.time()
        self._cleaned: set[Path] = set()

    def _clean(self, path: _PATH) -> None:
        if isinstance(get_filesystem(path), LocalFileSystem) and (folder := Path(path).parent) not in self._cleaned:
            self._cleaned.add(folder)
            for tmp in remove_stale_temporaries(folder, self._started):
                rank_zero_info(f"removed {tmp}, left by an interrupted checkpoint save")

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        self._clean(path)
        try:
            with atomic_file(path) as tmp:
                torch.save(checkpoint, tmp)
        except (OSError, RuntimeError) as err:  # torch's zip writer reports a failed write as a RuntimeError
            if isinstance(err, RuntimeError) and "write" not in str(err):
                raise
            free = shutil.disk_usage(Path(path).parent).free
            raise CheckpointWriteError(
                f"cannot write checkpoint {path} ({free / 2**20:.0f} MiB free there): {' '.join(str(err).split())}; "
                "free disk space or set the ModelCheckpoint dirpath to another disk (the previous checkpoint is intact)"
            ) from err

    def load_checkpoint(self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        self._clean(path)
        return super().load_checkpoint(path, map_location=map_location, weights_only=True if weights_only is None else weights_only)


def _lookup(hparams: Mapping[str, Any], key: str) -> Any:
    value: Any = hparams
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return _MISSING
        value = value[part]
    return list(value) if isinstance(value, tuple) else value


def _same(key: str, stored: Any, configured: Any) -> bool:
    if stored == configured:
        return True
    # One local folder written two ways (relative vs absolute path, a symlink) is the same base model.
    return key == "base_model" and all(Path(str(v)).expanduser().exists() for v in (stored, configured)) and (
        Path(str(stored)).expanduser().resolve() == Path(str(configured)).expanduser().resolve()
    )


def resume_with_config(checkpoint: dict[str, Any], module: LightningModule) -> None:
    """Check a checkpoint being restored against the configured ``module``, and make the config win.

    Call from ``on_load_checkpoint``. A difference in a ``MODEL_IDENTITY_KEYS`` key is a
    ``ResumeMismatchError``: the LoRA weights would belong to another model. Any other argument
    (learning rate, loss, seeds) is the config's, since the module was built from it; when fitting,
    the stored optimizer and scheduler settings are replaced by those ``configure_optimizers`` gives
    now (scaled by the scheduler's progress, so a warm-up continues where it stopped), since restoring
    an optimizer's state would otherwise bring back the old learning rate.
    """
    stored, configured = checkpoint.get("hyper_parameters") or {}, dict(module.hparams)
    for key in MODEL_IDENTITY_KEYS:
        old, new = _lookup(stored, key), _lookup(configured, key)
        if old is not _MISSING and new is not _MISSING and not _same(key, old, new):
            raise ResumeMismatchError(
                f"the checkpoint being resumed was trained with model.init_args.{key}={old!r}, but the config sets {new!r}; "
                "resume with the config it was trained with, or start a new run without --ckpt_path"
            )
    changed = sorted(k for k in stored.keys() & configured.keys() if k != "_instantiator" and stored[k] != configured[k])
    if changed:
        rank_zero_info(f"resuming with the config's {', '.join(f'{k}={configured[k]!r}' for k in changed)} (the checkpoint's: "
                       f"{', '.join(f'{stored[k]!r}' for k in changed)})")
    trainer = module._trainer  # None under ``load_from_checkpoint``, which restores the weights only
    if trainer is not None and trainer.state.fn == TrainerFn.FITTING and checkpoint.get("optimizer_states"):
        _adopt_configured_optimizers(checkpoint, module)


def _adopt_configured_optimizers(checkpoint: dict[str, Any], module: LightningModule) -> None:
    """Put the configured optimizer hyper-parameters into the stored optimizer and scheduler states."""
    optimizers, schedulers = _init_optimizers_and_lr_schedulers(module)
    for optimizer, state in zip(optimizers, checkpoint["optimizer_states"]):
        for fresh, group in zip(optimizer.state_dict()["param_groups"], state["param_groups"]):
            base = group.get("initial_lr", group["lr"])
            progress = group["lr"] / base if base else 1.0  # where the stored scheduler had got to
            group.update({name: value for name, value in fresh.items() if name != "params"})
            group["lr"] = group.get("initial_lr", fresh["lr"]) * progress
    for config, state in zip(schedulers, checkpoint.get("lr_schedulers") or []):
        index = next(i for i, optimizer in enumerate(optimizers) if optimizer is config.scheduler.optimizer)
        if "base_lrs" in state:
            state["base_lrs"] = list(config.scheduler.base_lrs)
        if "_last_lr" in state:
            state["_last_lr"] = [group["lr"] for group in checkpoint["optimizer_states"][index]["param_groups"]]
