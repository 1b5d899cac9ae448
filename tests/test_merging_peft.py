"""Every baseline that claims a peft name equals peft's ``add_weighted_adapter`` on the tiny UNet, number for number."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import UNet2DConditionModel
from fixtures_lora import Layers, random_layers, write_peft
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer

from safetydpo.lora_files import load_lora
from safetydpo.merging import MERGES

#: name -> (rank, alpha). a and c share a rank (peft's linear needs that) but not a scale; b has another rank.
EXPERTS = {"a": (4, 8.0), "b": (2, 3.0), "c": (4, 2.0)}


def peft_model(pipeline_dir: Path, experts: dict[str, Layers]) -> PeftModel:
    """The tiny UNet with each expert as a peft adapter, its config's alpha giving its scale."""
    unet = UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet")
    model = None
    for name, layers in experts.items():
        rank, alpha = EXPERTS[name]
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted(layers))
        if model is None:
            model = get_peft_model(unet, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        result = set_peft_model_state_dict(model, {f"base_model.model.{key}": value for key, value in _peft_state(layers).items()}, adapter_name=name)
        assert not result.unexpected_keys
    return model


def _peft_state(layers: Layers) -> dict[str, torch.Tensor]:
    return {key: value for name, (down, up) in layers.items() for key, value in ((f"{name}.lora_A.weight", down), (f"{name}.lora_B.weight", up))}


def peft_merge(model: PeftModel, names: list[str], weights: list[float], combination: str, seed: int = 0, **kwargs: Any) -> dict[str, torch.Tensor]:
    """peft's merged update per layer (``get_delta_weight`` includes the new adapter's scale)."""
    adapter = f"{combination}_{'_'.join(names)}"
    torch.manual_seed(seed)  # peft's DARE draws from the global generator
    model.add_weighted_adapter(names, weights, adapter, combination_type=combination, **kwargs)
    return {name.removeprefix("base_model.model."): module.get_delta_weight(adapter).detach()
            for name, module in model.named_modules() if isinstance(module, LoraLayer) and adapter in module.lora_A}


def assert_same_updates(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(theirs)
    for name, update in theirs.items():
        assert (ours[name] - update).norm() <= 1e-4 * update.norm() + 1e-7, name


@pytest.fixture(scope="module")
def expert_files(tiny_pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Layers], dict[str, Path]]:
    """The experts' factors and their files (peft layout, alpha in the metadata)."""
    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet")
    folder = tmp_path_factory.mktemp("peft_parity")
    layers = {name: random_layers(unet, rank, seed=seed) for seed, (name, (rank, _)) in enumerate(EXPERTS.items())}
    return layers, {name: write_peft(folder / f"{name}.safetensors", layers[name], alpha=EXPERTS[name][1]) for name in EXPERTS}


def ours(files: dict[str, Path], names: list[str], spec: dict[str, Any]) -> dict[str, torch.Tensor]:
    experts = [load_lora(files[name]) for name in names]
    return {name: factors.delta() for name, factors in MERGES.build(spec).merge(experts, None).layers.items()}


@pytest.fixture(scope="module")
def model(tiny_pipeline_dir: Path, expert_files: tuple) -> PeftModel:
    return peft_model(tiny_pipeline_dir, expert_files[0])


def test_linear_cat_svd_and_ties_equal_peft(model: PeftModel, expert_files: tuple) -> None:
    _, files = expert_files
    # linear: sqrt(w * scale) on each factor, so expert i's own term gets weight w_i; negative weights flip lora_A only.
    linear = ours(files, ["a", "c"], {"name": "linear", "weights": [0.7, -0.4]})
    assert_same_updates(linear, peft_merge(model, ["a", "c"], [0.7, -0.4], "linear"))
    a, c = load_lora(files["a"]), load_lora(files["c"])
    name = next(iter(linear))
    cross = linear[name] - 0.7 * a.layers[name].delta() + 0.4 * c.layers[name].delta()
    assert cross.norm() > 0.1 * linear[name].norm(), "peft's linear has cross terms B_a A_c"
    for names, spec, combination, kwargs in [
        (["a", "b"], {"name": "cat", "weights": [0.7, 1.3]}, "cat", {}),
        (["a", "b"], {"name": "svd", "weights": [0.7, 1.3]}, "svd", {}),  # default rank: the largest expert's, as peft
        (["a", "b", "c"], {"name": "svd", "weights": [1.0, 0.5, 2.0], "rank": 6}, "svd", {"svd_rank": 6}),
        (["a", "b"], {"name": "ties", "weights": [0.7, 1.3], "density": 0.3}, "ties_svd", {"density": 0.3}),
        (["a", "b", "c"], {"name": "ties", "weights": [1.0, 1.0, 1.0], "density": 0.6, "majority_sign_method": "frequency", "rank": 5},
         "ties_svd", {"density": 0.6, "majority_sign_method": "frequency", "svd_rank": 5}),
    ]:
        assert_same_updates(ours(files, names, spec), peft_merge(model, names, spec["weights"], combination, **kwargs))


def test_dare_equals_peft_for_the_same_seed(model: PeftModel, expert_files: tuple) -> None:
    """``add_weighted_adapter`` first initialises the new adapter from torch's global generator, then draws DARE's masks
    from it; so peft's per-layer combination (the function it calls) runs here after the seed, layer by layer in our order."""
    layers, files = expert_files
    weights = [0.8, 1.2]
    for spec, combination in [({"name": "dare", "density": 0.4, "seed": 5}, "dare_linear_svd"),
                              ({"name": "dare", "density": 0.7, "seed": 6, "ties": True}, "dare_ties_svd")]:
        model.add_weighted_adapter(["a", "b"], weights, combination, combination_type=combination, density=spec["density"])
        torch.manual_seed(spec["seed"])
        expected = {}
        for name in sorted(layers["a"]):
            target = model.base_model.model.get_submodule(name)
            down, up = model.base_model._svd_generalized_task_arithmetic_weighted_adapter(
                combination, ["a", "b"], weights, 4, target, target.lora_A[combination].weight, target.lora_B[combination].weight,
                spec["density"], "total",
            )
            expected[name] = up @ down
        merged = ours(files, ["a", "b"], {**spec, "weights": weights})
        assert_same_updates(merged, expected)
        other_seed = ours(files, ["a", "b"], {**spec, "weights": weights, "seed": 99})
        assert (merged[name] - other_seed[name]).norm() > 1e-3 * merged[name].norm(), "the seed draws the masks"
