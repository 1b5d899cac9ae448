"""SDXL experts on a tiny SDXL pipeline (two CLIP encoders, pooled embeddings, size-and-crop ids): training,
export, resume, Co-Merge, a builder render and an evaluation run, each through the family's diffusers classes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

from safetydpo.lightning_cli import parse_fit_config
from safetydpo.models import DPOExpertModule
from safetydpo.models.denoisers import StableDiffusionXL

pytest.register_assert_rewrite("fixtures_families")  # its checks' asserts report values, as a test module's do
from fixtures_families import (  # noqa: E402
    check_comerge,
    check_encoding_pipeline_is_reused,
    check_evaluation,
    check_exported_lora_reproduces,
    check_features,
    check_reference_at_init_then_loss_falls,
    expert,
    first_batch,
    saved_pipeline,
)

REPO = Path(__file__).resolve().parents[1]
#: trained, loaded_pipeline, dataset, sd_expert: built once for this module on its pipeline_dir.
pytest_plugins = ["fixtures_families"]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_pipeline(tmp_path_factory, "sdxl")


def test_sdxl_conditioning_is_the_pipelines(pipeline_dir: Path, loaded_pipeline: DiffusionPipeline, synthetic_data_dir: Path) -> None:
    module = expert(pipeline_dir)
    assert isinstance(module.denoiser, StableDiffusionXL) and module.text_encoder_2 is not None
    batch = first_batch(synthetic_data_dir)
    embeds, _, pooled, _ = loaded_pipeline.encode_prompt(batch.prompts, device="cpu", do_classifier_free_guidance=False)
    conditioning = module.denoiser.encode(module.components, batch.prompts)
    assert torch.equal(conditioning.embeds, embeds) and torch.equal(conditioning.pooled, pooled)
    check_encoding_pipeline_is_reused(module, batch.prompts)
    latents = torch.zeros(2, 4, 16, 16)
    time_ids = module.denoiser.network_kwargs(module.components, latents, conditioning)["added_cond_kwargs"]["time_ids"]
    assert time_ids.tolist() == [[32, 32, 0, 0, 32, 32]] * 2, "original size, crop top-left, target size of a 32 px image"
    check_reference_at_init_then_loss_falls(module, batch)


def test_sdxl_exported_lora_reproduces_the_trained_unet(
    trained: tuple[DPOExpertModule, Path], loaded_pipeline: DiffusionPipeline, synthetic_data_dir: Path
) -> None:
    """``trained`` is the exact-resume check's expert: the resumed run ends bit for bit where the whole one does."""
    module, lora = trained
    check_exported_lora_reproduces(module, lora, loaded_pipeline, first_batch(synthetic_data_dir), StableDiffusionXLPipeline)


def test_sdxl_features_and_evaluation(
    trained: tuple[DPOExpertModule, Path], pipeline_dir: Path, dataset: Path, sd_expert: DPOExpertModule, tmp_path: Path
) -> None:
    module, lora = trained
    check_features(module, dataset, sd_expert)
    check_evaluation(pipeline_dir, lora, dataset, tmp_path)


def test_sdxl_comerge(
    trained: tuple[DPOExpertModule, Path], loaded_pipeline: DiffusionPipeline, sd_expert: DPOExpertModule,
    synthetic_data_dir: Path, tmp_path: Path,
) -> None:
    module, lora = trained
    check_comerge(module, lora, first_batch(synthetic_data_dir), tmp_path, loaded_pipeline, sd_expert)


def test_release_sdxl_recipe_matches_its_docs_table() -> None:
    """configs/recipes/release_sdxl.yaml parses with the fit parser; every row of its docs/recipes.md table holds."""
    stack = ["configs/expert.yaml", "configs/recipes/release_sdxl.yaml", "configs/experts/sexual.yaml"]
    _, config = parse_fit_config([arg for path in stack for arg in ("--config", str(REPO / path))])
    section = (REPO / "docs" / "recipes.md").read_text(encoding="utf-8").split("## The release's SDXL recipe")[1]
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in section.splitlines()
        if re.match(r"\| `[a-z_.]+` \|", line)
    ]
    assert len(rows) == 19
    for key, value, _ in rows:
        found = config
        for part in key.strip("`").split("."):
            found = found[part]
        assert found == yaml.safe_load(value.strip("`")), key
