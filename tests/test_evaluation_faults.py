"""`evaluate` on broken inputs: a NaN LoRA, weights that render NaN, a damaged cached PNG (one line, or redone)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from fixtures_eval import save_random_lora, save_tiny_open_clip
from safetensors.torch import load_file, save_file

from safetydpo.evaluation.config import config_from_dict
from safetydpo.evaluation.errors import EvaluationError
from safetydpo.evaluation.images import open_rgb
from safetydpo.evaluation.runner import evaluate

PROMPTS = "prompt,categories,hard,sd_seed,sd_guidance_scale,sd_image_width,sd_image_height\na crimson circle,violence,0,22,7,512,512\n"


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return {"model": save_tiny_open_clip(tmp_path_factory.mktemp("clip") / "clip")}


def config(tmp_path: Path, clip: dict[str, Any], **model: str) -> Any:
    (tmp_path / "i2p.csv").write_text(PROMPTS, encoding="utf-8")
    return config_from_dict({
        "output_dir": str(tmp_path / "out"), "device": "cpu", "models": [{"name": "aligned", **model}],
        "prompt_sets": [{"name": "i2p", "source": "i2p", "path": str(tmp_path / "i2p.csv"), "images_per_prompt": 2, "metrics": ["clipscore"]}],
        "generation": {"num_inference_steps": 2, "height": 32, "width": 32, "batch_size": 2},
        "clipscore": {"clip": clip}, "grid": {"rows": 1, "seeds": 2, "cell_size": 32},
    }, "eval.yaml")


def test_a_nan_lora_is_refused_before_rendering(tiny_pipeline_dir: Path, tmp_path: Path, clip: dict[str, Any]) -> None:
    lora = save_random_lora(tmp_path / "lora.safetensors")
    tensors = load_file(str(lora))
    key = sorted(tensors)[0]
    tensors[key][0] = float("nan")
    save_file(tensors, str(lora), metadata={"format": "pt"})
    with pytest.raises(EvaluationError, match=rf"^model 'aligned': cannot load LoRA {lora}: .*tensor {key} holds NaN or infinite values"):
        evaluate(config(tmp_path, clip, base_model=str(tiny_pipeline_dir), lora=str(lora)))
    assert not list((tmp_path / "out").rglob("*.png"))


def test_weights_that_render_nan_are_refused_and_nothing_is_cached(tiny_pipeline_dir: Path, tmp_path: Path, clip: dict[str, Any]) -> None:
    broken = tmp_path / "broken"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    with torch.no_grad():
        next(pipe.unet.parameters()).fill_(float("nan"))
    pipe.save_pretrained(broken)
    with pytest.raises(EvaluationError, match=r"render aligned: the render of prompt 'a crimson circle' \(seed \d+\) has non-finite values"):
        evaluate(config(tmp_path, clip, base_model=str(broken)))
    assert not list((tmp_path / "out").rglob("*.png"))


def test_a_damaged_cached_png_is_rendered_again(tiny_pipeline_dir: Path, tmp_path: Path, clip: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    settings = config(tmp_path, clip, base_model=str(tiny_pipeline_dir))
    first = evaluate(settings)
    images = sorted((tmp_path / "out" / "images" / "aligned").rglob("*.png"))
    assert len(images) == 2
    good = images[0].read_bytes()
    images[0].write_bytes(good[: len(good) // 2])  # truncated, as by a full disk or a copy cut short
    with pytest.raises(EvaluationError, match=rf"^cannot read image {images[0]} \(.*\); replace or delete it"):
        open_rgb(images[0])
    capsys.readouterr()
    again = evaluate(settings)
    printed = capsys.readouterr()
    assert f"aligned: 1 cached image(s) unreadable (first: {images[0]}), rendering them again" in printed.out + printed.err
    assert images[0].read_bytes() == good, "rendered again, byte for byte"
    assert again["results"] == first["results"]
    assert np.asarray(open_rgb(images[0])).std() > 0
