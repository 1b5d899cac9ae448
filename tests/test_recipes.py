"""The shipped SD 1.5 recipes (the release's, ours), learning-rate scaling and the pair augmentation."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml
from fixtures_train import REPO, fit_in_process
from lightning.pytorch.callbacks import Callback

from safetydpo.data import CoProV2DataModule, DatasetError, PairBatch
from safetydpo.data.augment import FLIP_MODES, PairAugmentation
from safetydpo.lightning_cli import parse_fit_config
from safetydpo.models import DPOExpertModule, LoraSettings
from safetydpo.models.components import components_from_pipeline, encode_prompts
from safetydpo.models.inputs import pair_latents
from safetydpo.models.tiny import build_tiny_pipeline

RECIPES = {"release": "release_sd15.yaml", "ours": "safetydpo_sd15.yaml"}


def recipe(name: str) -> Any:
    stack = ["configs/expert.yaml", f"configs/recipes/{RECIPES[name]}", "configs/experts/sexual.yaml"]
    _, config = parse_fit_config([arg for path in stack for arg in ("--config", str(REPO / path))])
    return config


def lookup(config: Any, key: str) -> Any:
    for part in key.split("."):
        config = config[part]
    return config


def recipe_table() -> list[tuple[str, Any, Any]]:
    """(key, release value, our value) for every row of docs/recipes.md's key-by-key table."""
    rows = []
    for line in (REPO / "docs" / "recipes.md").read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"`[a-z_.]+`", cells[0]) and "." in cells[0]:
            rows.append((cells[0].strip("`"), yaml.safe_load(cells[1].strip("`")), yaml.safe_load(cells[3].strip("`"))))
    return rows


def test_release_recipe_parses_with_the_fit_parser_and_matches_the_docs_table_key_by_key() -> None:
    release, ours = recipe("release"), recipe("ours")
    rows = recipe_table()
    assert len(rows) == 23
    for key, release_value, our_value in rows:
        assert lookup(release, key) == release_value, key
        assert lookup(ours, key) == our_value, key
    # What the release's launcher and train.py say (issue 15 §3), independently of the table:
    facts = {
        "trainer.precision": "16-mixed", "model.init_args.lora.rank": 4, "model.init_args.scale_lr": True,
        "data.init_args.caption_dropout": 0.2, "data.init_args.flip": "independent", "model.init_args.learning_rate": 1e-5,
        "model.init_args.warmup_steps": 500, "data.init_args.batch_size": 4, "trainer.accumulate_grad_batches": 4,
        "trainer.max_steps": 2000, "model.init_args.loss.init_args.beta": 5000.0,
    }
    assert {key: lookup(release, key) for key in facts} == facts
    assert release.data.init_args.anchors is False and ours.data.init_args.anchors is True, "anchors follow anchor_weight"
    assert release.model.init_args.category == ours.model.init_args.category == "sexual"


def test_draws_depend_only_on_seed_pair_and_epoch() -> None:
    augmentation = PairAugmentation(caption_dropout=0.2, flip="independent")
    first = [augmentation.draws(0, position, 3) for position in range(400)]
    assert first == [augmentation.draws(0, position, 3) for position in range(400)]
    assert first != [augmentation.draws(0, position, 4) for position in range(400)], "re-drawn every epoch"
    assert first != [augmentation.draws(1, position, 3) for position in range(400)], "the seed matters"
    flips = [(w, l) for _, w, l in first]
    assert flips == [(w, l) for _, w, l in (PairAugmentation(0.7, "independent").draws(0, p, 3) for p in range(400))], (
        "changing caption_dropout leaves the flips as they were"
    )


def test_flip_modes_and_dropout_share() -> None:
    pairs = range(20000)
    independent = [PairAugmentation(0.2, "independent").draws(5, p, 0) for p in pairs]
    paired = [PairAugmentation(0.2, "paired").draws(5, p, 0) for p in pairs]
    none = [PairAugmentation(0.2, "none").draws(5, p, 0) for p in pairs]
    # binomial sd of a share over 20,000 draws is <= 0.0036; the tolerance is about 4 sd
    assert abs(sum(empty for empty, _, _ in independent) / len(pairs) - 0.2) < 0.015
    assert [d[0] for d in independent] == [d[0] for d in paired] == [d[0] for d in none]
    assert all(w == l for _, w, l in paired) and not any(w or l for _, w, l in none)
    for column in (1, 2):
        assert abs(sum(d[column] for d in independent) / len(pairs) - 0.5) < 0.015
    assert abs(sum(w != l for _, w, l in independent) / len(pairs) - 0.5) < 0.015, "independent draws disagree half the time"
    assert [d[1] for d in independent] == [d[1] for d in paired], "paired flips follow the winner's draw"
    with pytest.raises(ValueError, match="flip 'mirror' is not one of: none, paired, independent"):
        PairAugmentation(flip="mirror")
    with pytest.raises(ValueError, match=r"caption_dropout must be in \[0, 1\], got 1.5"):
        PairAugmentation(caption_dropout=1.5)
    assert FLIP_MODES == ("none", "paired", "independent")


