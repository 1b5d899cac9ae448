"""SDXL experts on a tiny SDXL pipeline (two CLIP encoders, pooled embeddings, size-and-crop ids): training,
export, resume, Co-Merge, a builder render and an evaluation run, each through the family's diffusers classes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import StableDiffusionXLPipeline
from fixtures_families import (
    build_dataset,
    check_comerge,
    check_evaluation,
    check_exact_resume,
    check_exported_lora_reproduces,
    check_features,
    check_reference_at_init_then_loss_falls,
    expert,
    first_batch,
    saved_pipeline,
)

from safetydpo.lightning_cli import parse_fit_config
from safetydpo.models.denoisers import StableDiffusionXL

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_pipeline(tmp_path_factory, "sdxl")


def test_sdxl_conditioning_is_the_pipelines(sdxl_dir: Path, synthetic_data_dir: Path) -> None:
    module = expert(sdxl_dir)
    assert isinstance(module.denoiser, StableDiffusionXL) and module.text_encoder_2 is not None
    batch = first_batch(synthetic_data_dir)
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    embeds, _, pooled, _ = pipe.encode_prompt(batch.prompts, device="cpu", do_classifier_free_guidance=False)
    conditioning = module.denoiser.encode(module.components, batch.prompts)
    assert torch.equal(conditioning.embeds, embeds) and torch.equal(conditioning.pooled, pooled)
    latents = torch.zeros(2, 4, 16, 16)
    time_ids = module.denoiser.network_kwargs(module.components, latents, conditioning)["added_cond_kwargs"]["time_ids"]
    assert time_ids.tolist() == [[32, 32, 0, 0, 32, 32]] * 2, "original size, crop top-left, target size of a 32 px image"
    check_reference_at_init_then_loss_falls(module, batch)


def test_sdxl_expert_end_to_end(sdxl_dir: Path, synthetic_data_dir: Path, tmp_path: Path) -> None:
    module, lora = check_exact_resume(sdxl_dir, synthetic_data_dir, tmp_path)
    batch = first_batch(synthetic_data_dir)
    check_exported_lora_reproduces(module, lora, sdxl_dir, batch, StableDiffusionXLPipeline)
    dataset = build_dataset(tmp_path / "build", sdxl_dir)
    check_features(module, dataset)
    check_evaluation(sdxl_dir, lora, dataset, tmp_path)
    check_comerge(module, lora, batch, tmp_path, sdxl_dir)


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
