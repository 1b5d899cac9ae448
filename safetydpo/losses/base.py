"""The interface every loss term implements, and the training objective: a weighted sum of terms."""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

import torch
from torch import Tensor

from safetydpo.registry import Registry


@dataclass(frozen=True)
class DenoisingErrors:
    """Per-pair denoising errors (mean squared error of the noise prediction), shape ``(batch,)``.

    Diffusion-DPO approximates each image's log-likelihood by its negative denoising error at a
    shared noise and timestep, so every preference loss is a function of these vectors. The
    reference errors are ``None`` when no term declares ``uses_reference = True``.
    ``anchor_drift`` (per anchor, when a term declares ``uses_anchors = True``) is the mean squared
    difference between policy and reference predictions on safe anchor prompts (the ``anchor`` term).

    The rest describe where on the noise schedule each pair was scored, so a term can weight pairs
    by timestep without touching the trainer: ``timesteps`` (shared by winner and loser), their
    signal-to-noise ratio ``snr`` (``alpha_bar / (1 - alpha_bar)``; ``((1 - sigma) / sigma)^2`` for
    flow matching), ``sigmas`` (flow-matching models only) and ``prediction_type``, what the errors
    are errors of: ``epsilon``, ``v_prediction`` or ``flow_matching`` (the velocity ``noise - x0``).
    """

    policy_winner: Tensor
    policy_loser: Tensor
    reference_winner: Tensor | None = None
    reference_loser: Tensor | None = None
    anchor_drift: Tensor | None = None
    timesteps: Tensor | None = None
    snr: Tensor | None = None
    sigmas: Tensor | None = None
    prediction_type: str = "epsilon"

    @property
    def margin(self) -> Tensor:
        """How much more the policy prefers the winner than the reference does (positive = aligned)."""
        if self.reference_winner is None or self.reference_loser is None:
            raise ValueError("this loss needs reference errors; the loss class must keep uses_reference = True")
        return (self.reference_winner - self.reference_loser) - (self.policy_winner - self.policy_loser)


@dataclass(frozen=True)
class LossOutput:
    """The scalar to optimise plus the per-pair implicit reward margin that is logged.

    ``reward_margin`` is ``None`` only for a term that does not score pairs (``scores_pairs = False``,
    the anchor term); ``terms`` is the objective's weighted value of each term, which sum to ``loss``.
    """

    loss: Tensor
    reward_margin: Tensor | None
    terms: dict[str, Tensor] = field(default_factory=dict)

    @property
    def implicit_accuracy(self) -> Tensor:
        """Share of pairs where the policy prefers the winner more than the reference does."""
        if self.reward_margin is None:
            raise ValueError("this output has no reward margin: it comes from a term that does not score pairs")
        return (self.reward_margin > 0).float().mean()


class PreferenceLoss(ABC):
    """A loss term over denoising errors; subclasses are dataclasses registered in LOSSES.

    The class variables tell the trainer what to compute: ``uses_reference`` the reference
    network's errors on the pairs, ``uses_anchors`` the drift on anchors (and makes ``safetydpo
    fit`` serve them), ``scores_pairs`` whether the term yields the reward margin that is logged.
    """

    registry_name: ClassVar[str]
    uses_reference: ClassVar[bool] = True
    uses_anchors: ClassVar[bool] = False
    scores_pairs: ClassVar[bool] = True

    @abstractmethod
    def __call__(self, errors: DenoisingErrors) -> LossOutput:
        """Return the batch-mean loss and the per-pair reward margin."""

    def spec(self) -> dict[str, Any]:
        """A YAML/JSON-ready description (name plus arguments) for model cards and hparams."""
        return {"name": self.registry_name, **dataclasses.asdict(self)}  # type: ignore[call-overload]


LOSSES: Registry[PreferenceLoss] = Registry("loss")


#: One loss term as configs give it: a name, ``{name: ..., **args}``, ``{class_path: ..., init_args: {...}}`` or an instance.
TermSpec = Union[str, Mapping[str, Any], PreferenceLoss]
#: The ``loss`` argument: one term, or a list of terms each with an optional ``weight`` (default 1).
LossSpec = Union[TermSpec, Sequence[TermSpec]]


def build_loss(spec: TermSpec, **kwargs: Any) -> PreferenceLoss:
    """Resolve one loss term given by registry name (with keyword arguments), spec mapping or as a ready instance."""
    return LOSSES.build(spec, **kwargs)


@dataclass(frozen=True)
class WeightedTerm:
    """One term of a :class:`WeightedLoss`: ``weight * loss(errors)``, logged under ``key``."""

    key: str
    weight: float
    loss: PreferenceLoss


