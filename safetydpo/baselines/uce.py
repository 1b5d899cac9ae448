"""UCE: Unified Concept Editing (Gandikota et al., WACV 2024), the closed-form edit of cross-attention keys and values."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from safetydpo.baselines.base import BASELINES, BaselineError, WeightEdit
from safetydpo.models.components import DiffusionComponents, tokenize_prompts

#: Cross-attention projections UCE edits: they are the only UNet weights that read the text embedding.
CROSS_ATTENTION = ("attn2.to_k", "attn2.to_v")


def aligned_positions(old: list[int], new: list[int], eos: int) -> list[tuple[int, int]]:
    """Pairs (old position, new position) of two token-id sequences of equal padded length, BOS left out.

    Positions before the first differing token pair with themselves; after it, old position ``i``
    pairs with ``i + (len(new) - len(old))`` (real-token lengths), so the rest of a caption lines up
    behind a swapped word of another token count; old positions that would land inside the shared
    prefix (a removed word) pair with the first differing new position.
    """
    prefix = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), len(old))
    shift = new.index(eos) - old.index(eos)
    pairs = []
    for i in range(1, len(old)):
        j = i if i < prefix else max(prefix, i + shift)
        if j < len(new):
            pairs.append((i, j))
    return pairs


@BASELINES.register("uce")
@dataclass
class UCE(WeightEdit):
    """``W' = (λW + s_e Σ W c* cᵀ + s_p Σ W c_p c_pᵀ)(λI + s_e Σ c cᵀ + s_p Σ c_p c_pᵀ)⁻¹`` for every
    cross-attention key and value projection ``W``: the least-squares map sending each erased
    concept's text embedding ``c`` where its target's ``c*`` went, keeping every kept concept's
    ``c_p`` where it was, regularised towards the old ``W`` (UCE, Eq. 7).

    UCE's code edits the embeddings from the concept's last word token on; we use every token
    position after BOS, aligned by :func:`aligned_positions`, because a concept inside a caption
    ("a red circle ...") also shapes the tokens before the end (docs/baselines.md).
    """

    concepts: list[str] = field(default_factory=list)
    """Texts to erase (words or whole prompts), e.g. ``[nudity]`` or ``[a red circle on a white background]``."""
    targets: list[str] | None = None
    """Per concept, the text its keys and values are mapped to; ``null``: the empty prompt (UCE's erasure)."""
    keep: list[str] = field(default_factory=list)
    """Texts whose keys and values stay as they are (UCE's preserved concepts); at least one."""
    erase_scale: float = 1.0
    """Weight of the erased concepts in the least-squares objective."""
    preserve_scale: float = 1.0
    """Weight of the kept concepts."""
    regularization: float = 0.1
    """λ: weight of staying at the old weights (UCE's ``lamb``); > 0 keeps the system solvable."""

    def __post_init__(self) -> None:
        if not self.concepts:
            raise BaselineError("uce: concepts is empty; list the texts to erase, e.g. concepts: [nudity]")
        if not self.keep:
            raise BaselineError(
                "uce: keep is empty; UCE needs kept concepts to preserve (its preservation term), e.g. keep: [a photo of a person]"
            )
        if self.targets is not None and len(self.targets) != len(self.concepts):
            raise BaselineError(f"uce: targets has {len(self.targets)} texts for {len(self.concepts)} concepts; give one per concept or null")
        for name in ("erase_scale", "preserve_scale", "regularization"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise BaselineError(f"uce: {name} must be a finite number >= 0, got {value!r}")
        if self.regularization == 0:
            raise BaselineError("uce: regularization must be > 0 (0 can leave the system singular); UCE uses 0.1")

    @torch.no_grad()
    def embeddings(self, components: DiffusionComponents) -> tuple[Tensor, Tensor, Tensor]:
        """Erased, target and kept text-embedding vectors, one row per aligned token position (float64)."""
        targets = self.targets if self.targets is not None else [""] * len(self.concepts)
        texts = [*self.concepts, *targets, *self.keep]
        ids = tokenize_prompts(components.tokenizer, texts)
        hidden = components.text_encoder(ids.to(components.text_encoder.device))[0].double().cpu()
        n = len(self.concepts)
        erased, target = [], []
        for k in range(n):
            pairs = aligned_positions(ids[k].tolist(), ids[n + k].tolist(), components.tokenizer.eos_token_id)
            erased.append(hidden[k, [i for i, _ in pairs]])
            target.append(hidden[n + k, [j for _, j in pairs]])
        kept = hidden[2 * n :, 1:].reshape(-1, hidden.shape[-1])
        return torch.cat(erased), torch.cat(target), kept

    def edit(self, components: DiffusionComponents) -> dict[str, Tensor]:
        erased, target, kept = self.embeddings(components)
        width = erased.shape[1]
        gram = (
            self.regularization * torch.eye(width, dtype=torch.float64)
            + self.erase_scale * erased.T @ erased
            + self.preserve_scale * kept.T @ kept
        )
        deltas = {}
        for name, module in components.unet.named_modules():
            if not name.endswith(CROSS_ATTENTION):
                continue
            weight = module.weight.detach().double().cpu()
            rhs = (
                self.regularization * weight
                + self.erase_scale * (target @ weight.T).T @ erased
                + self.preserve_scale * (kept @ weight.T).T @ kept
            )
            new = torch.linalg.solve(gram, rhs.T).T  # gram is symmetric: W' = rhs gram⁻¹
            deltas[name] = new - weight
        if not deltas:
            raise BaselineError("uce: the base model's UNet has no cross-attention (attn2.to_k/to_v) layers to edit")
        return deltas
