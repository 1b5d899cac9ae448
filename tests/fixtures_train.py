"""`safetydpo fit` runs on the tiny pipeline as subprocesses, the way users and cluster launchers start them."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from safetydpo.checkpointing import AtomicCheckpointIO

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def cli_env() -> dict[str, str]:
    """Offline, one thread per process (several processes share the CI machine; fixed threads keep runs bit-reproducible)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run(command: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout)


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``safetydpo ARGV`` in this process: exit code, stdout, stderr (bad-input checks without a 10 s start-up each)."""
    from safetydpo.cli.main import main

    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def start(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start a run in ``log``'s folder, in the background, its output into ``log`` (a pipe could fill and stall it)."""
    with log.open("wb") as handle:
        return subprocess.Popen(command, cwd=log.parent, env=cli_env(), stdout=handle, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen[bytes], log: Path, timeout: float = 600) -> None:
    """Wait for a run from :func:`start`; fail with the tail of its output unless it exits 0."""
    process.wait(timeout=timeout)
    assert process.returncode == 0, log.read_text()[-3000:]


def fit_command(config: Path, *overrides: str) -> list[str]:
    return [str(BIN / "safetydpo"), "fit", "--config", str(config), *overrides]


def tiny_config(folder: Path, pipeline_dir: Path, data_dir: Path) -> dict[str, Any]:
    """configs/tiny.yaml with its runs/tiny outputs under ``folder / "run"`` and the given inputs."""
    config = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text().replace("runs/tiny", str(folder / "run")))
    config["model"]["init_args"]["base_model"] = str(pipeline_dir)
    config["data"]["init_args"]["data_dir"] = str(data_dir)
    return config


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def csv_logger(save_dir: Path) -> dict[str, Any]:
    """A CSVLogger entry for ``trainer.logger`` writing ``save_dir/<version>/metrics.csv``."""
    return {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(save_dir), "name": ""}}


def logged_losses(metrics_csv: Path, key: str = "train/loss") -> dict[int, float]:
    """Per-step values of ``key`` from a CSVLogger metrics file."""
    with metrics_csv.open() as handle:
        return {int(row["step"]): float(row[key]) for row in csv.DictReader(handle) if row.get(key)}


def relative_files(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*") if path.is_file()}


def fit_in_process(
    model: LightningModule,
    data: LightningDataModule,
    root: Path,
    max_steps: int,
    callbacks: list[Callback],
    ckpt_path: str | Path | None = None,
    every: int | None = None,
    **trainer_args: Any,
) -> None:
    """One CPU fit in this process without logger, bar or validation; checkpoints every ``every`` steps to
    ``root / "ckpt"`` (atomically, as ``safetydpo fit`` writes them) when given, resuming from ``ckpt_path``.

    Seed (``pl.seed_everything``) before building ``model``: its LoRA initialisation draws from the global RNG.
    """
    if every:
        callbacks = [*callbacks, ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=every, save_top_k=-1)]
    trainer = Trainer(
        accelerator="cpu", max_steps=max_steps, callbacks=callbacks, default_root_dir=root, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        plugins=[AtomicCheckpointIO()], **trainer_args,
    )
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
