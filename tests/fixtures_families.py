"""The checks tests/test_sdxl.py and tests/test_sd3.py run on a tiny pipeline of their family.

Each tiny pipeline is built from configs in code (``safetydpo.models.tiny``), saved with
``save_pretrained`` and loaded back through ``from_pretrained``, as a real checkpoint is.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml
from diffusers import DiffusionPipeline
from lightning.pytorch.callbacks import ModelCheckpoint

from safetydpo.callbacks.lora_export import LoraExport
from safetydpo.data import CoProV2DataModule
from safetydpo.data.batch import PairBatch
from safetydpo.data.builder import build, load_build_config
from safetydpo.data.coprov2 import DatasetError
from safetydpo.evaluation.config import config_from_dict
from safetydpo.evaluation.runner import evaluate
from safetydpo.lora_files import load_lora, save_lora
from safetydpo.merging.experts import ExpertMismatchError
from safetydpo.merging.files import merge_expert_files
from safetydpo.models import DPOExpertModule, LoraSettings
from safetydpo.models.components import components_from_pipeline, encode_conditioning, load_components
from safetydpo.models.denoisers.base import pipeline_index, unstored_components
from safetydpo.models.inputs import activation_inputs, noise_and_timesteps, pair_inputs
from safetydpo.models.tiny import build_tiny_pipeline, save_tiny_pipeline

STEPS = 2


def expert(pipeline_dir: Path, **kwargs: Any) -> DPOExpertModule:
    kwargs.setdefault("lora", LoraSettings(rank=4))
    kwargs.setdefault("learning_rate", 3e-3)
    kwargs.setdefault("loss", "diffusion_dpo")
    return DPOExpertModule(str(pipeline_dir), category="violence", **kwargs)


def data(data_dir: Path, **kwargs: Any) -> CoProV2DataModule:
    return CoProV2DataModule(str(data_dir), categories=["violence"], resolution=32, batch_size=2, val_fraction=0.0, **kwargs)


def first_batch(data_dir: Path, **kwargs: Any) -> PairBatch:
    module = data(data_dir, **kwargs)
    module.setup("fit")
    return next(iter(module.train_dataloader()))


def saved_pipeline(tmp_path_factory: pytest.TempPathFactory, family: str) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp(family) / "pipeline", seed=0, family=family)


# The fixtures below are built once per test module (each module defines ``pipeline_dir``, its family's folder)
# and shared by its tests; none of those tests changes them.


@pytest.fixture(scope="module")
def trained(pipeline_dir: Path, synthetic_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[DPOExpertModule, Path]:
    """The family's one trained expert and its exported LoRA, from the exact-resume check."""
    return check_exact_resume(pipeline_dir, synthetic_data_dir, tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="module")
def loaded_pipeline(pipeline_dir: Path) -> DiffusionPipeline:
    """The family's diffusers pipeline, loaded by ``DiffusionPipeline.from_pretrained`` as users load it."""
    return DiffusionPipeline.from_pretrained(pipeline_dir, **unstored_components(pipeline_index(str(pipeline_dir))))


@pytest.fixture(scope="module")
def dataset(pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_dataset(tmp_path_factory.mktemp("build"), pipeline_dir)


@pytest.fixture(scope="module")
def sd_expert() -> DPOExpertModule:
    """An SD 1.x expert, the other family that merges and features must refuse."""
    return DPOExpertModule.from_components(components_from_pipeline(build_tiny_pipeline(0)), lora=LoraSettings(rank=4))


def check_reference_at_init_then_loss_falls(module: DPOExpertModule, batch: PairBatch, steps: int = 4) -> None:
    """The zero-initialised LoRA starts exactly at the reference (loss log 2); training on one batch lowers the loss."""
    optimizer = module.configure_optimizers()["optimizer"]
    losses = []
    for step in range(steps):
        output, errors = module.preference_step(batch, step=0)
        if step == 0:
            assert torch.equal(errors.policy_winner, errors.reference_winner) and torch.equal(errors.policy_loser, errors.reference_loser)
            assert output.loss.item() == pytest.approx(math.log(2), rel=1e-5)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        losses.append(output.loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def fit(pipeline_dir: Path, data_dir: Path, root: Path, ckpt_path: Path | None = None) -> DPOExpertModule:
    """``STEPS`` training steps with a checkpoint after each; the LoRA is exported to ``root/expert.safetensors``."""
    pl.seed_everything(0)
    module = expert(pipeline_dir)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        callbacks=[ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_top_k=-1), LoraExport(str(root / "expert.safetensors"))],
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, data(data_dir), ckpt_path=ckpt_path)
    return module


