"""P4D and UnlearnDiffAtk against the ToyWorld pipeline with a perturbed LoRA, so aligned and unaligned differ."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from safetydpo.attacks import Attack, AttackError, AttackOutcome, AttackTarget, build_attack
from safetydpo.models.components import DiffusionComponents, freeze, load_components
from safetydpo.models.lora import LoraSettings, attach_lora

PIPELINE = str(Path(__file__).resolve().parents[1] / "safetydpo" / "toyworld" / "assets" / "pipeline")
PROMPT = "a striped red triangle on a black background"
#: CPU-sized budget for the tests: enough steps to see the objective move, a short reference render.
FAST = {"iterations": 8, "render_steps": 4, "timesteps": 2}


def perturbed_lora(components: DiffusionComponents, seed: int = 0) -> DiffusionComponents:
    """A LoRA whose up-projections are random (peft starts them at zero, which would leave the model unchanged)."""
    attach_lora(components.unet, LoraSettings(rank=4))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, weight in components.unet.named_parameters():
            if "lora_B" in name:
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.05)
    freeze(components.unet, components.text_encoder, components.vae)
    return components


@pytest.fixture(scope="module")
def aligned() -> AttackTarget:
    return AttackTarget("toy+lora", perturbed_lora(load_components(PIPELINE)), has_reference=True, device=torch.device("cpu"))


def attack(spec: Attack, target: AttackTarget, prompt: str = PROMPT) -> AttackOutcome:
    return spec.attack(prompt, target, torch.Generator().manual_seed(spec.budget()["seed"]))


def assert_improves(outcome: AttackOutcome) -> None:
    """The search lowered the objective from its random start, and the returned text replays its best tokens exactly."""
    assert not outcome.higher_is_better and len(outcome.history) == FAST["iterations"] + 1
    assert all(math.isfinite(value) and value > 0 for value in outcome.history)
    assert outcome.objective == min(outcome.history) < outcome.history[0]


@pytest.mark.parametrize("name", ["p4d", "unlearndiffatk"])
def test_objective_falls_and_a_seeded_rerun_finds_the_same_prompt(aligned: AttackTarget, name: str) -> None:
    spec = build_attack(name, **FAST)
    first, again = attack(spec, aligned), attack(spec, aligned)
    assert_improves(first)
    assert again == first  # prompt, objective and every history value, bit for bit
    assert not any(p.grad is not None for module in (aligned.components.unet, aligned.components.text_encoder) for p in module.parameters())
    if name == "unlearndiffatk":
        prefix = first.adversarial_prompt.removesuffix(PROMPT).split()
        assert first.adversarial_prompt.endswith(PROMPT) and len(prefix) == 5


def test_p4d_k_puts_one_token_before_every_k_prompt_words(aligned: AttackTarget) -> None:
    outcome = attack(build_attack("p4d", mode="k", k=3, **FAST), aligned)
    assert_improves(outcome)
    words = outcome.adversarial_prompt.split()
    assert len(words) == 8 + 3 and [w for i, w in enumerate(words) if i % 4] == PROMPT.split()


def test_p4d_refuses_a_model_without_a_lora_and_unlearndiffatk_attacks_it() -> None:
    base = AttackTarget("toy", load_components(PIPELINE), has_reference=False, device=torch.device("cpu"))
    freeze(base.components.unet, base.components.text_encoder, base.components.vae)
    with pytest.raises(AttackError, match=r"attack 'p4d' needs the model's reference_unet, which model 'toy'") as err:
        attack(build_attack("p4d"), base)
    assert "\n" not in str(err.value)
    outcome = attack(build_attack("unlearndiffatk", iterations=1, render_steps=1, timesteps=1), base)
    assert len(outcome.history) == 2 and outcome.adversarial_prompt.endswith(PROMPT)
    other = AttackTarget("transformer", dataclasses.replace(base.components, unet=torch.nn.Linear(1, 1)), False, base.device)
    with pytest.raises(AttackError, match=r"attack 'unlearndiffatk' differentiates through an SD 1.x/2.x model .* 'transformer' \(Linear\)"):
        attack(build_attack("unlearndiffatk"), other)


@pytest.mark.parametrize(
    "name, option, value, need",
    [
        ("p4d", "iterations", 0, "must be positive"), ("p4d", "tokens", 0, "must be positive"), ("p4d", "k", 0, "must be positive"),
        ("unlearndiffatk", "restarts", 0, "must be positive"), ("unlearndiffatk", "timesteps", 0, "must be positive"),
        ("unlearndiffatk", "lr", float("nan"), "must be positive"), ("p4d", "weight_decay", -0.1, "must be >= 0"),
    ],
)
def test_a_budget_of_zero_is_one_line_naming_the_option(name: str, option: str, value: float, need: str) -> None:
    with pytest.raises(AttackError, match=rf"attack '{name}': {option} {need}, got {value}; see docs/attacks.md") as err:
        build_attack(name, **{option: value})
    assert "\n" not in str(err.value)


def test_an_adversarial_prompt_longer_than_the_context_is_one_line(aligned: AttackTarget) -> None:
    with pytest.raises(AttackError, match=r"attack 'p4d': the adversarial prompt needs 19 tokens, more than the 18 .*; lower tokens"):
        attack(build_attack("p4d", tokens=19), aligned)
    with pytest.raises(AttackError, match=r"attack 'unlearndiffatk': the adversarial prompt needs 22 tokens"):
        attack(build_attack("unlearndiffatk", tokens=14), aligned)
    with pytest.raises(AttackError, match=r"attack 'p4d': mode must be one of n, k"):
        build_attack("p4d", mode="x")


@pytest.mark.gpu
def test_one_p4d_step_on_an_sd15_unet_on_cuda() -> None:
    """SD 1.5's UNet (diffusers' defaults are its blocks; 768-wide cross-attention) and text encoder, random weights, fp16."""
    toy = load_components(PIPELINE)
    torch.manual_seed(0)
    text_config = CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu",
    )
    components = DiffusionComponents(
        unet=UNet2DConditionModel(sample_size=64, cross_attention_dim=768),
        vae=toy.vae,
        text_encoder=CLIPTextModel(text_config),
        tokenizer=CLIPTokenizer.from_pretrained(PIPELINE, subfolder="tokenizer", model_max_length=77),
        noise_scheduler=toy.noise_scheduler,
    )
    perturbed_lora(components).cast(torch.float16)
    device = torch.device("cuda")
    for module in (components.unet, components.vae, components.text_encoder):
        module.to(device)
    target = AttackTarget("sd15-random", components, has_reference=True, device=device)
    outcome = attack(build_attack("p4d", tokens=16, iterations=1, render_steps=1, timesteps=1), target)
    assert len(outcome.history) == 2 and all(math.isfinite(v) for v in outcome.history)
    assert len(outcome.adversarial_prompt.split()) == 16
    assert components.unet.dtype == torch.float16 and all(p.grad is None for p in components.unet.parameters())
