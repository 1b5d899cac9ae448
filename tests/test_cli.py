"""`lightning fit --config` and `safetydpo fit --config` end to end on the tiny pipeline, as users run them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from diffusers import StableDiffusionPipeline
from fixtures_train import BIN, REPO, run, write_config
from fixtures_train import tiny_config as base_config

from safetydpo.losses import LOSSES


def tiny_config(tmp_path: Path, pipeline_dir: Path, data_dir: Path, **model_args: object) -> Path:
    """configs/tiny.yaml pointed at this test's folders: 12 steps, validation every epoch."""
    config = base_config(tmp_path, pipeline_dir, data_dir)
    config["trainer"]["max_steps"] = 12
    config["trainer"]["check_val_every_n_epoch"] = 1
    config["model"]["init_args"].update(model_args)
    return write_config(tmp_path / "expert.yaml", config)


@pytest.mark.slow
def test_lightning_fit_writes_a_loadable_expert(tiny_pipeline_dir: Path, synthetic_data_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, tiny_pipeline_dir, synthetic_data_dir)
    result = run([str(BIN / "lightning"), "fit", "--config", str(config)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # Without a terminal (stdout is a pipe here): lines in optimizer steps, a validation line, no epoch bar.
    assert re.search(r"^expert violence: step 12/12 · loss -?\d+\.\d{3} · acc ", result.stdout, re.MULTILINE), result.stdout[-2000:]
    assert re.search(r"^expert violence: validation at step \d+: loss ", result.stdout, re.MULTILINE)
    assert "Epoch " not in result.stdout
    # TensorBoard is the default logger (a dependency): the run's scalars are in an event file under default_root_dir.
    (events,) = (tmp_path / "run" / "logs").glob("lightning_logs/version_0/events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    assert {"train/loss", "train/implicit_accuracy", "train/reward_margin", "val/loss"} <= set(accumulator.Tags()["scalars"])
    assert [event.step for event in accumulator.Scalars("val/loss")][-1] >= 11
    expert = tmp_path / "run" / "experts" / "violence.safetensors"
    card = json.loads(expert.with_suffix(".json").read_text())
    assert card["category"] == "violence" and card["steps"] == 12
    assert card["loss"] == {"name": "safety_dpo", "beta": 5000.0}
    assert set(card["concepts"]) < {"crimson", "scarlet", "maroon"}
    assert "train/loss" in card["metrics"] and "val/implicit_accuracy" in card["metrics"]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="np")
    before = pipe("a crimson circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(str(expert))
    after = pipe("a crimson circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert abs(after - before).max() > 0, "the trained LoRA changes what the pipeline renders"


@pytest.mark.slow
def test_safetydpo_fit_accepts_a_loss_class_path(tiny_pipeline_dir: Path, synthetic_data_dir: Path, tmp_path: Path) -> None:
    loss = {"class_path": "safetydpo.losses.ipo.IPOLoss", "init_args": {"beta": 1000.0, "tau": 0.2}}
    config = tiny_config(tmp_path, tiny_pipeline_dir, synthetic_data_dir, loss=loss)
    result = run([str(BIN / "safetydpo"), "fit", "--config", str(config), "--trainer.max_steps", "4"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    card = json.loads((tmp_path / "run" / "experts" / "violence.json").read_text())
    assert card["loss"] == {"name": "ipo", "beta": 1000.0, "tau": 0.2} and card["steps"] == 4


def test_wrong_config_key_is_named(tiny_pipeline_dir: Path, synthetic_data_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, tiny_pipeline_dir, synthetic_data_dir, learning_rat=1e-3)
    result = run([str(BIN / "safetydpo"), "fit", "--config", str(config)], cwd=tmp_path)
    assert result.returncode != 0
    assert "learning_rat" in result.stderr


def test_unknown_loss_name_from_yaml(tiny_pipeline_dir: Path, synthetic_data_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, tiny_pipeline_dir, synthetic_data_dir, loss="dpo_typo")
    result = run([str(BIN / "safetydpo"), "fit", "--config", str(config)], cwd=tmp_path)
    assert result.returncode != 0
    assert f"unknown loss 'dpo_typo'; valid choices: {', '.join(sorted(LOSSES.names()))}" in result.stderr


def test_unwritable_output_fails_before_training(tiny_pipeline_dir: Path, synthetic_data_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    config = tiny_config(tmp_path, tiny_pipeline_dir, synthetic_data_dir)
    settings = yaml.safe_load(config.read_text())
    settings["trainer"]["callbacks"][0]["init_args"]["output_path"] = str(blocker / "experts" / "v.safetensors")
    config.write_text(yaml.safe_dump(settings))
    result = run([str(BIN / "safetydpo"), "fit", "--config", str(config)], cwd=tmp_path)
    assert result.returncode != 0
    assert "is not writable" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists(), "nothing was trained"


def test_project_help_lists_subcommands(tmp_path: Path) -> None:
    result = run([str(BIN / "safetydpo"), "--help"], cwd=tmp_path)
    assert result.returncode == 0
    assert "tiny" in result.stdout and "fit" in result.stdout


@pytest.mark.parametrize("category", ["hate", "harassment", "violence", "self_harm", "sexual", "shocking", "illegal_activity", "all"])
def test_shipped_expert_configs_parse_with_the_data_filter_linked(category: str) -> None:
    from safetydpo.lightning_cli import parse_fit_config

    configs = ["--config", str(REPO / "configs" / "expert.yaml"), "--config", str(REPO / "configs" / "experts" / f"{category}.yaml")]
    _, config = parse_fit_config(configs)
    assert config.model.init_args.category == category
    assert config.data.init_args.categories == (None if category == "all" else [category])
    assert config.data.init_args.anchors is False, "anchor_weight 0 serves no anchors"
    assert config.trainer.default_root_dir == f"runs/experts/{category}"
    _, anchored = parse_fit_config([*configs, "--model.init_args.anchor_weight", "2.0"])
    assert anchored.data.init_args.anchors is True
