"""DPOExpertModule on the tiny pipeline: loss falls, reference is the adapter-free UNet, resume is exact."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import open_clip
import pytest
import torch
from fixtures_train import fit_in_process
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from safetydpo.data import CoProV2DataModule
from safetydpo.losses.diffusion_dpo import DiffusionDPOLoss
from safetydpo.models import DPOExpertModule, LoraSettings
from safetydpo.models.components import components_from_pipeline
from safetydpo.models.tiny import build_tiny_pipeline
from safetydpo.models.tokenizer import build_clip_tokenizer


def expert(pipeline_dir: Path, **kwargs) -> DPOExpertModule:
    kwargs.setdefault("lora", LoraSettings(rank=4))
    kwargs.setdefault("learning_rate", 1e-3)
    return DPOExpertModule(str(pipeline_dir), **kwargs)


def violence_data(data_dir: Path, batch_size: int = 4) -> CoProV2DataModule:
    return CoProV2DataModule(str(data_dir), categories=["violence"], resolution=32, batch_size=batch_size, val_fraction=0.34)


def test_offline_tokenizer_matches_open_clip() -> None:
    ours = build_clip_tokenizer()
    text = "a photo of a violent scene, 4k"
    reference = open_clip.get_tokenizer("ViT-L-14")([text])[0]
    ids = ours(text)["input_ids"]
    assert ids == reference[: len(ids)].tolist()
    assert len(ours) == 49408


def test_only_lora_is_trainable(tiny_pipeline_dir: Path) -> None:
    module = expert(tiny_pipeline_dir)
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert not any(p.requires_grad for p in module.vae.parameters())
    assert not any(p.requires_grad for p in module.text_encoder.parameters())


def test_unknown_lora_target_names_valid_choices(tiny_pipeline_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"target_modules \['to_qq'\] match no Linear/Conv2d layer.*choices include: .*to_q"):
        expert(tiny_pipeline_dir, lora=LoraSettings(target_modules=["to_qq", "to_v"]))


def test_missing_pretrained_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"pretrained model '.*nowhere' is not a diffusers pipeline folder"):
        DPOExpertModule(str(tmp_path / "nowhere"))


def test_reference_equals_policy_at_init_and_is_adapter_free(tiny_pipeline_dir: Path, synthetic_data_dir: Path) -> None:
    module = expert(tiny_pipeline_dir)
    dm = violence_data(synthetic_data_dir)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    output, errors = module.preference_step(batch, step=0)
    # Gaussian LoRA init has lora_B = 0: the policy starts exactly at the reference.
    assert torch.allclose(errors.policy_winner, errors.reference_winner)
    assert output.loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), rel=1e-5)
    for name, param in module.unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    _, moved = module.preference_step(batch, step=0)
    assert not torch.allclose(moved.policy_winner, moved.reference_winner)
    assert torch.allclose(moved.reference_winner, errors.reference_winner), "reference ignores the adapter"


def in_memory_expert(**kwargs) -> DPOExpertModule:
    """The pipeline ``tiny_pipeline_dir`` holds (seed 0), built in memory, with a random non-zero LoRA."""
    module = DPOExpertModule.from_components(components_from_pipeline(build_tiny_pipeline(seed=0)), lora=LoraSettings(rank=4), **kwargs)
    generator = torch.Generator().manual_seed(0)
    for _, param in sorted(module.named_parameters()):
        if param.requires_grad:
            param.data = torch.randn(param.shape, generator=generator) * 0.05
    return module


def test_from_components_is_the_module_loaded_from_disk(tiny_pipeline_dir: Path, synthetic_data_dir: Path) -> None:
    in_memory = in_memory_expert(frozen_dtype="bfloat16")
    assert in_memory.hparams.base_model == "in-memory"
    assert not any(isinstance(value, torch.nn.Module) for value in in_memory.hparams.values()), "no weights in hparams"
    dtypes = {name: param.dtype for name, param in in_memory.named_parameters()}
    assert {dtypes[name] for name in dtypes if "lora_" in name} == {torch.float32}
    assert {dtypes[name] for name in dtypes if "lora_" not in name} == {torch.bfloat16}

    in_memory, loaded = in_memory_expert(), expert(tiny_pipeline_dir)
    loaded.load_state_dict({name: p for name, p in in_memory.named_parameters() if p.requires_grad}, strict=False)
    dm = violence_data(synthetic_data_dir)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    _, ours = in_memory.preference_step(batch, step=0)
    _, reference = loaded.preference_step(batch, step=0)
    assert not torch.allclose(ours.policy_winner, ours.reference_winner), "the LoRA is active"
    for field in ("policy_winner", "policy_loser", "reference_winner", "reference_loser"):
        assert torch.equal(getattr(ours, field), getattr(reference, field)), field


def test_fast_path_options_keep_the_gradients(synthetic_data_dir: Path) -> None:
    dm = violence_data(synthetic_data_dir)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))

    def gradients(**options: bool) -> torch.Tensor:
        # beta 1: the default 5000 would multiply float32 rounding (NHWC kernels) by 2500 in the margin.
        module = in_memory_expert(loss=DiffusionDPOLoss(beta=1.0), **options).train()
        output, _ = module.preference_step(batch, step=0)
        output.loss.backward()
        return torch.cat([p.grad.flatten() for _, p in sorted(module.named_parameters()) if p.requires_grad])

    plain = gradients()
    assert plain.abs().max() > 0
    assert torch.equal(gradients(gradient_checkpointing=True), plain), "recomputation is exact"
    assert (gradients(channels_last=True) - plain).norm() / plain.norm() < 1e-4


def test_dpo_loss_falls_on_a_fixed_batch(tiny_pipeline_dir: Path, synthetic_data_dir: Path) -> None:
    torch.manual_seed(0)
    module = expert(tiny_pipeline_dir, loss="diffusion_dpo", learning_rate=3e-3)
    dm = violence_data(synthetic_data_dir)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    optimizer = module.configure_optimizers()["optimizer"]
    losses = []
    for _ in range(25):
        output, _ = module.preference_step(batch, step=0)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        losses.append(output.loss.item())
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)
    assert losses[-1] < 0.5 * losses[0], losses


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.losses[trainer.global_step - 1] = outputs["loss"].item()


def fit(pipeline_dir: Path, data_dir: Path, root: Path, max_steps: int, ckpt_path: str | None = None, every: int | None = None) -> LossRecorder:
    pl.seed_everything(0)
    recorder = LossRecorder()
    fit_in_process(expert(pipeline_dir), violence_data(data_dir), root, max_steps, [recorder], ckpt_path, every)
    return recorder


def test_mid_epoch_resume_reproduces_the_uninterrupted_run(
    tiny_pipeline_dir: Path, synthetic_data_dir: Path, tmp_path: Path
) -> None:
    # 16 training pairs / batch 4 = 4 steps per epoch; the checkpoint at step 6 is mid-epoch.
    full = fit(tiny_pipeline_dir, synthetic_data_dir, tmp_path / "full", max_steps=10)
    fit(tiny_pipeline_dir, synthetic_data_dir, tmp_path / "part", max_steps=6, every=6)
    checkpoint = next((tmp_path / "part" / "ckpt").glob("*step=6.ckpt"))
    assert checkpoint.stat().st_size < 1_000_000, "checkpoints hold the LoRA, not the frozen base"
    resumed = fit(tiny_pipeline_dir, synthetic_data_dir, tmp_path / "resumed", max_steps=10, ckpt_path=str(checkpoint))
    assert sorted(resumed.losses) == [6, 7, 8, 9]
    for step in range(6, 10):
        assert resumed.losses[step] == pytest.approx(full.losses[step], rel=1e-6, abs=1e-7), step
    assert len(set(full.losses.values())) > 5, "losses vary step to step, so equality is meaningful"


class PoisonLora(Callback):
    """Turns the LoRA into NaNs just before step ``step``, as a diverging run would; keeps the weights it replaced."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.good: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if trainer.global_step == self.step:
            self.good = {name: p.detach().clone() for name, p in pl_module.named_parameters() if p.requires_grad}
            for name, param in pl_module.unet.named_parameters():
                if "lora_B" in name:
                    param.data.fill_(float("nan"))


