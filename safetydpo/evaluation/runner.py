"""``evaluate``: render every model on every prompt set (resuming), score them, write results.json, report.md and grids.

Everything that can fail on bad input (prompt files, model folders, classifier and FID weights) is
loaded before the first image is rendered, so a typo never costs a rendering run.
"""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from safetydpo.evaluation.classifiers import SafetyClassifier
from safetydpo.evaluation.classify import classify_images
from safetydpo.evaluation.clip import ClipEncoder, load_clip
from safetydpo.evaluation.clipscore import clip_scores
from safetydpo.evaluation.config import EvalConfig, GenerationConfig, ModelConfig, PromptSetConfig
from safetydpo.evaluation.definitions import IPDefinition, resolve_definition
from safetydpo.devices import resolve_device, resolve_dtype
from safetydpo.distributed import Ranks, launch
from safetydpo.evaluation.errors import EvaluationError
from safetydpo.evaluation.fid import FidScorer, build_extractor, image_files
from safetydpo.evaluation.generate import (
    PlannedImage,
    batches,
    check_model,
    claim_folder,
    load_pipeline,
    plan_images,
    render,
    render_settings,
)
from safetydpo.evaluation.attacks import AttackPlans, AttackRun, plan_attack_images, run_attacks, score_attacks, write_attack_grids
from safetydpo.evaluation.charts import write_attack_chart, write_ip_chart
from safetydpo.evaluation.grid import write_grid
from safetydpo.evaluation.images import is_readable
from safetydpo.evaluation.prompts import EvalPrompt
from safetydpo.evaluation.prompts.base import load_prompt_set
from safetydpo.evaluation.protocols import describe_protocol
from safetydpo.evaluation.report import markdown_report
from safetydpo.evaluation.results import set_results
from safetydpo.io import atomic_file, write_json_atomic
from safetydpo.locking import LOCK_NAME, output_lock
from safetydpo.sampling import speed_up

RESULTS_FORMAT = "safetydpo.eval/1"
Plans = dict[tuple[str, str], list[PlannedImage]]


@dataclass
class Scorers:
    """What the configured metrics need, loaded once for all models and prompt sets."""

    definition: IPDefinition | None
    classifiers: dict[str, SafetyClassifier]
    clip: ClipEncoder | None
    fid: FidScorer | None


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Run the whole evaluation ``config`` describes; returns the payload written to ``results.json``.

    One evaluation at a time writes ``output_dir`` (its lock file ``.safetydpo.lock``). With ``distributed``
    devices x nodes > 1 the ranks share the rendering (a model's batch ``i`` on rank ``i mod world``: the batches
    of a one-process run); rank 0 holds the lock, attacks, scores and writes, and every rank returns the payload.
    """
    ranks = launch(config.distributed, "distributed", EvaluationError)
    device = ranks.device if ranks.device is not None else resolve_device(config.device, "device", EvaluationError)
    dtype = resolve_dtype(config.generation.dtype, device, "generation.dtype", EvaluationError)
    root = Path(config.output_dir).expanduser()
    with ranks.held_by_zero(lambda: output_lock(root / LOCK_NAME, "evaluation", EvaluationError)):
        return _evaluate(config, root, device, dtype, ranks)


def _evaluate(config: EvalConfig, root: Path, device: torch.device, dtype: torch.dtype, ranks: Ranks) -> dict[str, Any]:
    plans = plan_all(config, root)
    for model in config.models:
        check_model(model)
    scorers = typing.cast(Scorers, ranks.on_zero(lambda: build_scorers(config, device)))  # None on ranks that do not score
    runs = ranks.share(ranks.on_zero(lambda: run_attacks(config, set_prompts(config, plans), root, device))) if config.attacks else []
    attack_plans = plan_attack_images(config, runs, root)
    for model in config.models:
        images = [image for s in config.prompt_sets for image in plans[(model.name, s.name)]]
        images += [image for (_, name), planned in attack_plans.items() if name == model.name for image in planned]
        render_model(model, images, config.generation, device, dtype, root, ranks)
    return typing.cast(dict[str, Any], ranks.share(ranks.on_zero(lambda: score_all(config, root, plans, scorers, runs, attack_plans))))


def score_all(config: EvalConfig, root: Path, plans: Plans, scorers: Scorers, runs: list[AttackRun], attack_plans: AttackPlans) -> dict[str, Any]:
    """Rank 0, once every image is on disk: score every model's images and write results.json, report.md, grids, charts."""
    payload = {
        "format": RESULTS_FORMAT,
        "ip_definition": scorers.definition.as_dict() if scorers.definition else None,
        "protocol": describe_protocol(config, scorers.definition.as_dict() if scorers.definition else None),
        "baseline": config.baseline_name,
        "generation": asdict(config.generation),
        "models": {m.name: {"base_model": m.base_model, "lora": m.lora} for m in config.models},
        "prompt_sets": {s.name: describe_set(s, plans[(config.models[0].name, s.name)]) for s in config.prompt_sets},
        "results": {
            m.name: {s.name: score_set(plans[(m.name, s.name)], s, scorers, config, root, m.name) for s in config.prompt_sets}
            for m in config.models
        },
    }
    if runs:
        payload["attacks"] = score_attacks(runs, attack_plans, plans, payload, config, scorers.classifiers, root)
        write_attack_grids(config, runs, attack_plans, plans, payload, root)
    write_outputs(payload, config, plans, root)
    return payload


