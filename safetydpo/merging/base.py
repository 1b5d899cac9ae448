"""The merge-method interface and helpers shared by the dense-delta baselines."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from safetydpo.merging.activations import ActivationStats, NetworkInputs, collect_activations
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
    #: Whether every expert must have the same rank per layer (Co-Merge compares directions across experts).
    needs_equal_ranks: ClassVar[bool] = False

    def prepare(self, experts: list[LoraExpert]) -> list[LoraExpert]:
        """The experts as this method reads them, before activation statistics are collected."""
        return experts

    def collect(self, unet: torch.nn.Module, experts: list[LoraExpert], inputs: Iterable[NetworkInputs]) -> ActivationStats:
        """The statistics ``merge`` reads when ``needs_activations``: by default, direction activity in one base pass."""
        return collect_activations(unet, experts, inputs)

    @abstractmethod
    def merge(self, experts: list[LoraExpert], stats: ActivationStats | None) -> MergeResult:
        """Merge ``experts`` (already checked compatible); ``stats`` is given when ``needs_activations``."""


MERGES: Registry[MergeMethod] = Registry("merge method")


def expert_weights(weights: list[float] | None, experts: list[LoraExpert], default: float) -> list[float]:
    """Per-expert weights: given ones (one per expert) or ``default`` for each."""
    if weights is None:
        return [default] * len(experts)
    if not isinstance(weights, (list, tuple)) or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
        raise ValueError(f"merge weights must be a list of numbers, one per expert, got {weights!r}")
    if len(weights) != len(experts):
        raise ValueError(f"{len(weights)} merge weights given for {len(experts)} experts")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"merge weights must be finite numbers, got {list(weights)}")
    return list(weights)


def check_rank(method: str, rank: int | None) -> None:
    """A ``rank`` argument is unset (the method's default) or >= 1; 0 is an error, not the default."""
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ValueError(f"{method} rank must be an integer >= 1, got {rank!r}")


def check_density(method: str, density: float) -> None:
    """Fraction of each update kept: in (0, 1] (0 keeps nothing, and DARE would divide by it)."""
    if not isinstance(density, (int, float)) or isinstance(density, bool) or not 0.0 < density <= 1.0:
        raise ValueError(f"{method} density must be a number in (0, 1], got {density!r}")


def check_sign_method(method: str, majority_sign_method: str) -> None:
    """TIES' sign election: peft's ``total`` (sum of values) or ``frequency`` (count of signs)."""
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"{method} majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")


def max_rank(experts: list[LoraExpert], name: str) -> int:
    """The largest rank of layer ``name`` among ``experts``: peft's default ``svd_rank``."""
    return max(expert.layers[name].rank for expert in experts)


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
    """Combine each layer's dense updates with ``combine`` and re-factorise to ``rank`` (default: the largest expert rank)."""
    merged = {}
    for name, first in experts[0].layers.items():
        deltas = [expert.layers[name].delta() for expert in experts]
        merged[name] = refactor(combine(deltas), rank or max_rank(experts, name), first)
    return merged
