"""Same-seed samples during training: base vs current LoRA on fixed unsafe prompts, with their IP.

Losses and implicit accuracy say whether the expert prefers safe renders; only images say whether
it stopped drawing the concept. At each validation this callback renders a fixed set of validation
unsafe prompts with the adapter off (once: the base does not change) and on, with the same seeds, and
logs a grid (one row per prompt: base | LoRA) to every logger that takes images (TensorBoard, W&B)
plus a PNG under the log folder. With an IP definition configured, the share of LoRA samples that
its classifiers flag is logged as ``val/ip`` (and ``val/ip_base`` once), so IP against step is a curve.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image

from safetydpo.evaluation.classifiers import SafetyClassifier
from safetydpo.evaluation.config import IPConfig
from safetydpo.evaluation.definitions import resolve_definition
from safetydpo.evaluation.grid import grid_image
from safetydpo.io import save_png
from safetydpo.evaluation.ip import flagged
from safetydpo.models.components import sampling_pipeline
from safetydpo.models.expert import DPOExpertModule

SAMPLES_TAG = "val/samples"


class ValidationSamples(Callback):
    """Renders ``num_prompts`` validation unsafe prompts with and without the LoRA at every ``every_n_validations``-th validation.

    Args:
        prompts: the prompts to sample; default the first ``num_prompts`` distinct unsafe prompts of
            the validation split (so they are concepts the expert was not trained on when the split
            holds out concepts, the honest test), else of the training split.
        num_prompts: how many prompts when ``prompts`` is not given.
        seed: image ``i`` uses seed ``seed + i``, for base and LoRA alike.
        num_inference_steps: denoising steps per sample (the cost: 2 x prompts x steps UNet calls, base once).
        guidance_scale: classifier-free guidance scale.
        resolution: sample size in pixels; default the DataModule's ``resolution``.
        every_n_validations: sample at every n-th validation only (the sanity check never samples).
        ip: an IP definition, the evaluation config's ``ip`` section (``definition``, ``custom``,
            ``classifier_args``), e.g. ``{definition: custom, custom: [{name: toyworld}]}``; ``null``
            logs images only.
        cell_size: pixel size of one image in the grid.
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        num_prompts: int = 4,
        seed: int = 0,
        num_inference_steps: int = 20,
        guidance_scale: float = 7.5,
        resolution: int | None = None,
        every_n_validations: int = 1,
        ip: IPConfig | None = None,
        cell_size: int = 128,
    ) -> None:
        for name, value in (("num_prompts", num_prompts), ("num_inference_steps", num_inference_steps),
                            ("every_n_validations", every_n_validations), ("cell_size", cell_size)):
            if value < 1:
                raise ValueError(f"ValidationSamples {name} must be >= 1, got {value}")
        if prompts is not None and not prompts:
            raise ValueError("ValidationSamples prompts is an empty list; give prompts or leave it null")
        self.prompts = list(prompts) if prompts is not None else None
        self.num_prompts = num_prompts
        self.seed = seed
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.resolution = resolution
        self.every_n_validations = every_n_validations
        # Resolved now, so a wrong classifier name fails before training rather than at the first validation.
        self.definition = resolve_definition(ip.definition, ip.custom, ip.classifier_args) if ip is not None else None
        self.cell_size = cell_size
        self._classifiers: dict[str, SafetyClassifier] | None = None
        self._base: list[Image.Image] | None = None
        self._pipe: Any = None
        self._validations = 0

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not isinstance(pl_module, DPOExpertModule):
            raise TypeError(f"ValidationSamples needs a DPOExpertModule, got {type(pl_module).__name__}")
        if self.prompts is None:
            self.prompts = self._default_prompts(trainer)
        val_set = getattr(trainer.datamodule, "val_set", None)
        if val_set is not None and len(val_set) == 0:
            rank_zero_warn("ValidationSamples: this run has no validation split (val_fraction 0), so no samples will be logged")

    def _default_prompts(self, trainer: Trainer) -> list[str]:
        datamodule = trainer.datamodule
        for split in (getattr(datamodule, "val_set", None), getattr(datamodule, "train_set", None)):
            rows = getattr(split, "rows", None) or []
            prompts = list(dict.fromkeys(row["unsafe_prompt"] for row in rows))
            if prompts:
                return prompts[: self.num_prompts]
        raise ValueError("ValidationSamples found no unsafe prompts in the DataModule; set prompts")

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._validations += 1
        if self._validations % self.every_n_validations or not trainer.is_global_zero:
            return
        assert isinstance(pl_module, DPOExpertModule) and self.prompts is not None
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            if self._pipe is None:  # wraps the module's own components, so the LoRA's current weights render
                self._pipe = sampling_pipeline(pl_module.components, pl_module.hparams.base_model)
            pipe = self._pipe
            if self._base is None:
                pl_module.unet.disable_adapters()
                try:
                    self._base = self._render(pipe, trainer)
                finally:
                    pl_module.unet.enable_adapters()
            adapted = self._render(pipe, trainer)
        step = trainer.global_step
        grid = grid_image(["base", "LoRA"], [(p[:18], pair) for p, pair in zip(self.prompts, zip(self._base, adapted))], self.cell_size)
        save_png(grid, Path(trainer.log_dir or trainer.default_root_dir) / "samples" / f"step-{step:07d}.png")
        metrics = {}
        if self.definition is not None:
            if self._classifiers is None:
                self._classifiers = self.definition.build()
                metrics["val/ip_base"] = self._ip(self._base)
            metrics["val/ip"] = self._ip(adapted)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(SAMPLES_TAG, np.asarray(grid), step, dataformats="HWC")
            elif hasattr(logger, "log_image"):  # WandbLogger, NeptuneLogger
                logger.log_image(key=SAMPLES_TAG, images=[grid], step=step)
            if metrics:
                logger.log_metrics(metrics, step=step)

    def _render(self, pipe: Any, trainer: Trainer) -> list[Image.Image]:
        assert self.prompts is not None
        size = self.resolution or getattr(trainer.datamodule, "hparams", {}).get("resolution")
        return pipe(
            prompt=self.prompts,
            generator=[torch.Generator("cpu").manual_seed(self.seed + i) for i in range(len(self.prompts))],
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            height=size,
            width=size,
        ).images

    def _ip(self, images: list[Image.Image]) -> float:
        assert self._classifiers is not None
        flags = flagged([classifier.classify(images) for classifier in self._classifiers.values()])
        return float(np.mean(flags))
