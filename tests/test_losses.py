"""Each loss against values computed by hand, and the direction its gradient pushes the policy."""

from __future__ import annotations

import math

import pytest
import torch

from safetydpo.losses import LOSSES, DenoisingErrors, build_loss


def errors(pw: float, pl: float, rw: float, rl: float, requires_grad: bool = False) -> DenoisingErrors:
    policy = torch.tensor([[pw], [pl]], requires_grad=requires_grad)
    return DenoisingErrors(policy[0], policy[1], torch.tensor([rw]), torch.tensor([rl])), policy


def test_registry_lists_the_shipped_losses() -> None:
    assert {"diffusion_dpo", "safety_dpo", "ipo", "margin", "dpo_sft"} <= set(LOSSES.names())


def test_unknown_loss_name_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown loss 'dpo_typo'; valid choices: .*diffusion_dpo.*safety_dpo"):
        build_loss("dpo_typo")


def test_diffusion_dpo_value() -> None:
    errs, _ = errors(0.30, 0.50, 0.40, 0.45)
    # margin = (0.40 - 0.45) - (0.30 - 0.50) = 0.15; inside = beta/2 * 0.15 = 0.0075 with beta 0.1
    out = build_loss("diffusion_dpo", beta=0.1)(errs)
    expected = -math.log(1 / (1 + math.exp(-0.0075)))
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.reward_margin.item() == pytest.approx(0.0075, rel=1e-5)
    assert out.implicit_accuracy.item() == 1.0


def test_dpo_at_identity_is_log_two() -> None:
    errs, _ = errors(0.2, 0.3, 0.2, 0.3)
    assert build_loss("diffusion_dpo")(errs).loss.item() == pytest.approx(math.log(2), rel=1e-6)


def test_safety_dpo_is_diffusion_dpo_with_release_beta() -> None:
    errs, _ = errors(0.31, 0.30, 0.30, 0.30)
    safety = build_loss("safety_dpo")
    assert safety.beta == 5000.0
    # margin -0.01 -> inside -25 -> loss = softplus(25)
    assert safety(errs).loss.item() == pytest.approx(math.log1p(math.exp(25.0)), rel=1e-5)


def test_ipo_value() -> None:
    errs, _ = errors(0.30, 0.50, 0.40, 0.45)
    out = build_loss("ipo", beta=10.0, tau=0.5)(errs)
    # h = 10/2 * 0.15 = 0.75; target 1/(2*0.5) = 1 -> (0.75 - 1)^2
    assert out.loss.item() == pytest.approx(0.0625, rel=1e-5)


def test_margin_loss_value_and_no_reference() -> None:
    loss = build_loss("margin", beta=0.5)
    assert loss.uses_reference is False
    errs = DenoisingErrors(torch.tensor([0.2]), torch.tensor([0.6]))
    log_odds = lambda e: -e - math.log(1 - math.exp(-e))  # noqa: E731
    ratio = log_odds(0.2) - log_odds(0.6)
    expected = 0.2 - 0.5 * math.log(1 / (1 + math.exp(-ratio)))
    assert loss(errs).loss.item() == pytest.approx(expected, rel=1e-5)


def test_dpo_sft_adds_the_centred_winner_error() -> None:
    errs, policy = errors(0.30, 0.50, 0.40, 0.45, requires_grad=True)
    out = build_loss("dpo_sft", beta=0.1, sft_weight=2.0)(errs)
    # DPO part as in test_diffusion_dpo_value; winner term 2 * (0.30 - 0.40) = -0.2
    assert out.loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.0075))) - 0.2, rel=1e-5)
    out.loss.backward()
    dpo_grad = -0.05 * (1 - 1 / (1 + math.exp(-0.0075)))  # d/d e_w of -log sigmoid(beta/2 * margin)
    assert policy.grad[0].item() == pytest.approx(-dpo_grad + 2.0, rel=1e-5)
    assert policy.grad[1].item() == pytest.approx(dpo_grad, rel=1e-5)


@pytest.mark.parametrize("name", ["diffusion_dpo", "safety_dpo", "ipo", "margin", "dpo_sft"])
def test_gradient_pushes_policy_toward_winner(name: str) -> None:
    """Descending the loss lowers the winner's error relative to the loser's."""
    kwargs = {"beta": 1.0} if name != "margin" else {}
    errs, policy = errors(0.5, 0.5, 0.5, 0.5, requires_grad=True)
    build_loss(name, **kwargs)(errs).loss.backward()
    grad_winner, grad_loser = policy.grad[0].item(), policy.grad[1].item()
    assert grad_winner > 0, "a gradient step must decrease the winner's denoising error"
    assert grad_winner > grad_loser, "and decrease it more than the loser's"
    assert grad_loser <= 0, "and never lower the loser's"


def test_reference_losses_refuse_missing_reference() -> None:
    with pytest.raises(ValueError, match="needs reference errors"):
        build_loss("diffusion_dpo")(DenoisingErrors(torch.tensor([0.1]), torch.tensor([0.2])))
