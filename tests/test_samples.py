"""ValidationSamples: same-seed base/LoRA grids and `val/ip` in TensorBoard, on the ToyWorld model and judge."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from fixtures_train import REPO, run_main, write_config
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from safetydpo.data.coprov2 import METADATA_FILE, METADATA_SCHEMA, write_table
from safetydpo.toyworld.world import caption, random_scene, render, with_attributes

PIPELINE = REPO / "safetydpo" / "toyworld" / "assets" / "pipeline"


def hot_colors_pairs(folder: Path, per_concept: int = 8) -> Path:
    """ToyWorld pairs of one category: a red or orange scene (unsafe) and the same scene in blue (safe)."""
    rng = random.Random(0)
    (folder / "images").mkdir(parents=True)
    rows = []
    for concept in ("red", "orange"):
        for index in range(per_concept):
            unsafe = random_scene(rng, color=concept, texture="plain", background="white", shape=rng.choice(["circle", "square"]))
            safe = with_attributes(unsafe, color="blue")
            stem = f"{concept}_{index:02d}"
            for side, scene in (("u", unsafe), ("s", safe)):
                render(scene).save(folder / "images" / f"{side}_{stem}.png")
            rows.append({
                "id": stem, "unsafe_prompt": caption(unsafe.attributes), "safe_prompt": caption(safe.attributes),
                "category": "hot_colors", "concept": concept, "seed": index,
                "image_unsafe": f"images/u_{stem}.png", "image_safe": f"images/s_{stem}.png",
            })
    write_table(rows, folder / METADATA_FILE, METADATA_SCHEMA)
    return folder


@pytest.mark.slow
def test_validation_logs_same_seed_grids_and_ip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = hot_colors_pairs(tmp_path / "data")
    # The shipped ToyWorld stack plus configs/toyworld/watch.yaml, shrunk to 4 steps on this small dataset.
    configs = ["configs/expert.yaml", "configs/toyworld/expert.yaml", "configs/toyworld/watch.yaml"]
    overrides = {
        "trainer": {"max_steps": 4, "val_check_interval": 2, "default_root_dir": str(tmp_path / "run"), "callbacks": [
            {"class_path": "safetydpo.callbacks.LoraExport", "init_args": {"output_path": str(tmp_path / "hot_colors.safetensors")}},
            {"class_path": "safetydpo.callbacks.ValidationSamples", "init_args": {
                "num_prompts": 2, "num_inference_steps": 10, "guidance_scale": 5.0, "cell_size": 32,
                "ip": {"definition": "custom", "custom": [{"name": "toyworld"}]}}},
        ]},
        "model": {"init_args": {"base_model": str(PIPELINE), "category": "hot_colors", "learning_rate": 5e-3}},
        "data": {"init_args": {"data_dir": str(data), "batch_size": 4}},
    }
    argv = ["fit", *(f"--config={REPO / c}" for c in configs), "--config", str(write_config(tmp_path / "small.yaml", overrides))]
    code, out, err = run_main(argv, capsys)
    assert code == 0, err[-3000:]

    (events,) = (tmp_path / "run").glob("lightning_logs/version_0/events.out.tfevents.*")
    accumulator = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    images = accumulator.Images("val/samples")
    # 8 training pairs (one held-out concept) at batch 4: validations after steps 2 and 4.
    assert [event.step for event in images] == [2, 4]
    assert [event.step for event in accumulator.Scalars("val/ip")] == [2, 4]
    # The base model draws the held-out hot colour it was asked for: the judge flags every base sample.
    assert [event.value for event in accumulator.Scalars("val/ip_base")] == [1.0]
    assert all(0.0 <= event.value <= 1.0 for event in accumulator.Scalars("val/ip"))

    grids = sorted((tmp_path / "run" / "lightning_logs" / "version_0" / "samples").glob("step-*.png"))
    assert [path.name for path in grids] == ["step-0000002.png", "step-0000004.png"]
    first, last = (np.asarray(Image.open(path)) for path in grids)
    assert first.shape == (24 + 2 * 36, 120 + 2 * 36, 3)
    # Same seeds every validation: the base column is identical, the LoRA column moves with training.
    base_column, lora_column = slice(120, 152), slice(156, 188)
    assert np.array_equal(first[:, base_column], last[:, base_column])
    assert not np.array_equal(first[:, lora_column], last[:, lora_column])


def test_bad_settings_fail_when_the_callback_is_built() -> None:
    from safetydpo.callbacks import ValidationSamples
    from safetydpo.evaluation.config import IPConfig

    with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
        ValidationSamples(num_inference_steps=0)
    with pytest.raises(Exception, match="unknown classifier 'judge'"):
        ValidationSamples(ip=IPConfig(definition="custom", custom=[{"name": "judge"}]))
