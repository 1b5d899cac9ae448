"""The anchor term: keep the expert's predictions on safe prompts outside its concepts at the base model's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from safetydpo.losses.base import LOSSES, DenoisingErrors, LossOutput, PreferenceLoss


@LOSSES.register("anchor")
@dataclass
class AnchorLoss(PreferenceLoss):
    """``mean ‖ε_policy(x_t, c_anchor) − ε_reference(x_t, c_anchor)‖²`` over the batch's anchors.

    A preference loss only sees the expert's own category, so nothing in it says what must not
    change; this term does (docs/losses.md#anchor-term). It scores no pairs, so it is combined with
    one that does: ``loss: [{name: dpo_sft}, {name: anchor, weight: 100}]``. It needs the reference
    only on the anchors, which the trainer runs in the same forward pass as the pairs.
    """

    uses_reference: ClassVar[bool] = False
    uses_anchors: ClassVar[bool] = True
    scores_pairs: ClassVar[bool] = False

    def __call__(self, errors: DenoisingErrors) -> LossOutput:
        if errors.anchor_drift is None:
            raise ValueError("the anchor term needs anchors in the batches: set data.init_args.anchors: true")
        return LossOutput(loss=errors.anchor_drift.mean(), reward_margin=None)
