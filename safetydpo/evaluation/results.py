"""Turning per-image judgements and scores into the results of one (model, prompt set): per prompt, per category, overall."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from safetydpo.evaluation.classifiers import Verdict
from safetydpo.evaluation.generate import PlannedImage
from safetydpo.evaluation.ip import Estimate, bootstrap_mean, flagged, proportion


def set_results(
    images: Sequence[PlannedImage],
    root: Path,
    verdicts: Mapping[str, Sequence[Verdict]] | None,
    clip: Sequence[float] | None,
    fid: Mapping[str, Any] | None,
    resamples: int,
) -> dict[str, Any]:
    """Results JSON of one model on one prompt set; metrics that were not computed are absent."""
    unsafe = flagged(list(verdicts.values())) if verdicts else None
    results: dict[str, Any] = {"num_prompts": len({image.prompt.index for image in images}), "num_images": len(images)}
    if verdicts and unsafe is not None:
        results["ip"] = {
            **_breakdown(images, unsafe, lambda values: proportion(values, resamples)),
            "per_classifier": {
                name: {**proportion([v.unsafe for v in found], resamples).as_dict(), **_detections(found)}
                for name, found in verdicts.items()
            },
        }
    if clip is not None:
        results["clipscore"] = _breakdown(images, clip, lambda values: bootstrap_mean(values, resamples))
    if fid is not None:
        results["fid"] = dict(fid)
    results["prompts"] = _per_prompt(images, root, verdicts, unsafe, clip, resamples)
    return results


def ip_breakdown(images: Sequence[PlannedImage], flags: Sequence[bool], resamples: int) -> dict[str, Any]:
    """IP overall and per category of ``images`` flagged as ``flags`` (e.g. a subset of a set's images)."""
    return _breakdown(images, flags, lambda values: proportion(values, resamples))


def _detections(verdicts: Sequence[Verdict]) -> dict[str, Any]:
    """``{"detections": {label: count, ..., "total": count}}`` over all images, for classifiers that count boxes."""
    if all(verdict.detections is None for verdict in verdicts):
        return {}
    totals: dict[str, int] = {}
    for verdict in verdicts:
        for label, count in (verdict.detections or {}).items():
            totals[label] = totals.get(label, 0) + count
    return {"detections": {**dict(sorted(totals.items())), "total": sum(totals.values())}}


def _breakdown(
    images: Sequence[PlannedImage], values: Sequence[Any], estimate: Callable[[list[Any]], Estimate]
) -> dict[str, Any]:
    """Overall estimate and one per category (an image counts in every category of its prompt)."""
    by_category: dict[str, list[Any]] = {}
    for image, value in zip(images, values):
        for category in image.prompt.categories:
            by_category.setdefault(category, []).append(value)
    return {
        "overall": estimate(list(values)).as_dict(),
        "per_category": {category: estimate(found).as_dict() for category, found in sorted(by_category.items())},
    }


def _per_prompt(
    images: Sequence[PlannedImage],
    root: Path,
    verdicts: Mapping[str, Sequence[Verdict]] | None,
    unsafe: Sequence[bool] | None,
    clip: Sequence[float] | None,
    resamples: int,
) -> list[dict[str, Any]]:
    prompts: dict[int, dict[str, Any]] = {}
    for position, image in enumerate(images):
        entry = prompts.setdefault(
            image.prompt.index,
            {"index": image.prompt.index, "prompt": image.prompt.text, "categories": list(image.prompt.categories), "images": []},
        )
        record: dict[str, Any] = {
            "file": str(image.path.relative_to(root)),
            "seed": image.seed,
            "guidance_scale": image.guidance_scale,
        }
        if verdicts and unsafe is not None:
            record["unsafe"] = unsafe[position]
            record["classifiers"] = {
                name: {"unsafe": found[position].unsafe, "labels": found[position].labels} for name, found in verdicts.items()
            }
        if clip is not None:
            record["clipscore"] = clip[position]
        entry["images"].append(record)
    for entry in prompts.values():
        if unsafe is not None:
            entry["ip"] = proportion([record["unsafe"] for record in entry["images"]], resamples).as_dict()
        if clip is not None:
            entry["clipscore"] = bootstrap_mean([record["clipscore"] for record in entry["images"]], resamples).as_dict()
    return list(prompts.values())
