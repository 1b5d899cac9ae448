"""DDP: ranks split the single-process batches, a 2-process run trains the same LoRA, only rank 0 writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from fixtures_train import REPO, csv_logger, finish, fit_command, relative_files, start, tiny_config, write_config
from safetensors.torch import load_file

from safetydpo.data.sampler import ResumableDistributedSampler
from safetydpo.locking import LOCK_NAME


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_rank_batches_together_are_the_single_process_batch(world: int, batch_size: int) -> None:
    dataset = list(range(23))
    for epoch in (0, 1):
        single = ResumableDistributedSampler(dataset, num_replicas=1, rank=0, seed=7)
        single.set_epoch(epoch)
        order = list(single)
        ranks = []
        for rank in range(world):
            sampler = ResumableDistributedSampler(dataset, num_replicas=world, rank=rank, seed=7)
            sampler.set_epoch(epoch)
            ranks.append(list(sampler))
        steps = len(ranks[0]) // batch_size
        assert steps == len(order) // (world * batch_size) > 0, "both drop the same incomplete tail"
        global_batch = world * batch_size
        for step in range(steps):
            together = sorted(index for indices in ranks for index in indices[step * batch_size : (step + 1) * batch_size])
            assert together == sorted(order[step * global_batch : (step + 1) * global_batch]), (epoch, step)


def test_ddp_config_keeps_the_single_gpu_global_batch(capsys: pytest.CaptureFixture[str]) -> None:
    from safetydpo.cli.main import SafetyDPOCLI

    def merged(*names: str) -> dict:
        configs = [arg for name in names for arg in ("--config", str(REPO / "configs" / name))]
        with pytest.raises(SystemExit):
            SafetyDPOCLI(args=["fit", *configs, "--print_config"])
        return yaml.safe_load(capsys.readouterr().out)

    def global_batch(config: dict) -> int:
        trainer = config["trainer"]
        return trainer["devices"] * trainer["num_nodes"] * config["data"]["init_args"]["batch_size"] * trainer["accumulate_grad_batches"]

    single = merged("expert.yaml", "experts/hate.yaml")
    ddp = merged("expert.yaml", "expert_ddp.yaml", "experts/hate.yaml")
    assert (ddp["trainer"]["strategy"], ddp["trainer"]["devices"], ddp["trainer"]["accelerator"]) == ("ddp", 8, "gpu")
    assert global_batch(ddp) == global_batch(single) == 32
    assert ddp["trainer"]["default_root_dir"] == "runs/experts/hate"


def ddp_config(folder: Path, pipeline_dir: Path, data_dir: Path, devices: int, batch_size: int, accumulate: int) -> Path:
    config = tiny_config(folder, pipeline_dir, data_dir)
    config["trainer"].update(
        max_steps=4,
        devices=devices,
        accumulate_grad_batches=accumulate,
        logger=csv_logger(folder / "run" / "logs"),
        enable_progress_bar=False,
    )
    if devices > 1:
        config["trainer"]["strategy"] = "ddp"
    # beta 1 instead of 5000: the default beta multiplies float32 rounding differences (batch-size
    # dependent kernels, reduction order) by 5000 before they reach the gradients.
    config["model"]["init_args"]["loss"] = {"class_path": "safetydpo.losses.diffusion_dpo.DiffusionDPOLoss", "init_args": {"beta": 1.0}}
    # No validation split: every pair trains, and no rank-padded validation batches are involved.
    config["data"]["init_args"].update(batch_size=batch_size, val_fraction=0.0)
    return write_config(folder / "config.yaml", config)


@pytest.mark.slow
def test_two_process_ddp_trains_the_single_process_lora(tiny_pipeline_dir: Path, synthetic_data_dir: Path, tmp_path: Path) -> None:
    # Global batch 4 three ways: 2 gloo processes x 2 pairs, 1 process x 4 pairs, 1 process x 2 pairs x 2 accumulated.
    runs = {"ddp": (2, 2, 1), "single": (1, 4, 1), "accumulated": (1, 2, 2)}
    processes = {}
    for name, (devices, batch_size, accumulate) in runs.items():
        config = ddp_config(tmp_path / name, tiny_pipeline_dir, synthetic_data_dir, devices, batch_size, accumulate)
        processes[name] = start(fit_command(config), tmp_path / name / "output.log")
    for name, process in processes.items():
        finish(process, tmp_path / name / "output.log")

    written = {name: relative_files(tmp_path / name / "run") for name in runs}
    assert written["ddp"] == written["single"] == written["accumulated"], "rank 1 wrote nothing of its own"
    assert sorted(path for path in written["ddp"] if path.endswith(".safetensors")) == ["experts/violence.safetensors"]
    # Rank 0 alone holds the run folders' locks (safetydpo.locking); nothing else hidden, no temporary file, is left.
    assert sorted(path for path in written["ddp"] if Path(path).name.startswith(".")) == [f"checkpoints/{LOCK_NAME}", f"logs/{LOCK_NAME}"]

    lora = {name: load_file(tmp_path / name / "run" / "experts" / "violence.safetensors") for name in runs}
    reference = torch.cat([value.flatten() for value in lora["single"].values()])
    assert reference.abs().max() > 1e-3, "the LoRA moved, so agreement is meaningful"
    for name in ("ddp", "accumulated"):
        assert lora[name].keys() == lora["single"].keys()
        other = torch.cat([lora[name][key].flatten() for key in lora["single"]])
        # Float32 summation order differs (all-reduce vs one batch); Adam turns that into at most a
        # few 1e-5 on weights whose gradient nearly cancels. Other samples per step differ by ~1e-2.
        assert (other - reference).norm() / reference.norm() < 1e-5, name
        assert (other - reference).abs().max() < 1e-4, name
