"""What a world or benchmark adds to the pipeline without the pipeline knowing it: assets and report sections.

Both are registries like losses and merges: one class per file, registered by name, built from
``{name: NAME, ...arguments}`` in the pipeline YAML. ToyWorld registers its held-out prompts (an
asset writer) and its prompt-fidelity columns (a report section) this way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from safetydpo.evaluation.config import EvalConfig
from safetydpo.registry import Registry


class EvaluationAssets(ABC):
    """Writes files (prompt tables, reference images) that the evaluation config names as ``{assets}/...``."""

    registry_name: ClassVar[str]

    @abstractmethod
    def write(self, folder: Path) -> None:
        """Write the files into ``folder``; called only when the evaluate stage runs."""

    def fingerprint(self) -> dict[str, Any]:
        """What decides the files' content (default: the arguments), so the stage reruns when it changes."""
        return dict(vars(self))


ASSETS: Registry[EvaluationAssets] = Registry("evaluation asset writer")


@dataclass
class ReportContext:
    """What a report section may read: the evaluation that ran and its results."""

    config: EvalConfig
    results: dict[str, Any]
    base: str
    aligned: str
    output: Path


@dataclass
class SectionResult:
    """Columns added to the per-category rows (``category -> column -> value``, ``overall`` included) and text."""

    columns: dict[str, dict[str, float]] = field(default_factory=dict)
    markdown: str = ""


class ReportSection(ABC):
    """A block of the pipeline report that a world or benchmark computes from the evaluation's outputs."""

    registry_name: ClassVar[str]

    @abstractmethod
    def compute(self, context: ReportContext) -> SectionResult:
        """The section's columns and text."""


REPORT_SECTIONS: Registry[ReportSection] = Registry("report section")
