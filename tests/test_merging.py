"""Co-Merge and the baselines: exact selection, activation arithmetic, diffusers loading, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from fixtures_lora import random_layers, write_peft

from safetydpo.merging import MERGES
from safetydpo.merging.activations import _InputProbe, _LayerProbe, collect_activations, collect_input_magnitudes
from safetydpo.lora_files import LoraExpert, LoraFactors, LoraFileError, card_path, load_lora, save_lora
from safetydpo.merging.experts import ExpertMismatchError, check_compatible, merge_base_model
from safetydpo.merging.files import merge_expert_files
from safetydpo.models import DPOExpertModule, LoraSettings

BIN = Path(sys.executable).parent


def write_expert(pipeline_dir: Path, path: Path, seed: int, rank: int = 4, category: str = "violence", scale_rows: list[float] | None = None) -> Path:
    """A real DPOExpertModule with random LoRA factors; ``scale_rows`` scales each rank direction of lora_A."""
    module = DPOExpertModule(str(pipeline_dir), lora=LoraSettings(rank=rank))
    generator = torch.Generator().manual_seed(seed)
    for name, param in module.unet.named_parameters():
        if "lora_" in name:
            value = torch.randn(param.shape, generator=generator) * 0.1
            if "lora_A" in name and scale_rows is not None:
                value *= torch.tensor(scale_rows)[:, None]
            param.data = value
    card = {"category": category, "base_model": str(pipeline_dir), "concepts": [f"c{seed}"]}
    return save_lora(path, module.lora_weights(), module.unet.peft_config["default"], card)


def unet_inputs(batches: int = 2) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([100, 700]), torch.randn(2, 77, 32, generator=generator))
        for _ in range(batches)
    ]


def test_layer_probe_matches_hand_computed_activity() -> None:
    layer = torch.nn.Linear(3, 2, bias=False)
    down_a, up_a = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]), torch.tensor([[3.0, 0.0], [4.0, 1.0]])
    down_b, up_b = torch.tensor([[0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    experts = [LoraExpert(Path(f"{n}.safetensors"), {"l": LoraFactors(d, u)}) for n, d, u in (("a", down_a, up_a), ("b", down_b, up_b))]
    probe = _LayerProbe(layer, experts, "l")
    layer(torch.tensor([[1.0, -1.0, 2.0], [-3.0, 0.5, 0.0]]))
    probe.handle.remove()
    # expert a: |A x| = [[1, 2], [3, 1]] -> mean [2, 1.5]; column norms of B: [5, 1]
    # expert b: |A x| = [[2, 0], [0, 2.5]] -> mean [1, 1.25]; column norms of B: [1, 0]
    assert torch.allclose(probe.mean(), torch.tensor([[10.0, 1.5], [1.0, 0.0]]))


def test_comerge_of_one_expert_keeps_its_update(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    expert = load_lora(write_expert(tiny_pipeline_dir, tmp_path / "a.safetensors", seed=1))
    comerge = MERGES.build("comerge")
    prepared = comerge.prepare([expert])
    unet = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir).unet
    merged = comerge.merge(prepared, collect_activations(unet, prepared, unet_inputs()))
    for name, factors in expert.layers.items():
        assert torch.allclose(merged.layers[name].delta(), factors.delta(), atol=1e-6)
    assert merged.info["contribution_share"] == {"a": 1.0}


def test_comerge_keeps_the_most_active_principal_directions(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    # Each expert has two strong and two near-zero raw directions, so two strong principal directions.
    a = load_lora(write_expert(tiny_pipeline_dir, tmp_path / "a.safetensors", seed=1, scale_rows=[20, 0.001, 20, 0.001]))
    b = load_lora(write_expert(tiny_pipeline_dir, tmp_path / "b.safetensors", seed=2, scale_rows=[0.001, 20, 0.001, 20]))
    comerge = MERGES.build("comerge")
    prepared = comerge.prepare([a, b])
    unet = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir).unet
    stats = collect_activations(unet, prepared, unet_inputs())
    merged = comerge.merge(prepared, stats)
    for name in a.layers:
        for raw, principal in zip((a, b), prepared):
            assert torch.allclose(principal.layers[name].delta(), raw.layers[name].delta(), atol=1e-6), "same update"
            norms = principal.layers[name].up.flatten(1).norm(dim=0)
            assert torch.all(norms[:-1] >= norms[1:]), "principal directions come strongest first"
        strong = [(expert, k) for expert in prepared for k in (0, 1)]
        assert stats.scores[name][:, :2].min() > stats.scores[name][:, 2:].max(), (name, stats.scores[name])
        merged_layer = merged.layers[name]
        for direction in range(4):
            sources = [(e, k) for e, k in strong if torch.equal(merged_layer.down[direction], e.layers[name].down[k])]
            assert len(sources) == 1, "each merged direction is copied from exactly one expert direction"
            expert, k = sources[0]
            assert torch.equal(merged_layer.up[:, direction], expert.layers[name].up[:, k])
        total = a.layers[name].delta() + b.layers[name].delta()
        assert (merged_layer.delta() - total).norm() < 1e-3 * total.norm(), "only the near-zero directions are dropped"
    assert merged.info["contribution_share"] == {"a": 0.5, "b": 0.5}


def test_comerge_rank_sets_the_merged_size(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    a = load_lora(write_expert(tiny_pipeline_dir, tmp_path / "a.safetensors", seed=1))
    b = load_lora(write_expert(tiny_pipeline_dir, tmp_path / "b.safetensors", seed=2))
    unet = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir).unet
    for rank in (2, 8):
        comerge = MERGES.build("comerge", rank=rank)
        prepared = comerge.prepare([a, b])
        merged = comerge.merge(prepared, collect_activations(unet, prepared, unet_inputs()))
        for name in a.layers:
            assert merged.layers[name].rank == rank
            if rank == 8:  # every direction of both experts: their sum
                assert torch.allclose(merged.layers[name].delta(), a.layers[name].delta() + b.layers[name].delta(), atol=1e-5)
    with pytest.raises(ValueError, match="comerge rank must be an integer >= 1, got 0"):
        MERGES.build("comerge", rank=0).merge(prepared, collect_activations(unet, prepared, unet_inputs(1)))


def test_baselines_on_two_experts(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    a = load_lora(write_expert(tiny_pipeline_dir, tmp_path / "a.safetensors", seed=1))
    b = load_lora(write_expert(tiny_pipeline_dir, tmp_path / "b.safetensors", seed=2))
    name = next(iter(a.layers))
    total = a.layers[name].delta() + b.layers[name].delta()
    cat = MERGES.build("cat").merge([a, b], None).layers[name]
    assert cat.rank == 8 and torch.allclose(cat.delta(), total, atol=1e-6)
    svd = MERGES.build("svd", rank=8).merge([a, b], None).layers[name]
    assert torch.allclose(svd.delta(), total, atol=1e-5), "full-rank SVD re-factorisation is exact"
    linear = MERGES.build("linear").merge([a, b], None).layers[name]
    assert torch.allclose(linear.down, (a.layers[name].down + b.layers[name].down) / 2**0.5), "peft: sqrt(w) on each factor"
    ties = MERGES.build("ties", density=1.0).merge([a, b], None).layers[name]
    assert ties.rank == 4
    dare_once = MERGES.build("dare", density=0.5, seed=3).merge([a, b], None).layers[name]
    dare_again = MERGES.build("dare", density=0.5, seed=3).merge([a, b], None).layers[name]
    assert torch.equal(dare_once.down, dare_again.down), "DARE is reproducible for a seed"


def test_mismatched_experts_are_named(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    a = load_lora(write_expert(tiny_pipeline_dir, tmp_path / "a.safetensors", seed=1, rank=4))
    b = load_lora(write_expert(tiny_pipeline_dir, tmp_path / "b.safetensors", seed=2, rank=2))
    check_compatible([a, b])  # every method but comerge combines different ranks
    with pytest.raises(ExpertMismatchError, match=r"b.safetensors layer .* has rank 2, .*a.safetensors rank 4; Co-Merge needs equal ranks"):
        check_compatible([a, b], equal_ranks=True)
    c = load_lora(write_expert(tiny_pipeline_dir, tmp_path / "c.safetensors", seed=3, rank=4))
    c.card["base_model"] = "other/model"
    with pytest.raises(ExpertMismatchError, match=r"c.safetensors was trained on base model other/model"):
        merge_base_model([a, c], None)
    with pytest.raises(ExpertMismatchError, match=r"base model other/model is not the one the experts were trained on"):
        merge_base_model([a], "other/model")
    assert merge_base_model([a], str(tiny_pipeline_dir)) == str(tiny_pipeline_dir)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(LoraFileError, match="junk.safetensors is not a readable safetensors LoRA file"):
        load_lora(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="LoRA file .*missing.safetensors not found"):
        load_lora(tmp_path / "missing.safetensors")


def test_cards_from_a_newer_format_or_broken_are_named(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    path = write_expert(tiny_pipeline_dir, tmp_path / "a.safetensors", seed=1)
    card_path(path).write_text(json.dumps({"format": "safetydpo.expert/9"}))
    with pytest.raises(LoraFileError, match=r"a.json has format 'safetydpo.expert/9'.*upgrade safetydpo"):
        load_lora(path)
    card_path(path).write_text("{not json")
    with pytest.raises(LoraFileError, match=r"a.json is not readable JSON"):
        load_lora(path)
    card_path(path).unlink()
    assert load_lora(path).card == {}, "a LoRA written by another tool has no card"


def test_a_training_unet_with_its_adapter_disabled_scores_like_the_base(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    """CoMergeCallback scores the running module's UNet (adapter off); it must equal a fresh base UNet."""
    a = load_lora(write_expert(tiny_pipeline_dir, tmp_path / "a.safetensors", seed=1))
    b = load_lora(write_expert(tiny_pipeline_dir, tmp_path / "b.safetensors", seed=2))
    base = collect_activations(StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir).unet, [a, b], unet_inputs())
    training = DPOExpertModule(str(tiny_pipeline_dir), lora=LoraSettings(rank=4))
    for name, param in training.unet.named_parameters():
        if "lora_B" in name:
            param.data.normal_()  # an adapter that would change every layer input if it were on
    training.unet.disable_adapters()
    adapted = collect_activations(training.unet, [a, b], unet_inputs())
    assert base.scores.keys() == adapted.scores.keys()
    for name in base.scores:
        torch.testing.assert_close(adapted.scores[name], base.scores[name], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_merge_command_writes_a_loadable_lora(tiny_pipeline_dir: Path, synthetic_data_dir: Path, tmp_path: Path) -> None:
    a = write_expert(tiny_pipeline_dir, tmp_path / "violence.safetensors", seed=1, category="violence")
    b = write_expert(tiny_pipeline_dir, tmp_path / "sexual.safetensors", seed=2, category="sexual")
    out = tmp_path / "merged.safetensors"
    command = [str(BIN / "safetydpo"), "merge", "--experts", str(a), str(b), "--out", str(out), "--data",
               str(synthetic_data_dir), "--resolution", "32", "--num-batches", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["method"] == "comerge" and card["categories"] == ["sexual", "violence"]
    assert card["activation_inputs"] == 2 * 2 * 4
    assert sum(card["contribution_share"].values()) == pytest.approx(1.0)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    merged = load_lora(out)
    pipe.load_lora_weights(str(out))
    name = next(iter(merged.layers))
    lora_layer = pipe.unet.get_submodule(name)
    adapter = lora_layer.active_adapters[0]
    assert torch.allclose(lora_layer.lora_A[adapter].weight, merged.layers[name].down)
    assert torch.allclose(lora_layer.lora_B[adapter].weight * lora_layer.scaling[adapter], merged.layers[name].up)


def test_merge_pipeline_needs_data_for_comerge(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    a = write_expert(tiny_pipeline_dir, tmp_path / "a.safetensors", seed=1)
    with pytest.raises(ValueError, match=r"comerge needs activation statistics: give the base UNet and inputs"):
        merge_expert_files([a], tmp_path / "m.safetensors")
    card = merge_expert_files([a], tmp_path / "m.safetensors", method="cat")
    assert card["method"] == "cat" and (tmp_path / "m.safetensors").is_file()


@pytest.mark.slow
def test_comerge_callback_merges_after_the_last_expert(tiny_pipeline_dir: Path, synthetic_data_dir: Path, tmp_path: Path) -> None:
    import lightning.pytorch as pl

    from safetydpo.callbacks import CoMergeCallback, LoraExport
    from safetydpo.data import CoProV2DataModule

    sexual = write_expert(tiny_pipeline_dir, tmp_path / "sexual.safetensors", seed=2, category="sexual")
    violence = tmp_path / "violence.safetensors"
    merged, never = tmp_path / "merged.safetensors", tmp_path / "never.safetensors"
    callbacks = [
        LoraExport(str(violence)),
        CoMergeCallback([str(sexual), str(violence)], output_path=str(merged), num_batches=1, batch_size=2,
                        method={"class_path": "safetydpo.merging.comerge.CoMerge", "init_args": {"rank": 2}}),
        CoMergeCallback([str(sexual), str(tmp_path / "absent.safetensors")], output_path=str(never)),
    ]
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, callbacks=callbacks, logger=False, enable_progress_bar=False,
                         default_root_dir=tmp_path, num_sanity_val_steps=0, limit_val_batches=0)
    module = DPOExpertModule(str(tiny_pipeline_dir), lora=LoraSettings(rank=4), category="violence")
    trainer.fit(module, datamodule=CoProV2DataModule(str(synthetic_data_dir), categories=["violence"], resolution=32, batch_size=4))
    card = json.loads(merged.with_suffix(".json").read_text())
    assert [e["category"] for e in card["experts"]] == ["sexual", "violence"]
    assert card["activation_inputs"] == 4, "one batch of 2 pairs, winner and loser each"
    assert card["method_args"]["rank"] == 2 and {f.rank for f in load_lora(merged).layers.values()} == {2}
    assert not never.exists(), "no merge while an expert file is missing"


class _TwoLayers(torch.nn.Module):
    """Two identity layers in a row, called like a UNet: an expert's first-layer update changes the second layer's input."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = torch.nn.Linear(2, 2, bias=False), torch.nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.first.weight.copy_(torch.eye(2))
            self.second.weight.copy_(torch.eye(2))

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        return self.second(self.first(latents))


def test_comerge_weight_picks_the_most_active_expert_per_weight_on_its_own_inputs() -> None:
    # a: first update [[2, 0], [0, 0]], second [[0.5, 0], [0, 0]]; b: no first update, second [[0.8, 0], [0, 0.3]].
    a = LoraExpert(Path("a.safetensors"), {"first": LoraFactors(torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0], [0.0]])),
                                           "second": LoraFactors(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5], [0.0]]))})
    b = LoraExpert(Path("b.safetensors"), {"first": LoraFactors(torch.zeros(2, 2), torch.zeros(2, 2)),
                                           "second": LoraFactors(torch.eye(2), torch.tensor([[0.8, 0.0], [0.0, 0.3]]))})
    x = torch.tensor([[1.0, 1.0]])
    stats = collect_input_magnitudes(_TwoLayers(), [a, b], [(x, torch.tensor([0]), torch.zeros(1))])
    assert stats.num_inputs == 1
    torch.testing.assert_close(stats.scores["first"], torch.ones(2, 2))
    # Under a's own model the second layer sees (I + first update) x = [3, 1]; under b's it sees x.
    torch.testing.assert_close(stats.scores["second"], torch.tensor([[3.0, 1.0], [1.0, 1.0]]))
    merged = MERGES.build("comerge_weight").merge([a, b], stats)
    torch.testing.assert_close(merged.layers["first"].delta(), torch.tensor([[2.0, 0.0], [0.0, 0.0]]))
    # Element (0, 0): |0.5| * 3 for a beats |0.8| * 1 for b, although b's weight is larger; (1, 1) only b changes.
    torch.testing.assert_close(merged.layers["second"].delta(), torch.tensor([[0.5, 0.0], [0.0, 0.3]]), atol=1e-6, rtol=0)
    assert merged.info["contribution_share"] == {"a": pytest.approx(2 / 3), "b": pytest.approx(1 / 3)}


def test_comerge_weight_of_one_expert_keeps_its_update_and_is_written(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet")
    path = write_peft(tmp_path / "a.safetensors", random_layers(unet, 2, seed=1), alpha=4)
    other = write_peft(tmp_path / "b.safetensors", random_layers(unet, 4, seed=2), alpha=4)
    expert = load_lora(path)
    merged = MERGES.build("comerge_weight").merge([expert], collect_input_magnitudes(unet, [expert], unet_inputs(1)))
    for name, factors in expert.layers.items():
        torch.testing.assert_close(merged.layers[name].delta(), factors.delta(), atol=1e-6, rtol=1e-5)
    card = merge_expert_files([path, other], tmp_path / "m.safetensors", method={"name": "comerge_weight", "rank": 3},
                              unet=unet, inputs=unet_inputs(1))
    assert card["activation_inputs"] == 2 and sum(card["contribution_share"].values()) == pytest.approx(1.0)
    assert {factors.rank for factors in load_lora(tmp_path / "m.safetensors").layers.values()} == {3}, "ranks 2 and 4 combine"


def test_input_probe_on_a_convolution_adds_the_lora_and_averages_unfolded_inputs() -> None:
    """Conv layers (SD's 1x1 proj_in/proj_out, kxk convs): the hook adds peft's conv LoRA, features follow weight.flatten(1)."""
    conv = torch.nn.Conv2d(2, 3, 3, padding=1, bias=False)
    generator = torch.Generator().manual_seed(0)
    factors = LoraFactors(torch.randn(2, 2, 3, 3, generator=generator), torch.randn(3, 2, 1, 1, generator=generator))
    expert = LoraExpert(Path("a.safetensors"), {"conv": factors})
    x = torch.randn(2, 2, 5, 5, generator=generator)
    probe = _InputProbe(conv, [expert], "conv")
    with torch.no_grad():
        hooked = conv(x)
        expected = torch.nn.functional.conv2d(x, conv.weight + factors.delta().view_as(conv.weight), padding=1)
    probe.handle.remove()
    torch.testing.assert_close(hooked, expected, rtol=1e-5, atol=1e-5)
    unfolded = torch.nn.functional.unfold(x, 3, padding=1)  # (batch, 2*3*3, positions), channel-major like weight.flatten(1)
    torch.testing.assert_close(probe.mean(), unfolded.abs().mean(dim=(0, 2))[None])
