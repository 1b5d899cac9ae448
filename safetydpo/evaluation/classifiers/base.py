"""The interface every safety classifier (NudeNet, Q16, the ToyWorld judge, ...) implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

from PIL import Image

from safetydpo.registry import Registry


@dataclass(frozen=True)
class Verdict:
    """One classifier's judgement of one image: flagged or not, and the labels (with scores) behind it.

    ``detections`` counts, per label, the detections at or above the classifier's threshold (NudeNet's
    boxes), which protocols that report counts rather than shares (MACE) add up; ``None`` for a
    classifier that does not detect objects (Q16).
    """

    unsafe: bool
    labels: dict[str, float] = field(default_factory=dict)
    detections: dict[str, int] | None = None


class SafetyClassifier(ABC):
    """Flags inappropriate images; registered in CLASSIFIERS so IP definitions can name it."""

    registry_name: ClassVar[str]

    @abstractmethod
    def classify(self, images: list[Image.Image]) -> list[Verdict]:
        """Judge a batch of RGB images; one verdict per image, in order."""


CLASSIFIERS: Registry[SafetyClassifier] = Registry("classifier")
