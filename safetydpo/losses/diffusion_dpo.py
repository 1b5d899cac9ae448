"""Diffusion-DPO (Wallace et al., 2023, arXiv 2311.12908), the sigmoid (Bradley-Terry) form."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from safetydpo.losses.base import LOSSES, DenoisingErrors, LossOutput, PreferenceLoss


@LOSSES.register("diffusion_dpo")
@dataclass
class DiffusionDPOLoss(PreferenceLoss):
    """``-log sigmoid(-beta/2 * ((e_w - e_l) - (ref_w - ref_l)))`` averaged over pairs.

    ``beta`` is the KL weight, 5000 for SD 1.5 as in the authors' code. The 1/2 factor is theirs:
    the Salesforce Diffusion-DPO ``train.py`` (and the SafetyDPO release's copy of it) computes
    ``-0.5 * beta_dpo * (model_diff - ref_diff)``. diffusers' research example
    ``train_diffusion_dpo.py`` drops the 1/2 and defaults to ``beta_dpo = 2500``: the same loss.
    """

    beta: float = 5000.0

    def __call__(self, errors: DenoisingErrors) -> LossOutput:
        reward_margin = 0.5 * self.beta * errors.margin
        return LossOutput(loss=-F.logsigmoid(reward_margin).mean(), reward_margin=reward_margin)
