"""Merges a set of expert LoRA files once the last expert's training run has finished."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from safetydpo.data.datamodule import CoProV2DataModule, pair_batches
from safetydpo.merging import MERGES
from safetydpo.merging.files import merge_expert_files
from safetydpo.models.expert import DPOExpertModule
from safetydpo.models.inputs import activation_inputs


class CoMergeCallback(Callback):
    """After ``fit`` ends, merge ``experts`` into ``output_path`` with ``method`` (default Co-Merge).

    Put it after ``LoraExport`` in the callback list of the last expert's config, listing every
    expert file (the one this run writes included). Activation statistics run the trained model's
    own UNet with its adapter disabled (the base model) over ``num_batches`` batches of pairs of
    every category, read from the running DataModule's folder with its resolution and feature
    settings. Only global rank 0 merges; the merge is skipped, with a message, while an expert file
    is missing.

    Args:
        experts: every expert LoRA file to merge.
        output_path: merged LoRA file (``.safetensors``; its card is written beside it).
        method: registered merge name (``comerge``, ``linear``, ``ties``, ...) or a spec with arguments,
            ``{class_path: safetydpo.merging.comerge.CoMerge, init_args: {rank: 4}}`` or ``{name: comerge, rank: 4}``.
        num_batches: batches of pairs for activation statistics.
        batch_size: pairs per activation batch.
        seed: shuffling and noise seed of the activation batches.
    """

    def __init__(
        self,
        experts: list[str],
        output_path: str = "merged.safetensors",
        method: str | dict[str, Any] = "comerge",
        num_batches: int = 8,
        batch_size: int = 4,
        seed: int = 0,
    ) -> None:
        MERGES.build(method)  # a wrong name or argument fails when the config is parsed, not after training
        self.experts = experts
        self.output_path = output_path
        self.method = method
        self.num_batches = num_batches
        self.batch_size = batch_size
        self.seed = seed

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        missing = [path for path in self.experts if not Path(path).is_file()]
        if missing:
            rank_zero_info(f"CoMergeCallback: waiting for experts {missing}; no merge yet")
            return
        if not isinstance(pl_module, DPOExpertModule):
            raise TypeError(f"CoMergeCallback needs a DPOExpertModule, got {type(pl_module).__name__}")
        datamodule = trainer.datamodule
        if not isinstance(datamodule, CoProV2DataModule):
            raise TypeError(f"CoMergeCallback needs a CoProV2DataModule, got {type(datamodule).__name__}")
        settings = datamodule.hparams
        batches = pair_batches(
            datamodule.data_dir, self.num_batches, self.batch_size, settings.resolution, self.seed,
            metadata=settings.metadata, use_precomputed=settings.use_precomputed,
        )
        unet = pl_module.unet
        unet.disable_adapters()
        try:
            card = merge_expert_files(
                self.experts,
                self.output_path,
                method=self.method,
                unet=unet,
                inputs=activation_inputs(pl_module.components, batches, self.seed, total=self.num_batches),
                base_model=pl_module.hparams.base_model,
            )
        finally:
            unet.enable_adapters()
        rank_zero_info(f"CoMergeCallback: wrote {self.output_path} ({card['method']}, {len(self.experts)} experts)")