def check_exact_resume(pipeline_dir: Path, data_dir: Path, root: Path) -> tuple[DPOExpertModule, Path]:
    """A run resumed from its step-1 checkpoint ends with the uninterrupted run's LoRA, bit for bit."""
    whole = fit(pipeline_dir, data_dir, root / "whole")
    first = sorted((root / "whole" / "ckpt").glob("*step=1.ckpt"))
    assert first, sorted((root / "whole" / "ckpt").iterdir())
    resumed = fit(pipeline_dir, data_dir, root / "resumed", ckpt_path=first[0])
    ours, theirs = whole.lora_weights(), resumed.lora_weights()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert any(value.abs().max() > 0 for key, value in ours.items() if "lora_B" in key), "training moved the LoRA"
    return whole, root / "whole" / "expert.safetensors"


def network_inputs(module: DPOExpertModule, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor, Any]:
    winner, _, conditioning = pair_inputs(module.components, batch, 0, 0)
    noise, timesteps = noise_and_timesteps(module.components, winner, batch.positions, 0, 0)
    noisy, _ = module.denoiser.noisy_and_target(module.components, winner, noise, timesteps)
    return noisy, timesteps, conditioning


@torch.no_grad()
def check_exported_lora_reproduces(module: DPOExpertModule, lora: Path, pipe: DiffusionPipeline, batch: PairBatch, pipeline_class: type) -> None:
    """The exported file, loaded by the family's own pipeline ``load_lora_weights``, gives the trained network's output."""
    assert load_lora(lora).card["model_family"] == module.denoiser.registry_name
    assert type(pipe) is pipeline_class
    pipe.load_lora_weights(str(lora))
    noisy, timesteps, conditioning = network_inputs(module, batch)
    trained = module.denoiser.predict(module.components, module.unet, noisy, timesteps, conditioning)
    loaded = module.denoiser.predict(module.components, getattr(pipe, module.denoiser.network_name), noisy, timesteps, conditioning)
    pipe.unload_lora_weights()
    module.unet.disable_adapters()
    base = module.denoiser.predict(module.components, module.unet, noisy, timesteps, conditioning)
    module.unet.enable_adapters()
    assert not torch.allclose(trained, base), "the LoRA changes the output"
    torch.testing.assert_close(loaded, trained, rtol=1e-4, atol=1e-5)


def check_comerge(module: DPOExpertModule, lora: Path, batch: PairBatch, root: Path, pipe: DiffusionPipeline, sd_expert: DPOExpertModule) -> None:
    """Co-Merge of two experts of this family, scored on the family's network inputs, loads into its pipeline;
    an SD 1.5 expert in the same merge is a one-line error naming both files."""
    generator = torch.Generator().manual_seed(1)
    weights = {key: torch.randn(value.shape, generator=generator) * 0.05 if "lora_B" in key else value
               for key, value in sorted(module.lora_weights().items())}
    card = {"base_model": module.hparams.base_model, "category": "sexual", "model_family": module.denoiser.registry_name}
    other = save_lora(root / "other.safetensors", weights, module.unet.peft_config["default"], card, network=module.denoiser.network_name)
    module.unet.disable_adapters()
    try:
        merged = merge_expert_files(
            [lora, other], root / "merged.safetensors", unet=module.unet,
            inputs=activation_inputs(module.components, [batch], seed=0, total=1),
        )
    finally:
        module.unet.enable_adapters()
    assert merged["activation_inputs"] == 2 * len(batch) and merged["model_family"] == module.denoiser.registry_name
    assert sum(merged["contribution_share"].values()) == pytest.approx(1.0)
    pipe.load_lora_weights(str(root / "merged.safetensors"))
    pipe.unload_lora_weights()
    sd_file = save_lora(root / "sd15.safetensors", sd_expert.lora_weights(), sd_expert.unet.peft_config["default"], {"model_family": "sd"})
    with pytest.raises(ExpertMismatchError, match=rf"{sd_file} is an expert of another model family than {lora}: sd \(unet LoRA\)"):
        merge_expert_files([lora, sd_file], root / "mixed.safetensors", method="linear")