def test_nan_loss_stops_training_at_its_step_and_keeps_the_last_good_checkpoint(
    tiny_pipeline_dir: Path, synthetic_data_dir: Path, tmp_path: Path
) -> None:
    poison, checkpoints = PoisonLora(step=3), tmp_path / "ckpt"
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=6,
        callbacks=[poison, ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=3, save_top_k=-1, save_last=True)],
        logger=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    with pytest.raises(FloatingPointError, match=r"preference loss is not finite at step 3 \(nan\)"):
        trainer.fit(expert(tiny_pipeline_dir), datamodule=violence_data(synthetic_data_dir))
    assert sorted(path.name for path in checkpoints.iterdir()) == ["epoch=0-step=3.ckpt", "last.ckpt"], "no NaN-state checkpoint"
    for path in checkpoints.iterdir():
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        assert checkpoint["global_step"] == 3
        assert checkpoint["state_dict"].keys() == poison.good.keys()
        assert all(torch.equal(value, poison.good[name]) for name, value in checkpoint["state_dict"].items())
    resumed = fit(tiny_pipeline_dir, synthetic_data_dir, tmp_path / "resumed", max_steps=4, ckpt_path=str(checkpoints / "last.ckpt"))
    assert list(resumed.losses) == [3] and math.isfinite(resumed.losses[3])


