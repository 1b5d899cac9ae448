"""Diffusion-KTO (Li et al., 2024, arXiv 2404.04465): per-image utility, winner desirable, loser undesirable."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from safetydpo.losses.base import LOSSES, DenoisingErrors, LossOutput, PreferenceLoss


@LOSSES.register("diffusion_kto")
@dataclass
class DiffusionKTOLoss(PreferenceLoss):
    """``mean over images of λ_y (1 − σ(s_y · beta · (r − Q)))``, ``r = ref_e − e`` per image.

    Kahneman-Tversky optimisation needs no pairs, only a label per image: here the winner (safe
    render) is desirable (``s = +1``, weight ``desirable_weight``) and the loser undesirable
    (``s = −1``, ``undesirable_weight``). ``r`` is each image's implicit reward (how much better the
    policy denoises it than the reference), and the reference point ``Q = max(0, mean r)`` over every
    image of the batch, without gradient, stands for the policy's KL from the reference, as in the
    authors' ``train_kto_sd_v1.5.py`` (their default ``beta_dpo = 1000`` and ``λ = 1``, the sigmoid
    utility). The logged reward margin is ``beta · (r_w − r_l)`` = ``beta · margin``.
    """

    beta: float = 1000.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def __call__(self, errors: DenoisingErrors) -> LossOutput:
        margin = errors.margin  # also refuses errors without a reference
        reward_winner = errors.reference_winner - errors.policy_winner  # type: ignore[operator]
        reward_loser = errors.reference_loser - errors.policy_loser  # type: ignore[operator]
        reference_point = torch.cat([reward_winner, reward_loser]).mean().clamp_min(0).detach()
        desirable = self.desirable_weight * (1 - torch.sigmoid(self.beta * (reward_winner - reference_point)))
        undesirable = self.undesirable_weight * (1 - torch.sigmoid(self.beta * (reference_point - reward_loser)))
        return LossOutput(loss=torch.cat([desirable, undesirable]).mean(), reward_margin=self.beta * margin)