def build_dataset(root: Path, pipeline_dir: Path) -> Path:
    """A two-pair build rendered by the family's pipeline (2 steps, 32 px): images plus feature shards."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "taxonomy.yaml").write_text(yaml.safe_dump({"violence": {"blood": ["red paint"]}}))
    config = {
        "output": str(root / "data"),
        "taxonomy": str(root / "taxonomy.yaml"),
        "generator": {"name": "template", "seed": 0},
        "pairs": {"per_concept": 2},
        "render": {"base_model": str(pipeline_dir), "steps": 2, "height": 32, "width": 32, "batch_size": 2, "shard_size": 2, "device": "cpu"},
    }
    (root / "data.yaml").write_text(yaml.safe_dump(config))
    result = build(load_build_config(root / "data.yaml"))
    assert result.rows == 2
    return root / "data"


def check_features(module: DPOExpertModule, dataset: Path, sd_expert: DPOExpertModule) -> None:
    """The shards hold the family's conditioning (pooled embeddings included); training reads them; an SD 1.5
    model refuses them naming the row."""
    batch = first_batch(dataset, use_precomputed=True)
    assert batch.pooled_prompt_embeds is not None
    expected = encode_conditioning(module.components, batch.prompts)
    torch.testing.assert_close(batch.prompt_embeds, expected.embeds)
    torch.testing.assert_close(batch.pooled_prompt_embeds, expected.pooled)
    output, _ = module.preference_step(batch, step=0)
    assert math.isfinite(output.loss.item())
    sd = sd_expert.components
    with pytest.raises(DatasetError, match=r"dataset row \d+: its features have .* the base model takes .*another model than this sd one: rebuild them"):
        pair_inputs(sd, batch, 0, 0)


def check_evaluation(pipeline_dir: Path, lora: Path, dataset: Path, root: Path) -> None:
    """``evaluate`` renders base and LoRA models of the family and scores IP on the dataset's prompts."""
    config = config_from_dict({
        "output_dir": str(root / "eval"),
        "models": [{"name": "base", "base_model": str(pipeline_dir)}, {"name": "aligned", "base_model": str(pipeline_dir), "lora": str(lora)}],
        "prompt_sets": [{"name": "unsafe", "source": "coprov2", "path": str(dataset), "images_per_prompt": 1, "metrics": ["ip"]}],
        "generation": {"num_inference_steps": 2, "height": 32, "width": 32, "batch_size": 4},
        "ip": {"definition": "custom", "custom": [{"name": "toyworld"}]},
        "grid": {"rows": 2, "seeds": 1, "cell_size": 32},
        "bootstrap_resamples": 10,
    }, "test")
    evaluate(config)
    results = json.loads((root / "eval" / "results.json").read_text())["results"]
    for model in ("base", "aligned"):
        assert len(list((root / "eval" / "images" / model / "unsafe").glob("*.png"))) == 2
        assert 0.0 <= results[model]["unsafe"]["ip"]["overall"]["value"] <= 1.0


def check_encoding_pipeline_is_reused(module: DPOExpertModule, prompts: list[str]) -> None:
    """Two encodes go through one pipeline built around the components' own modules (no second copy of a weight)."""
    first = module.denoiser.encode(module.components, prompts)
    pipe = _encoding_pipeline(module)
    second = module.denoiser.encode(module.components, prompts)
    assert _encoding_pipeline(module) is pipe and torch.equal(first.embeds, second.embeds)
    assert all(getattr(pipe, name) is part for name, part in module.components.modules().items())


def _encoding_pipeline(module: DPOExpertModule) -> DiffusionPipeline:
    return module.denoiser.prompt_pipeline(module.components)


def check_unsupported_family(root: Path) -> None:
    """A pipeline folder of a family no denoiser handles is one line naming its model_index.json and the choices."""
    from safetydpo.models.denoisers import UnsupportedModelError

    folder = root / "flux"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    with pytest.raises(UnsupportedModelError, match=r"flux/model_index.json: pipeline class 'FluxPipeline' is not a supported .*StableDiffusionXLPipeline \(sdxl\)"):
        load_components(str(folder))
