"""SD3 experts on a tiny SD3 pipeline (an MMDiT transformer, two CLIP encoders, T5 dropped): Diffusion-DPO in
flow-matching form, export, resume, Co-Merge, a builder render and an evaluation run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusion3Pipeline
from diffusers.training_utils import compute_density_for_timestep_sampling

from safetydpo.models import DPOExpertModule
from safetydpo.models.denoisers import StableDiffusion3

pytest.register_assert_rewrite("fixtures_families")  # its checks' asserts report values, as a test module's do
from fixtures_families import (  # noqa: E402
    check_comerge,
    check_encoding_pipeline_is_reused,
    check_evaluation,
    check_exported_lora_reproduces,
    check_features,
    check_reference_at_init_then_loss_falls,
    check_unsupported_family,
    expert,
    first_batch,
    saved_pipeline,
)

#: trained, loaded_pipeline, dataset, sd_expert: built once for this module on its pipeline_dir.
pytest_plugins = ["fixtures_families"]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_pipeline(tmp_path_factory, "sd3")


def test_sd3_flow_matching_rule(pipeline_dir: Path, loaded_pipeline: DiffusionPipeline, synthetic_data_dir: Path, tmp_path: Path) -> None:
    """Timesteps from the logit-normal density, noising and SNR by the flow scheduler's own sigma table, velocity target."""
    module = expert(pipeline_dir)
    assert isinstance(module.denoiser, StableDiffusion3) and module.text_encoder_3 is None
    assert all(".attn." in name for name, _ in module.unet.named_parameters() if "lora_" in name), "LoRA on attention only"
    components, scheduler = module.components, module.noise_scheduler
    drawn = module.denoiser.sample_timestep(components, torch.Generator().manual_seed(3))
    u = compute_density_for_timestep_sampling("logit_normal", 1, 0.0, 1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(drawn, scheduler.timesteps[(u * 1000).long()])
    latents, noise = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
    noisy, target = module.denoiser.noisy_and_target(components, latents, noise, drawn)
    sigma = scheduler.sigmas[(scheduler.timesteps == drawn).nonzero()[0, 0]]
    torch.testing.assert_close(noisy, scheduler.scale_noise(latents, drawn, noise))
    torch.testing.assert_close(noisy, (1 - sigma) * latents + sigma * noise)
    assert torch.equal(target, noise - latents)
    torch.testing.assert_close(module.denoiser.snr(components, drawn), ((1 - sigma) / sigma).reshape(1) ** 2)
    batch = first_batch(synthetic_data_dir)
    embeds, _, pooled, _ = loaded_pipeline.encode_prompt(batch.prompts, None, None, device="cpu", do_classifier_free_guidance=False)
    conditioning = module.denoiser.encode(components, batch.prompts)
    assert torch.equal(conditioning.embeds, embeds) and torch.equal(conditioning.pooled, pooled)
    check_encoding_pipeline_is_reused(module, batch.prompts)
    check_reference_at_init_then_loss_falls(module, batch)
    check_unsupported_family(tmp_path)


def test_sd3_exported_lora_reproduces_the_trained_transformer(
    trained: tuple[DPOExpertModule, Path], loaded_pipeline: DiffusionPipeline, synthetic_data_dir: Path
) -> None:
    """``trained`` is the exact-resume check's expert: the resumed run ends bit for bit where the whole one does."""
    module, lora = trained
    check_exported_lora_reproduces(module, lora, loaded_pipeline, first_batch(synthetic_data_dir), StableDiffusion3Pipeline)


def test_sd3_features_and_evaluation(
    trained: tuple[DPOExpertModule, Path], pipeline_dir: Path, dataset: Path, sd_expert: DPOExpertModule, tmp_path: Path
) -> None:
    module, lora = trained
    check_features(module, dataset, sd_expert)
    check_evaluation(pipeline_dir, lora, dataset, tmp_path)


def test_sd3_comerge(
    trained: tuple[DPOExpertModule, Path], loaded_pipeline: DiffusionPipeline, sd_expert: DPOExpertModule,
    synthetic_data_dir: Path, tmp_path: Path,
) -> None:
    module, lora = trained
    check_comerge(module, lora, first_batch(synthetic_data_dir), tmp_path, loaded_pipeline, sd_expert)
