"""The saved expert is a diffusers LoRA: it loads with load_lora_weights and reproduces the trained UNet."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import save_file

from safetydpo.io import atomic_file
from safetydpo.lora_files import EXPERT_FORMAT, MERGED_FORMAT, hub_card, hub_card_path, file_sha256, read_card, record_evaluation, save_lora
from safetydpo.models import DPOExpertModule, LoraSettings


def randomised_expert(pipeline_dir: Path) -> DPOExpertModule:
    module = DPOExpertModule(str(pipeline_dir), lora=LoraSettings(rank=4, alpha=8.0))
    generator = torch.Generator().manual_seed(0)
    for name, param in module.unet.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.2
    return module


def unet_output(unet: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, 32, generator=generator)
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), encoder_hidden_states=context).sample


def test_saved_lora_reproduces_the_trained_unet_in_diffusers(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    module = randomised_expert(tiny_pipeline_dir)
    path = save_lora(tmp_path / "expert.safetensors", module.lora_weights(), module.unet.peft_config["default"], {"category": "x"})
    assert json.loads(path.with_suffix(".json").read_text()) == {"category": "x", "weights_sha256": file_sha256(path)}
    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
    assert keys and all(key.startswith("unet.") and ".lora_" in key for key in keys)
    assert not list(tmp_path.glob(".*")), "no temporary files are left behind"

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    base = unet_output(pipe.unet)
    pipe.load_lora_weights(str(path))
    # alpha (8) != rank (4): the scale folded into lora_B must survive the round trip exactly.
    assert torch.allclose(unet_output(pipe.unet), unet_output(module.unet), atol=1e-5)
    assert not torch.allclose(unet_output(pipe.unet), base, atol=1e-3)


def test_loaded_lora_changes_generated_images(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    module = randomised_expert(tiny_pipeline_dir)
    path = save_lora(tmp_path / "expert.safetensors", module.lora_weights(), module.unet.peft_config["default"], {})
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)

    def render() -> torch.Tensor:
        return torch.from_numpy(
            pipe("a crimson circle", num_inference_steps=3, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
        )

    before = render()
    pipe.load_lora_weights(str(path))
    after = render()
    assert (after - before).abs().mean().item() > 1e-3


def test_lora_file_name_must_be_safetensors(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    module = DPOExpertModule(str(tiny_pipeline_dir), lora=LoraSettings(rank=2))
    with pytest.raises(ValueError, match="must end in .safetensors"):
        save_lora(tmp_path / "expert.bin", module.lora_weights(), module.unet.peft_config["default"], {})


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_follow_the_umask(tiny_pipeline_dir: Path, tmp_path: Path, umask: int) -> None:
    """safetensors writes its own 0600 temporary file; the renamed LoRA and card still get the umask's mode."""
    module = randomised_expert(tiny_pipeline_dir)
    previous = os.umask(umask)
    try:
        path = save_lora(tmp_path / "expert.safetensors", module.lora_weights(), module.unet.peft_config["default"], {})
        with atomic_file(tmp_path / "shard.safetensors") as tmp:
            save_file({"x": torch.zeros(2)}, str(tmp))
    finally:
        os.umask(previous)
    for written in (path, path.with_suffix(".json"), path.with_suffix(".md"), tmp_path / "shard.safetensors"):
        assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~umask, written.name


def front_matter(text: str) -> dict:
    assert text.startswith("---\n"), text[:80]
    return yaml.safe_load(text.split("---\n", 2)[1])


def test_hub_card_has_the_front_matter_the_hub_indexes(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    module = randomised_expert(tiny_pipeline_dir)
    card = {"format": EXPERT_FORMAT, "base_model": str(tiny_pipeline_dir), "category": "violence", "steps": 12}
    path = save_lora(tmp_path / "violence.safetensors", module.lora_weights(), module.unet.peft_config["default"], card)
    text = hub_card_path(path).read_text(encoding="utf-8")
    meta = front_matter(text)
    assert meta["base_model"] == str(tiny_pipeline_dir) and meta["library_name"] == "diffusers"
    assert meta["pipeline_tag"] == "text-to-image" and meta["license"] == "other", "no base-model card to take it from"
    assert {"safetydpo", "lora", "violence"} <= set(meta["tags"])
    assert 'weight_name="violence.safetensors"' in text and "steps: 12" in text and "model-index" not in meta

    rows = [{"category": "violence", "ip_base": 0.5, "ip_aligned": 0.125}, {"category": "overall", "ip_base": 0.5, "ip_aligned": 0.125}]
    record_evaluation(path, {"prompt_set": "i2p", "ip_definition": "sld: image unsafe if q16 OR nudenet", "rows": rows})
    assert read_card(path)["evaluation"]["rows"] == rows, "the weights' hash still matches the rewritten card"
    text = hub_card_path(path).read_text(encoding="utf-8")
    (entry,) = front_matter(text)["model-index"]
    assert entry["name"] == "violence" and entry["results"][0]["dataset"]["name"] == "i2p"
    assert [(m["type"], m["value"]) for m in entry["results"][0]["metrics"]] == [("inappropriate_probability", 0.125)] * 2
    assert "| violence | 0.500 | 0.125 |" in text and "steps: 12" in text


def test_hub_card_takes_the_base_models_license(tmp_path: Path) -> None:
    base = tmp_path / "stable-diffusion-v1-5"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: creativeml-openrail-m\ntags: [stable-diffusion]\n---\n# SD 1.5\n", encoding="utf-8")
    card = {"format": MERGED_FORMAT, "base_model": str(base), "method": "comerge", "categories": ["hate", "sexual"],
            "experts": [{"category": "hate"}, {"category": "sexual"}]}
    meta = front_matter(hub_card(card, "merged.safetensors"))
    assert meta["license"] == "creativeml-openrail-m" and {"hate", "sexual"} <= set(meta["tags"])
