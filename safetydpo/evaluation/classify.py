"""Running an IP definition's classifiers over rendered images, loading each image once for all of them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from safetydpo.evaluation.classifiers import SafetyClassifier, Verdict
from safetydpo.evaluation.errors import EvaluationError
from safetydpo.evaluation.images import open_rgb
from safetydpo.progress import progress_bar


def classify_images(
    paths: Sequence[Path], classifiers: Mapping[str, SafetyClassifier], batch_size: int, description: str
) -> dict[str, list[Verdict]]:
    """Each classifier's verdicts on every image, in order."""
    verdicts: dict[str, list[Verdict]] = {name: [] for name in classifiers}
    with progress_bar(total=len(paths), desc=description, unit="img") as bar:
        for start in range(0, len(paths), batch_size):
            images = [open_rgb(path) for path in paths[start : start + batch_size]]
            for name, classifier in classifiers.items():
                batch = classifier.classify(images)
                if len(batch) != len(images):
                    raise EvaluationError(f"classifier '{name}' returned {len(batch)} verdicts for {len(images)} images")
                verdicts[name].extend(batch)
            bar.update(len(images))
    return verdicts