def anchored_batch(data_dir: Path) -> dict:
    dm = CoProV2DataModule(str(data_dir), categories=["violence"], resolution=32, batch_size=4, val_fraction=0.0, anchors=True)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_anchor_term_is_the_weighted_drift_from_the_reference(tiny_pipeline_dir: Path, synthetic_data_dir: Path) -> None:
    batch = anchored_batch(synthetic_data_dir)
    module = expert(tiny_pipeline_dir, loss="diffusion_dpo", anchor_weight=3.0)
    output, errors = module.preference_step(batch, step=0)
    assert torch.equal(errors.anchor_drift, torch.zeros(4)), "lora_B = 0 at init: no drift"
    for name, param in module.unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    output, errors = module.preference_step(batch, step=0)
    assert errors.anchor_drift.shape == (4,) and errors.anchor_drift.min() > 0
    assert output.loss.item() == pytest.approx(DiffusionDPOLoss()(errors).loss.item() + 3.0 * errors.anchor_drift.mean().item(), rel=1e-6)
    unanchored = expert(tiny_pipeline_dir, loss="diffusion_dpo")
    unanchored.load_state_dict({n: p for n, p in module.named_parameters() if p.requires_grad}, strict=False)
    plain_output, plain_errors = unanchored.preference_step(batch, step=0)
    assert plain_errors.anchor_drift is None, "anchors in the batch are ignored at weight 0"
    assert torch.equal(plain_errors.policy_winner, errors.policy_winner), "anchors share the forward pass without changing the pairs"
    plain = violence_data(synthetic_data_dir)
    plain.setup("fit")
    with pytest.raises(ValueError, match="anchor_weight > 0 needs anchors in the batches: set data.init_args.anchors: true"):
        module.preference_step(next(iter(plain.train_dataloader())), step=0)


def test_anchor_weight_keeps_the_expert_near_the_base_on_anchors(tiny_pipeline_dir: Path, synthetic_data_dir: Path) -> None:
    batch = anchored_batch(synthetic_data_dir)

    def drift_after_training(anchor_weight: float) -> float:
        torch.manual_seed(0)
        module = expert(tiny_pipeline_dir, loss="diffusion_dpo", learning_rate=3e-3, anchor_weight=anchor_weight)
        optimizer = module.configure_optimizers()["optimizer"]
        for step in range(15):
            output, _ = module.preference_step(batch, step=step)
            optimizer.zero_grad()
            output.loss.backward()
            optimizer.step()
        measuring = expert(tiny_pipeline_dir, loss="diffusion_dpo", anchor_weight=1.0)
        measuring.load_state_dict({n: p for n, p in module.named_parameters() if p.requires_grad}, strict=False)
        with torch.no_grad():
            return measuring.preference_step(batch, step=99)[1].anchor_drift.mean().item()

    free, anchored = drift_after_training(0.0), drift_after_training(1000.0)
    assert anchored < 0.2 * free, (anchored, free)
