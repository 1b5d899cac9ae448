"""Resuming a fit: the config wins (learning rate included, warm-up continuing), a checkpoint of another
model (category, LoRA shape, base model) is refused in one line, and a killed save's temporary files
are cleaned up."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from fixtures_train import fit_in_process
from lightning.pytorch import Callback

from safetydpo.checkpointing import AtomicCheckpointIO, ResumeMismatchError, remove_stale_temporaries
from safetydpo.data import CoProV2DataModule
from safetydpo.models import DPOExpertModule, LoraSettings

WARMUP = 4  # lr factor at step k: min(1, (k + 1) / (WARMUP + 1))


class LearningRates(Callback):
    """The optimizer's learning rate at the start of every training step."""

    def __init__(self) -> None:
        self.by_step: dict[int, float] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.by_step[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


def fit(pipeline_dir: Path, data_dir: Path, root: Path, max_steps: int, ckpt_path: Path | None = None, **model: Any) -> LearningRates:
    model = {"category": "violence", "learning_rate": 1e-3, "lora": LoraSettings(rank=4), "warmup_steps": WARMUP, **model}
    pl.seed_everything(0)
    rates = LearningRates()
    data = CoProV2DataModule(str(data_dir), categories=["violence"], resolution=32, batch_size=4, val_fraction=0.34)
    fit_in_process(DPOExpertModule(str(pipeline_dir), **model), data, root, max_steps, [rates], ckpt_path, every=2)
    return rates


@pytest.fixture(scope="module")
def step2(tiny_pipeline_dir: Path, synthetic_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint after 2 steps at lr 1e-3 mid-warm-up, with a killed save's temporary file beside it."""
    root = tmp_path_factory.mktemp("first")
    fit(tiny_pipeline_dir, synthetic_data_dir, root, max_steps=2)
    (stale := root / "ckpt" / ".epoch=0-step=4.ckpt.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    os.utime(stale, (time.time() - 60, time.time() - 60))
    return next((root / "ckpt").glob("*step=2.ckpt"))


def test_resume_trains_at_the_configured_learning_rate(tiny_pipeline_dir: Path, synthetic_data_dir: Path, step2: Path, tmp_path: Path) -> None:
    rates = fit(tiny_pipeline_dir, synthetic_data_dir, tmp_path, max_steps=4, ckpt_path=step2, learning_rate=1e-2)
    # The stored optimizer state holds lr 1e-3; the config's 1e-2 applies, and the warm-up goes on from step 2.
    assert rates.by_step == {2: pytest.approx(1e-2 * 3 / 5), 3: pytest.approx(1e-2 * 4 / 5)}
    assert not list(step2.parent.glob(".*.tmp")), "the interrupted save's temporary file was removed on resume"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"category": "hate"}, "model.init_args.category='violence', but the config sets 'hate'"),
        ({"lora": LoraSettings(rank=2)}, "model.init_args.lora.rank=4, but the config sets 2"),
    ],
)
def test_resume_into_another_model_is_one_line(
    tiny_pipeline_dir: Path, synthetic_data_dir: Path, step2: Path, tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    with pytest.raises(ResumeMismatchError, match=rf"trained with {message}; resume with the config it was trained with") as err:
        fit(tiny_pipeline_dir, synthetic_data_dir, tmp_path, max_steps=4, ckpt_path=step2, **change)
    assert "\n" not in str(err.value)


def test_only_stale_temporaries_are_removed(tmp_path: Path) -> None:
    checkpoint_io = AtomicCheckpointIO()
    time.sleep(0.05)  # file times are coarser than time.time()
    old, live = tmp_path / ".last.ckpt.a1.tmp", tmp_path / ".last.ckpt.b2.tmp"
    other = tmp_path / ".expert.safetensors.c3.tmp"  # not a checkpoint's
    for path in (old, live, other):
        path.write_bytes(b"x")
    os.utime(old, (time.time() - 60, time.time() - 60))
    os.utime(other, (time.time() - 60, time.time() - 60))
    assert remove_stale_temporaries(tmp_path, before=time.time() - 1) == [old]
    assert live.exists() and other.exists(), "a save in progress elsewhere and other files are left alone"
    checkpoint_io.save_checkpoint({"step": torch.tensor(1)}, tmp_path / "last.ckpt")
    assert live.exists(), "written after this process started: another run's save in progress"


def test_a_kill_between_the_weights_and_the_card_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from peft import LoraConfig

    from safetydpo import lora_files

    def weights(seed: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        return {f"mid_block.to_q.lora_{ab}.weight": torch.randn(shape, generator=generator) for ab, shape in (("A", (2, 8)), ("B", (8, 2)))}

    path, config = tmp_path / "violence.safetensors", LoraConfig(r=2, target_modules=["to_q"])
    lora_files.save_lora(path, weights(0), config, {"category": "violence", "steps": 100})
    assert lora_files.read_card(path)["weights_sha256"] == lora_files.file_sha256(path)

    def killed(*args: Any) -> None:  # the process dies after renaming the new weights, before the new card
        raise KeyboardInterrupt

    monkeypatch.setattr(lora_files, "write_json_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        lora_files.save_lora(path, weights(1), config, {"category": "violence", "steps": 200})
    with pytest.raises(lora_files.LoraFileError, match=r"violence.safetensors is not the file its model card .*violence.json describes") as err:
        lora_files.read_card(path)
    assert "\n" not in str(err.value)
