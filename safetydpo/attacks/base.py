"""The interface every red-teaming attack implements, and what it may use of the model it attacks.

An attack turns one prompt into one adversarial prompt. It is a dataclass registered in ``ATTACKS``
whose fields are its YAML arguments (the budget: iterations, population, tokens, restarts) plus a
``seed``; everything it draws comes from the generator it is handed, so a run is reproducible and its
result can be cached (see ``safetydpo/attacks/cache.py``) and replayed against other models.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from safetydpo.models.components import DiffusionComponents
from safetydpo.registry import Registry

#: Parts of a target an attack can declare in ``Attack.needs``.
PARTS: tuple[str, ...] = ("text_encoder", "unet", "reference_unet", "vae")


class AttackError(ValueError):
    """Bad attack input (budget, prompt set, cache line, missing model part); one line naming attack, option and fix."""


@dataclass
class AttackTarget:
    """The model under attack: its components (the aligned UNet with its LoRA attached and enabled) and,
    for attacks that compare against the unaligned model, whether the LoRA can be switched off.

    ``reference`` is the same UNet with its adapters disabled (``unet.disable_adapters()``), available
    when ``has_reference`` is true (the target has a LoRA); white-box attacks differentiate through
    ``components.unet`` and say so in their docstring.
    """

    name: str
    components: DiffusionComponents
    has_reference: bool
    device: torch.device

    def parts(self) -> set[str]:
        """The parts of ``PARTS`` this target provides."""
        present = {"text_encoder", "unet", "vae"}
        return present | ({"reference_unet"} if self.has_reference else set())


@dataclass(frozen=True)
class AttackOutcome:
    """One attacked prompt: the adversarial prompt, the final objective and its value after every iteration.

    ``higher_is_better`` says which way the attack optimises ``objective`` (so a test or report can check
    that the search improved it).
    """

    adversarial_prompt: str
    objective: float
    history: list[float]
    higher_is_better: bool


class Attack(ABC):
    """A red-teaming attack; subclasses are dataclasses registered in ``ATTACKS`` with a ``seed`` field."""

    registry_name: ClassVar[str]
    #: Which of ``PARTS`` the attack uses; a target without one of them is refused before any work.
    needs: ClassVar[frozenset[str]] = frozenset({"text_encoder"})

    @abstractmethod
    def attack(self, prompt: str, target: AttackTarget, generator: torch.Generator) -> AttackOutcome:
        """Search for an adversarial version of ``prompt`` against ``target``, drawing randomness only from ``generator``."""

    def check(self, target: AttackTarget) -> None:
        """Refuse a target that lacks a part this attack needs, naming the attack and the fix."""
        missing = sorted(self.needs - target.parts())
        if missing:
            raise AttackError(
                f"attack '{self.registry_name}' needs the model's {', '.join(missing)}, which model '{target.name}' "
                "does not have (reference_unet: the unaligned model, i.e. a model with a LoRA); "
                "attack another model or choose an attack that needs less"
            )

    def for_categories(self, categories: Sequence[str]) -> Attack:
        """The attack as it applies to a prompt of ``categories`` (the harm categories of its prompt-set row).

        Most attacks do not depend on the category and return themselves; Ring-A-Bell builds its concept
        vector from the concept pairs of the prompt's own categories.
        """
        return self

    def budget(self) -> dict[str, Any]:
        """The attack's arguments (budget and seed), recorded with every cached result."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]


ATTACKS: Registry[Attack] = Registry("attack")


def build_attack(spec: str | Attack, **kwargs: Any) -> Attack:
    """Resolve an attack given by registry name (with keyword arguments) or as a ready instance."""
    return ATTACKS.build(spec, **kwargs)
