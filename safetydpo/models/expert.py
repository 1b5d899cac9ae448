"""DPOExpertModule: one safety expert = a LoRA on a frozen SD UNet trained with a preference loss."""

from __future__ import annotations

import dataclasses
import math
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.training_utils import cast_training_params
from lightning.pytorch import LightningModule
from torch import Tensor

from safetydpo.checkpointing import resume_with_config
from safetydpo.data.batch import PairBatch
from safetydpo.devices import DTYPES
from safetydpo.losses import DenoisingErrors, LossOutput, PreferenceLoss, build_objective, check_finite
from safetydpo.models.components import DiffusionComponents, freeze, load_components
from safetydpo.models.denoisers.base import Conditioning
from safetydpo.models.inputs import anchor_latents, anchor_noise_and_timesteps, noise_and_timesteps, pair_inputs
from safetydpo.models.lora import LoraSettings, attach_lora, lora_state_dict
from safetydpo.quiet import ignore_warnings

# Components handed to ``DPOExpertModule.from_components``; out of band so they stay out of hparams and the CLI schema.
_PRELOADED: ContextVar[DiffusionComponents | None] = ContextVar("preloaded_components", default=None)


def _squared_error(prediction: Tensor, target: Tensor) -> Tensor:
    """Per-sample mean squared error, shape ``(batch,)``."""
    return F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))


