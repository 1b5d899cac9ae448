"""Training progress counts optimizer steps and, without a terminal, prints lines a log file can be read from."""

from __future__ import annotations

import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
from fixtures_train import REPO

from safetydpo.callbacks import StepProgress
from safetydpo.data import CoProV2DataModule
from safetydpo.lightning_cli import SafetyDPOCLI
from safetydpo.models import DPOExpertModule, LoraSettings

LINE = re.compile(r"^expert violence: step (\d+)/8 · loss -?\d+\.\d{3} · acc \d\.\d{3} · margin -?\d+\.\d{3} · [\d.]+ s(, ETA .+)?$")


def fit_violence(pipeline_dir: Path, data_dir: Path, root: Path, progress: StepProgress, max_steps: int) -> None:
    pl.seed_everything(0)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=max_steps, accumulate_grad_batches=2, callbacks=[progress],
        default_root_dir=root, logger=False, enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
    )
    module = DPOExpertModule(str(pipeline_dir), lora=LoraSettings(rank=2), category="violence")
    trainer.fit(module, datamodule=CoProV2DataModule(str(data_dir), categories=["violence"], resolution=32, batch_size=2, val_fraction=0.0))


def test_lines_every_n_steps_with_eta_and_a_final_line(
    tiny_pipeline_dir: Path, synthetic_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fit_violence(tiny_pipeline_dir, synthetic_data_dir, tmp_path, StepProgress(every_n_steps=3, terminal=False), max_steps=8)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("expert ")]
    assert all(LINE.match(line) for line in lines), lines
    assert [int(LINE.match(line).group(1)) for line in lines] == [3, 6, 8], "optimizer steps, not batches (2 per step)"
    assert all(", ETA " in line for line in lines[:-1]) and ", ETA " not in lines[-1]


def test_a_terminal_gets_one_bar_named_by_the_category(
    tiny_pipeline_dir: Path, synthetic_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fit_violence(tiny_pipeline_dir, synthetic_data_dir, tmp_path, StepProgress(terminal=True), max_steps=2)
    out = capsys.readouterr().out
    assert re.search(r"expert violence: 100%.* 2/2 .*loss -?\d+\.\d{3} · acc ", out), out
    assert out.rstrip().splitlines()[-1].startswith("expert violence: step 2/2 · loss "), "the closing line follows the bar"


def test_the_cli_adds_the_step_bar_unless_one_is_configured_or_disabled(
    tiny_pipeline_dir: Path, synthetic_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.argv", ["safetydpo"])
    config = ["--config", str(REPO / "configs/tiny.yaml"), "--trainer.logger", "false",
              "--model.init_args.base_model", str(tiny_pipeline_dir), "--data.init_args.data_dir", str(synthetic_data_dir)]

    def bars(*args: str) -> list[str]:
        cli = SafetyDPOCLI(args=[*config, *args], run=False)
        return [type(callback).__name__ for callback in cli.trainer.callbacks if isinstance(callback, pl.callbacks.ProgressBar)]

    assert bars() == ["StepProgress"]
    assert bars("--trainer.enable_progress_bar", "false") == []
    assert bars("--trainer.callbacks+=lightning.pytorch.callbacks.RichProgressBar") == ["RichProgressBar"]


def test_line_progress_writes_counted_lines_with_eta_and_a_last_line() -> None:
    import io

    from safetydpo.progress import LineProgress

    stream = io.StringIO()
    with LineProgress(total=4, desc="render", unit="pair", initial=1, interval=0.0, stream=stream) as bar:
        for _ in range(3):
            bar.update(1)
    lines = stream.getvalue().splitlines()
    assert [line.split(" · ")[0] for line in lines] == ["render: 2/4 pair", "render: 3/4 pair", "render: 4/4 pair"]
    assert all(", ETA " in line for line in lines[:2]) and ", ETA" not in lines[-1], "no ETA once done"
    quiet = io.StringIO()
    assert list(LineProgress(range(1000), desc="pairs", unit="concept", interval=3600.0, stream=quiet)) == list(range(1000))
    assert [line.split(" · ")[0] for line in quiet.getvalue().splitlines()] == ["pairs: 1/1000 concept", "pairs: 1000/1000 concept"]
