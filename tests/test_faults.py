"""Faults: a SIGKILLed run resumes exactly, checkpoint writes are atomic, unwritable outputs fail before training."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from fixtures_train import csv_logger, finish, fit_command, logged_losses, run, start, tiny_config, write_config
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from safetydpo.callbacks import LoraExport
from safetydpo.checkpointing import AtomicCheckpointIO
from safetydpo.data import CoProV2DataModule
from safetydpo.models import DPOExpertModule, LoraSettings

MAX_STEPS, EVERY = 10, 3


def killable_config(folder: Path, pipeline_dir: Path, data_dir: Path) -> Path:
    """configs/tiny.yaml, 10 steps, a checkpoint every 3 (16 pairs / batch 4: mid-epoch), loss logged every step."""
    config = tiny_config(folder, pipeline_dir, data_dir)
    config["trainer"].update(max_steps=MAX_STEPS, log_every_n_steps=1, logger=csv_logger(folder / "logs"), enable_progress_bar=False)
    config["trainer"]["callbacks"][1]["init_args"].update(every_n_train_steps=EVERY, save_top_k=-1)
    return write_config(folder / "config.yaml", config)


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_uninterrupted_losses(tiny_pipeline_dir: Path, synthetic_data_dir: Path, tmp_path: Path) -> None:
    full = start(fit_command(killable_config(tmp_path / "full", tiny_pipeline_dir, synthetic_data_dir)), tmp_path / "full" / "output.log")
    config = killable_config(tmp_path / "killed", tiny_pipeline_dir, synthetic_data_dir)
    killed = start(fit_command(config), tmp_path / "killed" / "output.log")
    last = tmp_path / "killed" / "run" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists():
        assert killed.poll() is None, (tmp_path / "killed" / "output.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.01)
    os.kill(killed.pid, signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL, "killed mid-run, not after it finished"
    assert not (tmp_path / "killed" / "run" / "experts" / "violence.safetensors").exists()

    # Whatever the kill interrupted, last.ckpt is a complete checkpoint from a step that trained.
    step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert step % EVERY == 0 and EVERY <= step < MAX_STEPS
    resumed = run(fit_command(config, "--ckpt_path", str(last), "--trainer.logger.init_args.version", "resumed"), cwd=config.parent)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not list(last.parent.glob(".*.tmp")), "a save the kill interrupted left no temporary file after the resumed run"
    finish(full, tmp_path / "full" / "output.log")

    expected = logged_losses(tmp_path / "full" / "logs" / "version_0" / "metrics.csv")
    after = logged_losses(tmp_path / "killed" / "logs" / "resumed" / "metrics.csv")
    assert sorted(after) == list(range(step, MAX_STEPS))
    for index in after:
        assert after[index] == pytest.approx(expected[index], abs=1e-6), index
    assert len({round(value, 4) for value in expected.values()}) > 5, "losses vary step to step, so equality is meaningful"
    final = load_file(tmp_path / "killed" / "run" / "experts" / "violence.safetensors")
    uninterrupted = load_file(tmp_path / "full" / "run" / "experts" / "violence.safetensors")
    assert all(torch.allclose(final[key], uninterrupted[key], atol=1e-6) for key in uninterrupted)


def test_failed_checkpoint_write_leaves_the_previous_file(tmp_path: Path) -> None:
    checkpoint_io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint_io.save_checkpoint({"global_step": 3, "weights": torch.ones(3)}, path)
    with pytest.raises(Exception, match="lambda"):  # torch.save fails part-way through the new file
        checkpoint_io.save_checkpoint({"global_step": 6, "weights": torch.zeros(3), "unpicklable": lambda: None}, path)
    assert checkpoint_io.load_checkpoint(path)["global_step"] == 3
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"], "the partial file was removed"


def test_unwritable_checkpoint_folder_fails_before_training(tiny_pipeline_dir: Path, synthetic_data_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[LoraExport(str(tmp_path / "experts" / "{category}.safetensors")), ModelCheckpoint(dirpath=blocker / "checkpoints")],
    )
    data = CoProV2DataModule(str(synthetic_data_dir), categories=["violence"], resolution=32, batch_size=4, val_fraction=0.34)
    with pytest.raises(OSError, match=r"output directory .*blocker/checkpoints is not writable"):
        trainer.fit(DPOExpertModule(str(tiny_pipeline_dir), lora=LoraSettings(rank=2)), datamodule=data)
    assert trainer.global_step == 0
