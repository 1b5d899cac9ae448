"""Writes the trained expert as a diffusers LoRA file plus a model card when training ends."""

from __future__ import annotations

import datetime as dt
from importlib.metadata import version
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from safetydpo.io import check_writable
from safetydpo.models.expert import DPOExpertModule
from safetydpo.lora_files import EXPERT_FORMAT, save_lora


class LoraExport(Callback):
    """Saves ``output_path`` (diffusers LoRA, safetensors) and the same name with ``.json`` (model card).

    ``{category}`` in ``output_path`` is replaced by the module's category, so one base config
    serves every expert. Only global rank 0 writes. When ``fit`` starts, before any training, rank 0
    checks that this file's folder and every ``ModelCheckpoint`` folder can be written, and all
    ranks stop together if one cannot. The card records what a reader needs to trust and reuse
    the expert: base model, category, concepts, loss, LoRA settings, steps, metrics.
    """

    def __init__(self, output_path: str = "expert.safetensors") -> None:
        self.output_path = output_path

    def resolved_path(self, module: DPOExpertModule) -> Path:
        return Path(self.output_path.format(category=module.hparams.category or "all"))

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not isinstance(pl_module, DPOExpertModule):
            raise TypeError(f"LoraExport needs a DPOExpertModule, got {type(pl_module).__name__}")
        folders = [self.resolved_path(pl_module).parent]
        folders += [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
        error = None
        if trainer.is_global_zero:
            try:
                for folder in folders:
                    check_writable(folder)
            except OSError as err:
                error = str(err)
        # Every rank raises: one rank failing alone would leave the others waiting in the first collective.
        error = trainer.strategy.broadcast(error)
        if error:
            raise OSError(error)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            assert isinstance(pl_module, DPOExpertModule)
            card = self.model_card(trainer, pl_module)
            network = pl_module.denoiser.network_name
            save_lora(self.resolved_path(pl_module), pl_module.lora_weights(), pl_module.unet.peft_config["default"], card, network=network)

    @staticmethod
    def model_card(trainer: Trainer, module: DPOExpertModule) -> dict[str, Any]:
        datamodule = trainer.datamodule
        return {
            "format": EXPERT_FORMAT,
            "base_model": module.hparams.base_model,
            "model_family": module.denoiser.registry_name,
            "pipeline_class": module.denoiser.pipeline_classes[0],
            "category": module.hparams.category,
            "concepts": list(getattr(datamodule, "train_concepts", [])),
            "dataset": str(getattr(datamodule, "data_dir", "")),
            "loss": module.loss_fn.spec(),
            "lora": dict(module.hparams.lora),
            "learning_rate": module.hparams.learning_rate,
            "steps": trainer.global_step,
            "epochs": trainer.current_epoch,
            "world_size": trainer.world_size,
            "metrics": {name: float(value) for name, value in trainer.callback_metrics.items()},
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "safetydpo_version": version("safetydpo"),
        }