def set_prompts(config: EvalConfig, plans: Plans) -> dict[str, list[EvalPrompt]]:
    """Each prompt set's prompts, in file order (as planned for the first model)."""
    found: dict[str, list[EvalPrompt]] = {}
    for s in config.prompt_sets:
        unique = {image.prompt.index: image.prompt for image in plans[(config.models[0].name, s.name)]}
        found[s.name] = list(unique.values())
    return found


def plan_all(config: EvalConfig, root: Path) -> Plans:
    """Read every prompt set and plan each model's images of it (same prompts and seeds for every model)."""
    plans: Plans = {}
    for s in config.prompt_sets:
        prompts = load_prompt_set(s.source, s.path, s.options, s.categories, s.limit, f"prompt_sets.{s.name}")
        for m in config.models:
            plans[(m.name, s.name)] = plan_images(
                prompts, s.images_per_prompt, config.generation, root / "images" / m.name / s.name
            )
    return plans


def build_scorers(config: EvalConfig, device: torch.device) -> Scorers:
    """Load every classifier, CLIP and FID extractor the prompt sets' metrics need (and check FID reference folders)."""
    needed = {metric for s in config.prompt_sets for metric in s.metrics}
    definition = resolve_definition(config.ip.definition, config.ip.custom, config.ip.classifier_args) if "ip" in needed else None
    fid = None
    if "fid" in needed:
        for s in config.prompt_sets:
            if "fid" in s.metrics:
                image_files(s.fid_reference or "")
        fid = FidScorer(build_extractor(config.fid, device), device, config.fid.batch_size, config.fid.num_workers)
    return Scorers(
        definition=definition,
        classifiers=definition.build() if definition else {},
        clip=load_clip(config.clipscore.clip, device) if "clipscore" in needed else None,
        fid=fid,
    )


def render_model(
    model: ModelConfig,
    planned: list[PlannedImage],
    generation: GenerationConfig,
    device: torch.device,
    dtype: torch.dtype,
    root: Path,
    ranks: Ranks | None = None,
) -> None:
    """Render the images of ``model`` not cached yet, or whose cached file is damaged; the pipeline is loaded only if
    there are any. Rank 0 lists what is missing before any rank writes; each rank renders its batches of it."""
    ranks = ranks or Ranks()
    missing = typing.cast(list[int], ranks.share(ranks.on_zero(lambda: find_missing(model, planned, generation, dtype, root))))
    ranks.on_all(lambda: render_share(model, [planned[i] for i in missing], generation, device, dtype, ranks))


def find_missing(model: ModelConfig, planned: list[PlannedImage], generation: GenerationConfig, dtype: torch.dtype, root: Path) -> list[int]:
    """Claim the model's image folder; the positions in ``planned`` of images not cached, or whose cached file is damaged."""
    claim_folder(root / "images" / model.name, render_settings(model, generation, dtype))
    missing = [i for i, image in enumerate(planned) if not is_readable(image.path)]
    damaged = [planned[i].path for i in missing if planned[i].path.exists()]
    if damaged:
        tqdm.write(f"{model.name}: {len(damaged)} cached image(s) unreadable (first: {damaged[0]}), rendering them again")
    tqdm.write(f"{model.name}: {len(planned) - len(missing)} cached image(s), {len(missing)} to render")
    return missing


