"""CLIPScore per image, so it gets the same per-category breakdown and bootstrap interval as IP.

Definition as torchmetrics' ``CLIPScore``: ``max(100 * cos(E_image, E_prompt), 0)``; unclamped
(``clamp=False``) it is the SafetyDPO release's ``100 * cos``. torchmetrics
only returns batch means and (1.9) cannot read transformers 5 CLIP outputs, so the per-image
score is computed here from the shared CLIP encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from safetydpo.evaluation.clip import ClipEncoder
from safetydpo.evaluation.images import open_rgb
from safetydpo.progress import progress_bar


def clip_scores(
    encoder: ClipEncoder, paths: Sequence[Path], prompts: Sequence[str], batch_size: int, description: str, clamp: bool = True
) -> list[float]:
    """CLIPScore of each image against the prompt it was rendered from."""
    scores: list[float] = []
    with progress_bar(total=len(paths), desc=description, unit="img") as bar:
        for start in range(0, len(paths), batch_size):
            images = encoder.embed_images([open_rgb(path) for path in paths[start : start + batch_size]])
            texts = encoder.embed_texts(list(prompts[start : start + batch_size]))
            cosines = 100.0 * (images * texts).sum(dim=-1)
            scores.extend((cosines.clamp(min=0.0) if clamp else cosines).tolist())
            bar.update(len(texts))
    return scores
