"""The merge-method interface and helpers shared by the dense-delta baselines."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from safetydpo.merging.activations import ActivationStats
from safetydpo.lora_files import LoraExpert, LoraFactors
from safetydpo.registry import Registry


@dataclass
class MergeResult:
    """Merged layers plus what the model card should say about how they were made."""

    layers: dict[str, LoraFactors]
    info: dict[str, Any] = field(default_factory=dict)


class MergeMethod(ABC):
    """Turns several expert LoRAs into one; registered in MERGES, one class per module."""

    registry_name: ClassVar[str]
    needs_activations: ClassVar[bool] = False

    def prepare(self, experts: list[LoraExpert]) -> list[LoraExpert]:
        """The experts as this method reads them, before activation statistics are collected."""
        return experts

    @abstractmethod
    def merge(self, experts: list[LoraExpert], stats: ActivationStats | None) -> MergeResult:
        """Merge ``experts`` (already checked compatible); ``stats`` is given when ``needs_activations``."""


MERGES: Registry[MergeMethod] = Registry("merge method")


def expert_weights(weights: list[float] | None, experts: list[LoraExpert], default: float) -> list[float]:
    """Per-expert weights: given ones (one per expert) or ``default`` for each."""
    if weights is None:
        return [default] * len(experts)
    if len(weights) != len(experts):
        raise ValueError(f"{len(weights)} merge weights given for {len(experts)} experts")
    return list(weights)


def refactor(delta: Tensor, rank: int, like: LoraFactors) -> LoraFactors:
    """Best rank-``rank`` factorisation (truncated SVD) of a dense 2-D update, shaped like ``like``."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    rank = min(rank, s.numel())
    root = s[:rank].sqrt()
    up = (u[:, :rank] * root).float()
    down = (root[:, None] * vh[:rank]).float()
    down = down.view(rank, *like.down.shape[1:])
    up = up.view(up.shape[0], rank, *like.up.shape[2:])
    return LoraFactors(down=down, up=up)


def merge_deltas(
    experts: list[LoraExpert], combine: Callable[[list[Tensor]], Tensor], rank: int | None
) -> dict[str, LoraFactors]:
    """Combine each layer's dense updates with ``combine`` and re-factorise to ``rank`` (default: experts' rank)."""
    merged = {}
    for name, first in experts[0].layers.items():
        deltas = [expert.layers[name].delta() for expert in experts]
        merged[name] = refactor(combine(deltas), rank or first.rank, first)
    return merged
