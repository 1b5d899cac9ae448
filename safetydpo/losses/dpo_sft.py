"""Diffusion-DPO plus a winner-fitting term, after RPO (Pang et al., 2024, arXiv 2404.19733)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from safetydpo.losses.base import LOSSES, DenoisingErrors, LossOutput, PreferenceLoss


@LOSSES.register("dpo_sft")
@dataclass
class DPOSFTLoss(PreferenceLoss):
    """``-log sigmoid(beta/2 * margin) + sft_weight * (e_w - ref_w)``.

    The sigmoid loss alone is satisfied as well by raising the loser's error as by lowering the
    winner's, and at a small ``beta`` it drifts the model off the safe images it should learn
    (ToyWorld measurements in docs/toyworld.md). The second term keeps fitting the winner (safe)
    image under the unsafe prompt; subtracting the reference error only centres it at zero.
    """

    beta: float = 20.0
    sft_weight: float = 10.0

    def __call__(self, errors: DenoisingErrors) -> LossOutput:
        reward_margin = 0.5 * self.beta * errors.margin
        if errors.reference_winner is None:
            raise ValueError("dpo_sft needs reference errors")
        fit_winner = errors.policy_winner - errors.reference_winner
        return LossOutput(loss=(-F.logsigmoid(reward_margin) + self.sft_weight * fit_winner).mean(), reward_margin=reward_margin)