def render_share(
    model: ModelConfig, missing: list[PlannedImage], generation: GenerationConfig, device: torch.device, dtype: torch.dtype, ranks: Ranks
) -> None:
    """This rank's batches of ``missing`` (all of them in one process), with ``generation.speed``."""
    if len(batches(missing, generation.batch_size)) <= ranks.rank:
        return  # no batch for this rank: its pipeline is not even loaded
    pipe = speed_up(load_pipeline(model, device, dtype), generation.speed, "generation.speed", EvaluationError)
    description = f"render {model.name}" if ranks.world_size == 1 else f"render {model.name} rank {ranks.rank}/{ranks.world_size}"
    render(pipe, missing, generation, description, (ranks.rank, ranks.world_size))
    del pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the pipeline is gone; give its memory to the next model or the classifiers


def score_set(
    planned: list[PlannedImage], prompt_set: PromptSetConfig, scorers: Scorers, config: EvalConfig, root: Path, model: str
) -> dict[str, Any]:
    """IP, CLIPScore and FID (those the prompt set asks for) of one model's images of one prompt set."""
    paths = [image.path for image in planned]
    label = f"{model}/{prompt_set.name}"
    verdicts = clip = fid = None
    if "ip" in prompt_set.metrics:
        verdicts = classify_images(paths, scorers.classifiers, config.ip.batch_size, f"classify {label}")
    if "clipscore" in prompt_set.metrics and scorers.clip is not None:
        clip = clip_scores(
            scorers.clip, paths, [image.prompt.text for image in planned], config.clipscore.batch_size, f"CLIPScore {label}",
            clamp=config.clipscore.clamp,
        )
    if "fid" in prompt_set.metrics and scorers.fid is not None and prompt_set.fid_reference:
        fid = {
            "value": scorers.fid.score(paths, prompt_set.fid_reference),
            "reference": prompt_set.fid_reference,
            "feature_extractor": config.fid.feature_extractor,
            "weights_sha256": getattr(scorers.fid.extractor, "sha256", None),  # the Inception file's, when it is one
        }
    return set_results(planned, root, verdicts, clip, fid, config.bootstrap_resamples)


def grid_rows(config: EvalConfig, set_name: str, plans: Plans) -> list[tuple[str, list[Path]]]:
    """The first ``grid.rows`` prompts, ``grid.seeds`` seeds each; a row holds every model's image for one seed."""
    rows: list[tuple[str, list[Path]]] = []
    shown: dict[int, int] = {}
    for position, image in enumerate(plans[(config.models[0].name, set_name)]):
        index = image.prompt.index
        if index not in shown and len(shown) == config.grid.rows:
            break
        if shown.setdefault(index, 0) < config.grid.seeds:
            shown[index] += 1
            rows.append((f"#{index} seed {image.seed}", [plans[(m.name, set_name)][position].path for m in config.models]))
    return rows


def describe_set(prompt_set: PromptSetConfig, planned: list[PlannedImage]) -> dict[str, Any]:
    """The prompt set's config plus what was actually read from its file."""
    return {**asdict(prompt_set), "num_prompts": len({image.prompt.index for image in planned}), "num_images": len(planned)}


def write_outputs(payload: dict[str, Any], config: EvalConfig, plans: Plans, root: Path) -> None:
    """Grids and charts first (the report links them), then results.json and report.md, each written atomically."""
    for s in config.prompt_sets:
        grid = root / "grids" / f"{s.name}.png"
        write_grid([m.name for m in config.models], grid_rows(config, s.name, plans), grid, config.grid.cell_size)
        payload["prompt_sets"][s.name]["grid"] = str(grid.relative_to(root))
        chart = write_ip_chart(payload, s.name, root / "charts" / f"{s.name}-ip.png")
        if chart is not None:
            payload["prompt_sets"][s.name]["ip_chart"] = str(chart.relative_to(root))
        chart = write_attack_chart(payload, s.name, root / "charts" / f"{s.name}-attacks.png")
        if chart is not None:
            payload["prompt_sets"][s.name]["attack_chart"] = str(chart.relative_to(root))
    write_json_atomic(root / "results.json", payload)
    with atomic_file(root / "report.md") as tmp:
        tmp.write_text(markdown_report(payload), encoding="utf-8")