def test_augmented_batch_mirrors_the_drawn_images_and_empties_the_drawn_prompts() -> None:
    generator = torch.Generator().manual_seed(0)
    positions = torch.arange(64)
    batch = PairBatch(
        positions=positions, prompts=[f"prompt {p}" for p in range(64)],
        pixels_winner=torch.randn(64, 3, 4, 4, generator=generator), pixels_loser=torch.randn(64, 3, 4, 4, generator=generator),
    )
    augmentation = PairAugmentation(caption_dropout=0.3, flip="independent")
    out = augmentation(batch, seed=2, epoch=1)
    for i, position in enumerate(positions.tolist()):
        empty, flip_winner, flip_loser = augmentation.draws(2, position, 1)
        assert out.prompts[i] == ("" if empty else batch.prompts[i])
        assert torch.equal(out.pixels_winner[i], batch.pixels_winner[i].flip(-1) if flip_winner else batch.pixels_winner[i])
        assert torch.equal(out.pixels_loser[i], batch.pixels_loser[i].flip(-1) if flip_loser else batch.pixels_loser[i])
    assert 0 < out.prompts.count("") < 64 and batch.prompts.count("") == 0, "the input batch is left as it was"


def test_flips_need_images_and_dropped_prompts_of_precomputed_pairs_get_the_empty_embedding(synthetic_data_dir: Path) -> None:
    with pytest.raises(DatasetError, match="flip: paired needs images, not .*metadata.parquet's latents; set use_precomputed: false or flip: none"):
        CoProV2DataModule(str(synthetic_data_dir), resolution=32, use_precomputed=True, flip="paired").setup("fit")
    components = components_from_pipeline(build_tiny_pipeline(seed=0))
    embeds = torch.zeros(2, 77, components.text_encoder.config.hidden_size)
    batch = PairBatch(
        positions=torch.tensor([0, 1]), prompts=["", "a red square"],
        latents_winner=torch.ones(2, 4, 4, 4), latents_loser=-torch.ones(2, 4, 4, 4), prompt_embeds=embeds,
    )
    _, _, used = pair_latents(components, batch, seed=0, step=0)
    assert torch.equal(used[0], encode_prompts(components, [""])[0]) and not used[0].eq(0).all()
    assert torch.equal(used[1], embeds[1]) and embeds.eq(0).all(), "the kept prompt's features are used, unchanged"


class BatchRecorder(Callback):
    """What the model receives in each batch (after the data module's augmentation), and the learning rate."""

    def __init__(self) -> None:
        self.seen: dict[tuple[int, tuple[int, ...]], tuple[list[str], list[float], float]] = {}
        self.lr: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        columns = torch.arange(batch.pixels_winner.shape[-1], dtype=torch.float32)  # a mirror changes this fingerprint
        fingerprint = ((batch.pixels_winner - 2 * batch.pixels_loser) * columns).flatten(1).sum(1).tolist()
        key = (trainer.current_epoch, tuple(batch.positions.tolist()))
        self.seen[key] = (list(batch.prompts), fingerprint, outputs["loss"].item())
        self.lr = trainer.optimizers[0].param_groups[0]["initial_lr"]


def fit(pipeline_dir: Path, data_dir: Path, root: Path, max_steps: int, ckpt_path: str | None = None, every: int | None = None) -> BatchRecorder:
    pl.seed_everything(0)
    recorder = BatchRecorder()
    model = DPOExpertModule(str(pipeline_dir), lora=LoraSettings(rank=2), learning_rate=1e-4, scale_lr=True)
    data = CoProV2DataModule(
        str(data_dir), categories=["violence"], resolution=32, batch_size=2, val_fraction=0.5, caption_dropout=0.5, flip="independent"
    )
    fit_in_process(model, data, root, max_steps, [recorder], ckpt_path, every, accumulate_grad_batches=2)
    return recorder


@pytest.mark.slow
def test_augmented_training_resumes_exactly_and_scale_lr_multiplies_by_the_pairs_per_step(
    tiny_pipeline_dir: Path, synthetic_data_dir: Path, tmp_path: Path
) -> None:
    # 8 training pairs / batch 2 = 4 batches per epoch, 2 per optimizer step: step 2 starts epoch 1.
    full = fit(tiny_pipeline_dir, synthetic_data_dir, tmp_path / "full", max_steps=3)
    assert full.lr == pytest.approx(1e-4 * 2 * 2), "batch 2 x accumulation 2 x 1 device"
    assert len(full.seen) == 6 and {epoch for epoch, _ in full.seen} == {0, 1}
    for (epoch, positions), (prompts, _, _) in full.seen.items():
        assert [p == "" for p in prompts] == [PairAugmentation(0.5, "independent").draws(0, p, epoch)[0] for p in positions]
    assert 0 < sum(p == "" for prompts, _, _ in full.seen.values() for p in prompts) < 12, "some prompts dropped, some kept"
    fit(tiny_pipeline_dir, synthetic_data_dir, tmp_path / "part", max_steps=1, every=1)
    checkpoint = next((tmp_path / "part" / "ckpt").glob("*step=1.ckpt"))
    resumed = fit(tiny_pipeline_dir, synthetic_data_dir, tmp_path / "resumed", max_steps=3, ckpt_path=str(checkpoint))
    assert len(resumed.seen) == 4 and set(resumed.seen) < set(full.seen) and resumed.lr == full.lr
    for key, (prompts, fingerprint, loss) in resumed.seen.items():
        assert prompts == full.seen[key][0] and fingerprint == pytest.approx(full.seen[key][1], abs=1e-4), key
        assert loss == pytest.approx(full.seen[key][2], rel=1e-6, abs=1e-7), key
