"""The interface every preference loss implements."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from safetydpo.registry import Registry


@dataclass(frozen=True)
class DenoisingErrors:
    """Per-pair denoising errors (mean squared error of the noise prediction), shape ``(batch,)``.

    Diffusion-DPO approximates each image's log-likelihood by its negative denoising error at a
    shared noise and timestep, so every preference loss is a function of these vectors. The
    reference errors are ``None`` for losses that declare ``uses_reference = False``.
    ``anchor_drift`` (per anchor, when the batch has anchors) is the mean squared difference between
    policy and reference predictions on safe anchor prompts; losses ignore it, the trainer adds it.
    """

    policy_winner: Tensor
    policy_loser: Tensor
    reference_winner: Tensor | None = None
    reference_loser: Tensor | None = None
    anchor_drift: Tensor | None = None

    @property
    def margin(self) -> Tensor:
        """How much more the policy prefers the winner than the reference does (positive = aligned)."""
        if self.reference_winner is None or self.reference_loser is None:
            raise ValueError("this loss needs reference errors; the loss class must keep uses_reference = True")
        return (self.reference_winner - self.reference_loser) - (self.policy_winner - self.policy_loser)


@dataclass(frozen=True)
class LossOutput:
    """The scalar to optimise plus the per-pair implicit reward margin that is logged."""

    loss: Tensor
    reward_margin: Tensor

    @property
    def implicit_accuracy(self) -> Tensor:
        """Share of pairs where the policy prefers the winner more than the reference does."""
        return (self.reward_margin > 0).float().mean()


class PreferenceLoss(ABC):
    """A preference objective over denoising errors; subclasses are dataclasses registered in LOSSES."""

    registry_name: ClassVar[str]
    uses_reference: ClassVar[bool] = True

    @abstractmethod
    def __call__(self, errors: DenoisingErrors) -> LossOutput:
        """Return the batch-mean loss and the per-pair reward margin."""

    def spec(self) -> dict[str, Any]:
        """A YAML/JSON-ready description (name plus arguments) for model cards and hparams."""
        return {"name": self.registry_name, **dataclasses.asdict(self)}  # type: ignore[call-overload]


LOSSES: Registry[PreferenceLoss] = Registry("loss")


def build_loss(spec: str | PreferenceLoss, **kwargs: Any) -> PreferenceLoss:
    """Resolve a loss given by registry name (with keyword arguments) or as a ready instance."""
    return LOSSES.build(spec, **kwargs)


def check_finite(loss: Tensor, step: int) -> Tensor:
    """Fail loudly, naming the step, before a NaN/inf loss reaches the LoRA weights.

    Raised before the step's optimizer update, so the last checkpoint written holds good weights.
    """
    if not torch.isfinite(loss).all():
        raise FloatingPointError(
            f"preference loss is not finite at step {step} ({loss.item()}); no update was applied, so "
            "checkpoints written so far hold good weights; lower the learning rate or beta"
        )
    return loss
