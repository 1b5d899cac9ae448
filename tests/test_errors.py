"""`safetydpo fit` / `lightning fit` on bad input: one stderr line naming the key and the fix, status 2, no traceback."""

from __future__ import annotations

import errno
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from fixtures_train import run_main, tiny_config, write_config

from safetydpo.data.batch import PairSample, collate_pairs
from safetydpo.data.coprov2 import DatasetError
from safetydpo.lightning_cli import FitConfigError
from safetydpo.quiet import VERBOSE_ENV

#: (name, config changes {group: {key: value}}, extra command-line words, what the one line says)
BAD_FIT_INPUTS: list[tuple[str, dict[str, dict[str, Any]], list[str], str]] = [
    ("lora_rank", {"model": {"lora": {"rank": -2}}}, [], r"model \(safetydpo\.models\.DPOExpertModule\): lora\.rank must be >= 1 .*got -2"),
    ("lora_dropout", {"model": {"lora": {"dropout": 1.5}}}, [], r"model .*lora\.dropout must be in \[0, 1\), got 1\.5"),
    ("unknown_loss", {"model": {"loss": "nope"}}, [], r"model .*unknown loss 'nope'; valid choices: .*safety_dpo"),
    ("lr_nan", {"model": {"learning_rate": math.nan}}, [], r"model .*learning_rate must be a finite number > 0 .*got nan"),
    ("lr_negative", {"model": {"learning_rate": -1.0}}, [], r"model .*learning_rate must be a finite number > 0"),
    ("warmup_negative", {"model": {"warmup_steps": -1}}, [], r"model .*warmup_steps must be >= 0"),
    ("val_fraction", {"data": {"val_fraction": 1.5}}, [], r"data \(safetydpo\.data\.CoProV2DataModule\): val_fraction must be in \[0, 1\), got 1\.5"),
    ("batch_size_0", {"data": {"batch_size": 0}}, [], r"data .*batch_size must be >= 1 .*got 0"),
    ("resolution_0", {"data": {"resolution": 0}}, [], r"data .*resolution must be a positive multiple of 8 .*got 0"),
    ("resolution_12", {"data": {"resolution": 12}}, [], r"data .*resolution must be a positive multiple of 8 .*got 12"),
    ("no_dataset", {"data": {"data_dir": "/nonexistent/dataset"}}, [], r"dataset directory /nonexistent/dataset does not exist"),
    ("unknown_key", {}, ["--model.init_args.rnak=4"], r"model\.init_args: Option 'rnak' is not accepted; valid keys: base_model, loss, lora"),
    ("lr_text", {}, ["--model.init_args.learning_rate=fast"], r"model\.init_args\.learning_rate: Expected a <class 'float'>"),
    ("untrusted_import", {}, ["--config", json.dumps({"trainer": {"callbacks": [{"class_path": "lightning.pytorch.callbacks.LambdaCallback",
     "init_args": {"on_fit_start": "os.system"}}]}})], r"Importing 'os.system' is not allowed.*SAFETYDPO_TRUSTED_IMPORTS=PACKAGE"),
]


def bad_config(tmp_path: Path, pipeline: Path, data: Path, changes: dict[str, dict[str, Any]]) -> Path:
    config = tiny_config(tmp_path, pipeline, data)
    config["trainer"]["max_steps"] = 1
    for group, values in changes.items():
        for key, value in values.items():
            target = config[group]["init_args"]
            if isinstance(value, dict):
                target[key] = {**target.get(key, {}), **value}
            else:
                target[key] = value
    return write_config(tmp_path / "expert.yaml", config)


def error_lines(stderr: str) -> list[str]:
    """stderr without Lightning's start-up notes (seed, devices), which go to stderr before the error."""
    notes = ("Seed set to", "GPU available", "TPU available", "HPU available", "💡")
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith(notes)]


