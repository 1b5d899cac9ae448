"""SD3 experts on a tiny SD3 pipeline (an MMDiT transformer, two CLIP encoders, T5 dropped): Diffusion-DPO in
flow-matching form, export, resume, Co-Merge, a builder render and an evaluation run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.training_utils import compute_density_for_timestep_sampling
from fixtures_families import (
    build_dataset,
    check_comerge,
    check_evaluation,
    check_exact_resume,
    check_exported_lora_reproduces,
    check_features,
    check_reference_at_init_then_loss_falls,
    check_unsupported_family,
    expert,
    first_batch,
    saved_pipeline,
)

from safetydpo.models.denoisers import StableDiffusion3


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_pipeline(tmp_path_factory, "sd3")


def test_sd3_flow_matching_rule(sd3_dir: Path, synthetic_data_dir: Path, tmp_path: Path) -> None:
    """Timesteps from the logit-normal density, noising and SNR by the flow scheduler's own sigma table, velocity target."""
    module = expert(sd3_dir)
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
    check_reference_at_init_then_loss_falls(module, first_batch(synthetic_data_dir))
    check_unsupported_family(tmp_path)


def test_sd3_expert_end_to_end(sd3_dir: Path, synthetic_data_dir: Path, tmp_path: Path) -> None:
    module, lora = check_exact_resume(sd3_dir, synthetic_data_dir, tmp_path)
    batch = first_batch(synthetic_data_dir)
    check_exported_lora_reproduces(module, lora, sd3_dir, batch, StableDiffusion3Pipeline)
    dataset = build_dataset(tmp_path / "build", sd3_dir)
    check_features(module, dataset)
    check_evaluation(sd3_dir, lora, dataset, tmp_path)
    check_comerge(module, lora, batch, tmp_path, sd3_dir)