class DPOExpertModule(LightningModule):
    """Trains only a LoRA on the UNet; the reference is the same UNet with the adapter disabled.

    Each pair gets one noise sample and timestep shared by winner and loser, both go through the
    UNet in one concatenated forward pass, and the reference pass runs under ``no_grad`` with
    adapters disabled, so no second UNet is held in memory. Noise is seeded per (step, dataset
    row), so resumed and multi-GPU runs draw exactly the noise a single uninterrupted run draws.

    Args:
        base_model: diffusers pipeline folder or hub id: SD 1.x / 2.x, SDXL or SD3 (the family is read from its
            ``model_index.json``; see ``safetydpo.models.denoisers``).
        loss: registered loss name (``safety_dpo``, ``diffusion_dpo``, ``dpo_sft``, ``ipo``, ``margin``, ``min_snr_dpo``, ``diffusion_kto``, ``anchor``), ``{class_path, init_args}``, an instance, or a list of weighted terms ``[{name: diffusion_dpo, beta: 5000}, {name: anchor, weight: 100}]`` (``weight`` defaults to 1; the objective is their weighted sum, each term logged as ``train/loss_<name>``).
        lora: LoRA rank, alpha, target modules, dropout and init.
        learning_rate: AdamW learning rate for the LoRA weights.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps before the constant learning rate.
        scale_lr: multiply ``learning_rate`` by the pairs per optimizer step (batch size x gradient
            accumulation x devices), as the release's SD 1.5 launcher does with ``--scale_lr``.
        category: harm category this expert removes (recorded in the model card).
        noise_seed: seed of the diffusion noise and timesteps.
        revision: hub revision of the pretrained model.
        variant: weight variant (e.g. ``fp16``) of the pretrained model.
        frozen_dtype: storage dtype of the frozen UNet, VAE and text encoder (``bfloat16`` halves their
            memory; use with ``trainer.precision: bf16-mixed``). LoRA weights always stay float32.
        gradient_checkpointing: recompute UNet activations in the backward pass (less memory, ~30% slower).
        channels_last: NHWC memory format for the UNet convolutions (faster on recent GPUs).
        compile: ``torch.compile`` the UNet (one graph each for the policy and reference passes).
        anchor_weight: weight of the anchor term, the mean squared difference between policy and
            reference predictions on anchors (safe prompts outside the expert's concepts, served by
            ``CoProV2DataModule(anchors=True)``). It keeps an expert from shifting neighbouring
            concepts (red -> purple also turning green into blue) and reduces the interference of
            merged experts; 0 disables it. The same as appending ``{name: anchor, weight: W}`` to ``loss``.
    """

    def __init__(
        self,
        base_model: str,
        loss: str | PreferenceLoss | list[str | dict[str, Any]] = "safety_dpo",
        lora: LoraSettings | None = None,
        learning_rate: float = 1e-5,
        weight_decay: float = 1e-2,
        warmup_steps: int = 0,
        category: str | None = None,
        noise_seed: int = 0,
        revision: str | None = None,
        variant: str | None = None,
        frozen_dtype: str = "float32",
        gradient_checkpointing: bool = False,
        channels_last: bool = False,
        compile: bool = False,
        anchor_weight: float = 0.0,
        scale_lr: bool = False,
    ) -> None:
        super().__init__()
        if not (math.isfinite(learning_rate) and learning_rate > 0):
            raise ValueError(f"learning_rate must be a finite number > 0 (1e-5 to 1e-3 are usual for a LoRA), got {learning_rate}")
        if not (math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not (math.isfinite(anchor_weight) and anchor_weight >= 0):
            raise ValueError(f"anchor_weight must be a finite number >= 0 (0 disables the anchor term), got {anchor_weight}")
        self.loss_fn = build_objective(loss, anchor_weight)
        self.lora_settings = lora or LoraSettings()
        self.save_hyperparameters(ignore=["loss", "lora"])
        # A value the `loss` argument accepts: registered names and class paths (looked up, never imported).
        if isinstance(loss, list):
            self.hparams["loss"] = self.loss_fn.spec()
        else:
            term = type(self.loss_fn.terms[0].loss)
            self.hparams["loss"] = {"class_path": f"{term.__module__}.{term.__qualname__}", "init_args": dataclasses.asdict(self.loss_fn.terms[0].loss)}
        self.hparams["lora"] = dataclasses.asdict(self.lora_settings)
        if frozen_dtype not in DTYPES:
            raise ValueError(f"frozen_dtype '{frozen_dtype}' is not one of: {', '.join(DTYPES)}")
        preloaded = _PRELOADED.get()
        if preloaded is not None:
            components = preloaded.cast(DTYPES[frozen_dtype])
        else:
            components = load_components(base_model, revision=revision, variant=variant, dtype=DTYPES[frozen_dtype])
        self.components = components
        self.denoiser = components.denoiser
        self.unet = components.unet  # the adapted network: a UNet, or SD3's transformer
        self.vae = components.vae
        self.text_encoder = components.text_encoder
        self.text_encoder_2 = components.text_encoder_2
        self.text_encoder_3 = components.text_encoder_3
        self.tokenizer = components.tokenizer
        self.noise_scheduler = components.noise_scheduler
        freeze(self.unet, *components.encoders())
        # The frozen base is in eval mode on purpose (no dropout in the reference); Lightning warns at fit start.
        ignore_warnings(r"Found \d+ module\(s\) in eval mode")
        # Lightning's own pytree helper calls an API torch has deprecated when it handles our step outputs.
        ignore_warnings(r"`isinstance\(treespec, LeafSpec\)` is deprecated")
        attach_lora(self.unet, self.lora_settings)
        cast_training_params(self.unet, torch.float32)  # fp32 LoRA master weights over a low-precision base
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        # Kept outside the module tree so the compiled wrapper adds no second copy of the UNet's state.
        object.__setattr__(self, "_unet_forward", torch.compile(self.unet) if compile else self.unet)
        # Checkpoints hold only the trainable LoRA weights; the frozen base comes from the pretrained path.
        self.strict_loading = False

    @classmethod
    def from_components(cls, components: DiffusionComponents, name: str = "in-memory", **kwargs: Any) -> DPOExpertModule:
        """Build around components already in memory (benchmarks, tests) instead of a checkpoint on disk.

        Goes through ``__init__``, so freezing, LoRA, casting and the fast-path options are exactly
        those of a training run; ``name`` is recorded as ``base_model``. The
        components are modified in place (adapter attached, frozen, cast).
        """
        token = _PRELOADED.set(components)
        try:
            return cls(name, **kwargs)
        finally:
            _PRELOADED.reset(token)

    # ------------------------------------------------------------------ inputs
    def train(self, mode: bool = True) -> DPOExpertModule:
        """Keep the frozen encoders in eval mode whatever Lightning asks of the module tree."""
        super().train(mode)
        for module in self.components.encoders():
            module.eval()
        return self

    def _anchor_inputs(self, batch: PairBatch, step: int) -> tuple[Tensor, Conditioning] | None:
        """Anchor latents and safe-prompt conditioning, or ``None`` when no loss term reads anchors."""
        if self.loss_fn.uses_anchors and not batch.has_anchors:
            term = "anchor_weight > 0" if self.hparams.anchor_weight > 0 else "the loss's anchor term"
            raise ValueError(f"{term} needs anchors in the batches: set data.init_args.anchors: true")
        if not batch.has_anchors or not self.loss_fn.uses_anchors:
            return None
        return anchor_latents(self.components, batch, self.hparams.noise_seed, step)

    # ------------------------------------------------------------------ loss
    def _schedule_position(self, timesteps: Tensor) -> dict[str, Any]:
        """Where on the noise schedule the pairs were scored, for timestep-weighted loss terms (``DenoisingErrors``).

        The one place the loss learns the model's schedule, through the denoiser interface: the
        per-sample SNR (DDPM: diffusers' ``compute_snr``; flow matching: ((1 - sigma) / sigma)^2),
        sigma for flow-matching models and the prediction type, so no loss branches on the model family.
        """
        components = self.components
        return {
            "timesteps": timesteps,
            "snr": self.denoiser.snr(components, timesteps),
            "sigmas": self.denoiser.sigmas(components, timesteps),
            "prediction_type": self.denoiser.prediction_type(components),
        }

    def _predict(self, latents: Tensor, noise: Tensor, timesteps: Tensor, conditioning: Conditioning) -> tuple[Tensor, Tensor]:
        """The network's prediction for the noised ``latents`` and its training target (the family's rule), both float32."""
        noisy, target = self.denoiser.noisy_and_target(self.components, latents, noise, timesteps)
        prediction = self.denoiser.predict(self.components, self._unet_forward, noisy, timesteps, conditioning)
        return prediction.float(), target.float()

    def preference_step(self, batch: PairBatch, step: int) -> tuple[LossOutput, DenoisingErrors]:
        """Errors of policy and reference on one batch of pairs (and anchors), and the loss over them."""
        seed = self.hparams.noise_seed
        winner, loser, conditioning = pair_inputs(self.components, batch, seed, step)
        noise, timesteps = noise_and_timesteps(self.components, winner, batch.positions, seed, step)
        # Winner and loser share noise and timestep; they and the anchors go through the network in one forward pass.
        parts = [(torch.cat([winner, loser]), noise.repeat(2, 1, 1, 1), timesteps.repeat(2), conditioning.repeat(2))]
        anchors = self._anchor_inputs(batch, step)
        if anchors is not None:
            anchor_clean, anchor_conditioning = anchors
            anchor_noise, anchor_timesteps = anchor_noise_and_timesteps(self.components, anchor_clean, batch, seed, step)
            parts.append((anchor_clean.to(winner), anchor_noise, anchor_timesteps, anchor_conditioning.to(conditioning.embeds)))
        latents, noises, all_timesteps, conditionings = zip(*parts)
        args = (torch.cat(latents), torch.cat(noises), torch.cat(all_timesteps), Conditioning.cat(list(conditionings)))
        num_pairs = 2 * winner.shape[0]
        prediction, target = self._predict(*args)
        policy_winner, policy_loser = _squared_error(prediction[:num_pairs], target[:num_pairs]).chunk(2)
        reference_winner = reference_loser = anchor_drift = None
        if self.loss_fn.uses_reference or anchors is not None:
            # The reference only needs the anchors when the loss itself is reference-free.
            start = 0 if self.loss_fn.uses_reference else num_pairs
            with torch.no_grad():
                self.unet.disable_adapters()
                try:
                    reference, _ = self._predict(*(part[start:] for part in args[:3]), args[3].select(slice(start, None)))
                finally:
                    self.unet.enable_adapters()
            if self.loss_fn.uses_reference:
                reference_winner, reference_loser = _squared_error(reference[:num_pairs], target[:num_pairs]).chunk(2)
            if anchors is not None:
                anchor_drift = _squared_error(prediction[num_pairs:], reference[num_pairs - start :])
        errors = DenoisingErrors(
            policy_winner, policy_loser, reference_winner, reference_loser, anchor_drift, **self._schedule_position(timesteps)
        )
        return self.loss_fn(errors), errors

    def _log_step(self, stage: str, output: LossOutput, errors: DenoisingErrors, batch_size: int) -> None:
        metrics = {
            f"{stage}/loss": output.loss,
            f"{stage}/implicit_accuracy": output.implicit_accuracy,
            f"{stage}/reward_margin": output.reward_margin.mean(),
            f"{stage}/mse_policy_winner": errors.policy_winner.mean(),
            f"{stage}/mse_policy_loser": errors.policy_loser.mean(),
        }
        if errors.reference_winner is not None and errors.reference_loser is not None:
            metrics[f"{stage}/mse_reference_winner"] = errors.reference_winner.mean()
            metrics[f"{stage}/mse_reference_loser"] = errors.reference_loser.mean()
        if errors.anchor_drift is not None:
            metrics[f"{stage}/anchor_drift"] = errors.anchor_drift.mean()
        metrics |= {f"{stage}/loss_{key}": value for key, value in output.terms.items()}
        on_step = stage == "train"
        self.log_dict(metrics, on_step=on_step, on_epoch=not on_step, prog_bar=False, batch_size=batch_size, sync_dist=not on_step)
        self.log(f"{stage}_loss", output.loss, prog_bar=True, on_step=on_step, on_epoch=not on_step, batch_size=batch_size, sync_dist=not on_step)

    def training_step(self, batch: PairBatch, batch_idx: int) -> Tensor:
        output, errors = self.preference_step(batch, self.global_step)
        # Checked on the loss averaged over ranks, so a NaN on any rank stops all of them at this step
        # (a rank raising alone would leave the others blocked in the gradient all-reduce).
        check_finite(self.trainer.strategy.reduce(output.loss.detach().clone(), reduce_op="mean"), self.global_step)
        self._log_step("train", output, errors, len(batch))
        return output.loss

    def validation_step(self, batch: PairBatch, batch_idx: int) -> None:
        # A fixed step index gives every validation pass the same noise, so val losses compare across epochs.
        output, errors = self.preference_step(batch, step=0)
        self._log_step("val", output, errors, len(batch))

    # ------------------------------------------------------------------ optimisation and state
    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.unet.parameters() if p.requires_grad]
        lr = self.hparams.learning_rate
        if self.hparams.scale_lr:
            datamodule = self.trainer.datamodule
            if datamodule is None or "batch_size" not in datamodule.hparams:
                raise ValueError("scale_lr needs a data module with a batch_size (CoProV2DataModule)")
            lr *= datamodule.hparams.batch_size * self.trainer.accumulate_grad_batches * self.trainer.world_size
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=self.hparams.weight_decay)
        warmup = max(self.hparams.warmup_steps, 0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        resume_with_config(checkpoint, self)  # the config wins; another base model, LoRA shape or category is an error

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {name for name, param in self.named_parameters() if param.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def lora_weights(self) -> dict[str, Tensor]:
        """The trained LoRA in diffusers/peft key format, scale folded in (see ``lora_state_dict``)."""
        return lora_state_dict(self.unet)