def fit_error(command: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit code and stderr of ``COMMAND ARGV`` run in this process."""
    if command == "safetydpo":
        code, _, stderr = run_main(argv, capsys)
        return code, stderr
    from safetydpo.cli.main import lightning_main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        lightning_main(argv)
    return int(exit_.value.code), capsys.readouterr().err


def assert_one_line(command: str, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, stderr = fit_error(command, argv, capsys)
    lines = error_lines(stderr)
    assert code == 2, stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert lines[0].startswith(f"{command} fit: error: "), lines
    assert re.search(message, lines[0]), lines[0]


@pytest.mark.parametrize(("name", "changes", "words", "message"), BAD_FIT_INPUTS, ids=[case[0] for case in BAD_FIT_INPUTS])
def test_a_bad_fit_input_is_one_line(
    name: str, changes: dict[str, dict[str, Any]], words: list[str], message: str,
    tiny_pipeline_dir: Path, synthetic_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    config = bad_config(tmp_path, tiny_pipeline_dir, synthetic_data_dir, changes)
    assert_one_line("safetydpo", ["fit", "--config", str(config), *words], message, capsys)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_lightning_fit_prints_the_same_line(
    tiny_pipeline_dir: Path, synthetic_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, changes, words, message in BAD_FIT_INPUTS:
        if name in ("lora_rank", "unknown_key"):  # one refused by a class, one by the parser
            config = bad_config(tmp_path, tiny_pipeline_dir, synthetic_data_dir, changes)
            assert_one_line("lightning", ["fit", "--config", str(config), *words], message, capsys)


def test_verbose_shows_the_traceback(
    tiny_pipeline_dir: Path, synthetic_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetydpo.cli.main import main

    config = bad_config(tmp_path, tiny_pipeline_dir, synthetic_data_dir, {"data": {"batch_size": 0}})
    monkeypatch.setenv(VERBOSE_ENV, "1")
    with pytest.raises(FitConfigError, match="batch_size must be >= 1") as raised:
        main(["fit", "--config", str(config)])
    assert isinstance(raised.value.__cause__, ValueError)


def sample(position: int, latents: torch.Tensor) -> PairSample:
    row = f"row {position} (id=p{position}, category=violence, concept=crimson)"
    return PairSample(position, "a crimson circle", row, latents_winner=latents, latents_loser=latents.clone(), prompt_embeds=torch.zeros(3, 8))


def test_collate_names_the_row_of_a_wrong_shape_or_non_finite_latent() -> None:
    good = torch.randn(4, 4, 4)
    assert collate_pairs([sample(0, good), sample(1, good)]).latents_winner.shape == (2, 4, 4, 4)
    with pytest.raises(DatasetError, match=r"row 7 \(id=p7.*latents_winner has shape \(4, 8, 8\), row 0 .* has \(4, 4, 4\); rebuild"):
        collate_pairs([sample(0, good), sample(7, torch.randn(4, 8, 8))])
    broken = good.clone()
    broken[0, 1, 2] = math.nan
    with pytest.raises(DatasetError, match=r"row 5 \(id=p5.*latents_winner holds NaN or inf values .*rebuild its features"):
        collate_pairs([sample(0, good), sample(5, broken)])


def test_a_full_disk_during_a_checkpoint_save_is_one_line_naming_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetydpo.checkpointing import AtomicCheckpointIO, CheckpointWriteError
    from safetydpo.cli.main import is_user_error

    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)

    def disk_fills_up(obj: object, target: Path) -> None:  # the disk fills after the first bytes
        Path(target).write_bytes(b"PK\x03\x04")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_fills_up)
    with pytest.raises(CheckpointWriteError) as raised:
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    message = str(raised.value)
    assert "\n" not in message and is_user_error(raised.value)
    assert re.fullmatch(rf"cannot write checkpoint {re.escape(str(path))} \(\d+ MiB free there\): \[Errno 28\] No space left on device; "
                        r"free disk space or set the ModelCheckpoint dirpath to another disk \(the previous checkpoint is intact\)", message)
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(3)), "the previous checkpoint is intact"
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"], "no temporary file is left"


def test_a_run_whose_checkpoint_cannot_fit_on_the_disk_does_not_start(tmp_path: Path) -> None:
    import shutil

    from safetydpo.checkpointing import CheckpointWriteError, check_free_space

    free = shutil.disk_usage(tmp_path).free
    check_free_space(tmp_path / "not" / "yet", free // 2, "checkpoint")  # a folder to be created: its disk is checked
    with pytest.raises(CheckpointWriteError, match=rf"^{re.escape(str(tmp_path))} has [\d.]+ MiB free but a checkpoint needs about [\d.]+ MiB; free disk"):
        check_free_space(tmp_path, free + 2**40, "checkpoint")


def test_features_of_another_base_model_name_the_row(tiny_pipeline_dir: Path) -> None:
    from safetydpo.models.components import load_components
    from safetydpo.models.inputs import pair_latents

    components = load_components(str(tiny_pipeline_dir))
    channels, width = components.unet.config.in_channels, components.text_encoder.config.hidden_size
    embeds = torch.zeros(5, width)
    good = collate_pairs([sample(3, torch.randn(channels, 4, 4)), sample(4, torch.randn(channels, 4, 4))])
    good.prompt_embeds = torch.zeros(2, 5, width)
    assert pair_latents(components, good, 0, 0)[0].shape == (2, channels, 4, 4)
    wider = collate_pairs([sample(3, torch.randn(channels + 4, 4, 4))])
    wider.prompt_embeds = embeds[None]
    with pytest.raises(DatasetError, match=rf"^dataset row 3: its features have {channels + 4} latent channels, the base model takes {channels}; .*rebuild them"):
        pair_latents(components, wider, 0, 0)
    other_text = collate_pairs([sample(9, torch.randn(channels, 4, 4))])
    other_text.prompt_embeds = torch.zeros(1, 5, width * 2)
    with pytest.raises(DatasetError, match=rf"^dataset row 9: its features have {width * 2} text embedding width, the base model takes {width}"):
        pair_latents(components, other_text, 0, 0)


def test_a_resume_of_another_model_is_one_line(
    tiny_pipeline_dir: Path, synthetic_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tiny_config(tmp_path, tiny_pipeline_dir, synthetic_data_dir)
    config["trainer"].update(max_steps=1, check_val_every_n_epoch=100)
    config["trainer"]["callbacks"][1]["init_args"]["every_n_train_steps"] = 1
    path = write_config(tmp_path / "expert.yaml", config)
    code, _, stderr = run_main(["fit", "--config", str(path)], capsys)
    assert code == 0, stderr[-3000:]
    last = Path(config["trainer"]["callbacks"][1]["init_args"]["dirpath"]) / "last.ckpt"
    argv = ["fit", "--config", str(path), "--ckpt_path", str(last), "--trainer.max_steps=2", "--model.init_args.lora.rank=2"]
    assert_one_line("safetydpo", argv, r"trained with model\.init_args\.lora\.rank=4, but the config sets 2; resume with the config", capsys)