class WeightedLoss:
    """The training objective: a weighted sum of loss terms, e.g. Diffusion-DPO plus the anchor term.

    A list in YAML (``[{name: diffusion_dpo, beta: 5000}, {name: anchor, weight: 100}]``) makes one
    term per entry; a single loss is the one-term sum, so every config takes the same path. The
    logged reward margin (and implicit accuracy) is that of the first term that scores pairs.
    """

    def __init__(self, terms: Sequence[WeightedTerm]) -> None:
        if not any(term.loss.scores_pairs for term in terms):
            names = ", ".join(term.loss.registry_name for term in terms) or "none"
            scoring = ", ".join(name for name, cls in LOSSES.classes().items() if cls.scores_pairs)
            raise ValueError(
                f"loss has no term that scores pairs (terms: {names}); add one of {scoring}, "
                "e.g. loss: [{name: diffusion_dpo}, {name: anchor, weight: 100}]"
            )
        self.terms = tuple(terms)

    @property
    def uses_reference(self) -> bool:
        """Whether any term needs the reference network's errors on the pairs."""
        return any(term.loss.uses_reference for term in self.terms)

    @property
    def uses_anchors(self) -> bool:
        """Whether any term needs the anchors' drift (so batches must carry anchors)."""
        return any(term.loss.uses_anchors for term in self.terms)

    def __call__(self, errors: DenoisingErrors) -> LossOutput:
        outputs = [term.loss(errors) for term in self.terms]
        weighted = {term.key: term.weight * output.loss for term, output in zip(self.terms, outputs)}
        margin = next(output.reward_margin for output in outputs if output.reward_margin is not None)
        return LossOutput(loss=sum(weighted.values()), reward_margin=margin, terms=weighted)  # type: ignore[arg-type]

    def spec(self) -> dict[str, Any] | list[dict[str, Any]]:
        """For model cards: a one-term loss's own spec, else one ``{name, weight, **args}`` entry per term."""
        if len(self.terms) == 1 and self.terms[0].weight == 1.0:
            return self.terms[0].loss.spec()
        return [{"name": term.loss.registry_name, "weight": term.weight, **dataclasses.asdict(term.loss)} for term in self.terms]  # type: ignore[call-overload]


def _term(entry: TermSpec, position: int) -> tuple[float, PreferenceLoss]:
    """One list entry's weight and built term; a bad entry is an error naming its position (1-based)."""
    where = f"loss term {position}"
    if not isinstance(entry, (str, Mapping, PreferenceLoss)):
        raise ValueError(f"{where}: expected a loss name or {{name: NAME, weight: W, ...arguments}}, got {entry!r}")
    weight: Any = 1.0
    if isinstance(entry, Mapping):
        entry = dict(entry)
        weight = entry.pop("weight", 1.0)
        where += f" ({entry.get('name', entry.get('class_path', '?'))})"
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (math.isfinite(weight) and weight > 0):
        raise ValueError(f"{where}: weight must be a finite number > 0 (drop the term to turn it off), got {weight!r}")
    # Not chained: the trainer reports an error's innermost cause, and this message includes it with the term's position.
    try:
        return float(weight), build_loss(entry)
    except TypeError as err:  # an unknown argument: the registry names the class's own; weight is the list's
        raise TypeError(f"{where}: {err} (every term also takes weight)") from None
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def build_objective(spec: LossSpec, anchor_weight: float = 0.0) -> WeightedLoss:
    """The training objective for a ``loss`` argument; ``anchor_weight > 0`` appends ``{name: anchor, weight: anchor_weight}``.

    ``anchor_weight`` is the older spelling of the anchor term, kept so existing configs train
    exactly as before; a config that also lists an anchor term is refused (two weights for one term).
    """
    if isinstance(spec, (str, Mapping, PreferenceLoss)):
        terms = [(1.0, build_loss(spec))]
    else:
        if not spec:
            raise ValueError("loss is an empty list; give at least one term, e.g. loss: [{name: diffusion_dpo}]")
        terms = [_term(entry, position) for position, entry in enumerate(spec, start=1)]
    if anchor_weight > 0:
        if any(term.uses_anchors for _, term in terms):
            raise ValueError(
                f"anchor_weight {anchor_weight} and an anchor term in loss both set the anchor term's weight; "
                "keep one (anchor_weight: 0, or drop the term from loss)"
            )
        terms.append((float(anchor_weight), LOSSES.build("anchor")))
    names = [term.registry_name for _, term in terms]
    keys = [name if names.count(name) == 1 else f"{name}_{position}" for position, name in enumerate(names, start=1)]
    return WeightedLoss([WeightedTerm(key, weight, term) for key, (weight, term) in zip(keys, terms)])


def needs_anchors(spec: LossSpec, anchor_weight: float = 0.0) -> bool:
    """Whether the objective of ``spec`` needs anchors; config links ask this before any module exists.

    A spec that does not build answers ``False``: the module's own build reports it, naming the
    valid choices, where the trainer turns it into one line.
    """
    try:
        return build_objective(spec, anchor_weight).uses_anchors
    except (ValueError, TypeError):
        return anchor_weight > 0


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
