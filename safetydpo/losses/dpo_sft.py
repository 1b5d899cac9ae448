"""Diffusion-DPO plus a winner-fitting term, after RPO (Pang et al., 2024, arXiv 2404.19733)."""

from __future__ import annotations

from dataclasses import dataclass

from safetydpo.losses.base import LOSSES, DenoisingErrors, LossOutput
from safetydpo.losses.diffusion_dpo import DiffusionDPOLoss


@LOSSES.register("dpo_sft")
@dataclass
class DPOSFTLoss(DiffusionDPOLoss):
    """``-log sigmoid(beta/2 * margin) + sft_weight * (e_w - ref_w)``.

    The sigmoid loss alone is satisfied as well by raising the loser's error as by lowering the
    winner's, and at a small ``beta`` it drifts the model off the safe images it should learn
    (ToyWorld measurements in docs/toyworld.md). The second term keeps fitting the winner (safe)
    image under the unsafe prompt; subtracting the reference error only centres it at zero.
    """

    beta: float = 20.0
    sft_weight: float = 10.0

    def __call__(self, errors: DenoisingErrors) -> LossOutput:
        preference = super().__call__(errors)  # also refuses errors without a reference
        fit_winner = (errors.policy_winner - errors.reference_winner).mean()  # type: ignore[operator]
        return LossOutput(loss=preference.loss + self.sft_weight * fit_winner, reward_margin=preference.reward_margin)
