"""Diffusion-DPO with Min-SNR-γ timestep weighting (Hang et al., ICCV 2023, arXiv 2303.09556)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from safetydpo.losses.base import LOSSES, DenoisingErrors, LossOutput, PreferenceLoss

#: Min-SNR-γ weight of an error at signal-to-noise ratio ``snr``, per training target (Hang et al., Sec. 3.4).
_WEIGHTS = {
    "epsilon": lambda snr, gamma: torch.clamp(snr, max=gamma) / snr,
    "v_prediction": lambda snr, gamma: torch.clamp(snr, max=gamma) / (snr + 1),
}


@LOSSES.register("min_snr_dpo")
@dataclass
class MinSNRDPOLoss(PreferenceLoss):
    """``-log sigmoid(beta/2 * w(t) * margin)`` with ``w(t) = min(SNR(t), gamma) / SNR(t)`` (``/ (SNR(t) + 1)`` for v-prediction).

    Diffusion-DPO's derivation keeps a timestep weighting ``ω(λ_t)`` that Wallace et al. set
    constant. Min-SNR-γ is the weighting that treats the timesteps as tasks that conflict, and
    caps the share of the nearly clean ones (high SNR), whose errors are small and similar for
    winner and loser; on an epsilon model it down-weights every timestep with SNR above ``gamma``.
    Winner and loser share the timestep, so weighting their errors is weighting the pair's margin.
    ``gamma = 5`` is Hang et al.'s recommended value, as in diffusers' ``--snr_gamma`` examples.
    """

    beta: float = 5000.0
    gamma: float = 5.0

    def __call__(self, errors: DenoisingErrors) -> LossOutput:
        if errors.snr is None:
            raise ValueError("min_snr_dpo needs the pairs' SNR; the trainer passes it (DenoisingErrors.snr)")
        if errors.prediction_type not in _WEIGHTS:
            raise ValueError(
                f"min_snr_dpo weights {' or '.join(_WEIGHTS)} errors, not {errors.prediction_type}; use diffusion_dpo for this model"
            )
        weight = _WEIGHTS[errors.prediction_type](errors.snr.float(), self.gamma)
        reward_margin = 0.5 * self.beta * weight * errors.margin
        return LossOutput(loss=-F.logsigmoid(reward_margin).mean(), reward_margin=reward_margin)
