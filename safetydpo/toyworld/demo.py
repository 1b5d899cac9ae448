"""The whole SafetyDPO method on ToyWorld, measured: data -> experts -> Co-Merge -> evaluation -> report.

Every stage is the project's real code path: the CoProV2 builder renders the pairs with the
ToyWorld model, the Lightning trainer fits one DPO expert per category, Co-Merge merges them, and
the evaluation suite (with the ToyWorld judge as its classifier) measures base vs aligned. Only the
prompt-fidelity numbers are ToyWorld-specific: the judge reads every attribute of every image.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml
from PIL import Image

from safetydpo.callbacks import LoraExport
from safetydpo.data import CoProV2DataModule
from safetydpo.data.builder import build
from safetydpo.data.builder.config import BuildConfig, PairsConfig, RenderConfig
from safetydpo.evaluation.classifiers.toyworld import ToyWorldJudge
from safetydpo.evaluation.config import load_config
from safetydpo.evaluation.runner import evaluate, plan_all
from safetydpo.io import atomic_file, write_json_atomic
from safetydpo.losses import LOSSES, PreferenceLoss
from safetydpo.merging import MERGES, MergeMethod
from safetydpo.merging.pipeline import merge_expert_files
from safetydpo.models import DPOExpertModule, LoraSettings
from safetydpo.toyworld.pretrain import DEFAULT_PIPELINE
from safetydpo.toyworld.prompts import heldout_pairs
from safetydpo.toyworld.sampling import attribute_fidelity
from safetydpo.toyworld.taxonomy import write_taxonomy
from safetydpo.toyworld.world import CATEGORIES, RESOLUTION, random_scene, render


@dataclass
class DemoSettings:
    """Sizes of every stage; the defaults are the README run (9 min on 2 CPU cores)."""

    output: str = "runs/demo"
    pipeline: str = str(DEFAULT_PIPELINE)
    seed: int = 0
    pairs_per_concept: int = 48
    render_steps: int = 20
    guidance_scale: float = 5.0
    expert_steps: int = 400
    batch_size: int = 16
    learning_rate: float = 5e-4
    lora_rank: int = 4
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"])
    loss: str = "dpo_sft"
    beta: float = 20.0  # SD 1.5's 5000 saturates on this small model long before behaviour changes
    sft_weight: float = 10.0  # passed only to losses that take it
    anchor_weight: float = 100.0  # keeps each expert from shifting neighbouring attribute values
    merge_method: str = "comerge"
    # Directions per merged layer, for methods that take a rank (0 = the experts' rank). 14 of the 16 that
    # four rank-4 experts hold: dropping more breaks the balance each anchored expert learned (docs/toyworld.md).
    merge_rank: int = 14
    merge_batches: int = 8
    images_per_prompt: int = 6
    reference_renders: int = 4


def build_pairs(settings: DemoSettings, root: Path) -> Path:
    """CoProV2-format pairs, both prompts of a pair rendered by the ToyWorld model with one seed."""
    taxonomy = write_taxonomy(root / "taxonomy.yaml")
    render = RenderConfig(
        pipeline=settings.pipeline, steps=settings.render_steps, guidance_scale=settings.guidance_scale,
        height=RESOLUTION, width=RESOLUTION, seed=settings.seed, batch_size=64, shard_size=512,
    )
    config = BuildConfig(
        output=str(root / "coprov2"), render=render, taxonomy=str(taxonomy),
        generator={"name": "toyworld", "seed": settings.seed}, pairs=PairsConfig(per_concept=settings.pairs_per_concept),
    )
    return build(config).output


def _with_accepted(cls: type[Any], **options: Any) -> Any:
    """``cls`` built from the ``options`` that are among its dataclass fields (losses and merges differ)."""
    accepted = {f.name for f in dataclasses.fields(cls)}
    return cls(**{key: value for key, value in options.items() if key in accepted})


def demo_loss(settings: DemoSettings) -> PreferenceLoss:
    """The configured loss with whichever of ``beta`` / ``sft_weight`` it takes."""
    return _with_accepted(LOSSES.get(settings.loss), beta=settings.beta, sft_weight=settings.sft_weight)


def demo_merge(settings: DemoSettings, method: str | None = None) -> MergeMethod:
    """``method`` (default: the configured one), given ``merge_rank`` when it takes a rank (0 = its default)."""
    return _with_accepted(MERGES.get(method or settings.merge_method), rank=settings.merge_rank or None)


def train_expert(settings: DemoSettings, data_dir: Path, path: Path, category: str, steps: int | None = None) -> Path:
    """One DPO LoRA on ``category``'s pairs (``"all"``: every category's pairs, the all-single ablation)."""
    pl.seed_everything(settings.seed)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps or settings.expert_steps, logger=False, enable_checkpointing=False,
        enable_model_summary=False, callbacks=[LoraExport(str(path))], default_root_dir=path.parent / "logs",
    )
    module = DPOExpertModule(
        settings.pipeline, loss=demo_loss(settings), category=category, learning_rate=settings.learning_rate,
        lora=LoraSettings(rank=settings.lora_rank, target_modules=list(settings.lora_targets)),
        anchor_weight=settings.anchor_weight,
    )
    data = CoProV2DataModule(str(data_dir), categories=None if category == "all" else [category], val_fraction=0.0,
                             resolution=RESOLUTION, batch_size=settings.batch_size, seed=settings.seed,
                             anchors=settings.anchor_weight > 0)
    trainer.fit(module, datamodule=data)
    return path


def train_experts(settings: DemoSettings, data_dir: Path, root: Path) -> list[Path]:
    """One DPO LoRA expert per category, each on its own category's pairs."""
    return [train_expert(settings, data_dir, root / "experts" / f"{category}.safetensors", category) for category in CATEGORIES]


def write_heldout(settings: DemoSettings, root: Path) -> tuple[Path, Path]:
    """Held-out prompt pairs (JSONL, CoProV2 columns) and ground-truth renders of their safe prompts."""
    pairs = heldout_pairs(settings.seed)
    table = root / "heldout.jsonl"
    with atomic_file(table) as tmp:
        rows = [{**{k: v for k, v in pair.items() if not k.endswith("_attributes")}, "seed": settings.seed + 1000 * i} for i, pair in enumerate(pairs)]
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    reference = root / "reference"
    reference.mkdir(parents=True, exist_ok=True)
    rng = random.Random(settings.seed)
    for i, pair in enumerate(pairs):
        for k in range(settings.reference_renders):
            render(random_scene(rng, **pair["safe_attributes"])).save(reference / f"{i:04d}_{k}.png")
    return table, reference


def eval_config(settings: DemoSettings, root: Path, loras: dict[str, Path], table: Path, reference: Path, name: str = "eval") -> Path:
    """The evaluation config comparing the base model with each named LoRA (also runnable as ``safetydpo evaluate --config``)."""
    shared = {"source": "coprov2", "path": str(table), "images_per_prompt": settings.images_per_prompt}
    config = {
        "output_dir": str(root / name),
        "baseline": "base",
        "models": [{"name": "base", "pretrained": settings.pipeline}]
        + [{"name": model, "pretrained": settings.pipeline, "lora": str(path)} for model, path in loras.items()],
        "prompt_sets": [
            {"name": "unsafe", **shared, "metrics": ["ip"]},
            {"name": "safe", **shared, "options": {"prompt_column": "safe_prompt"}, "metrics": ["ip", "fid"], "fid_reference": str(reference)},
        ],
        "generation": {"num_inference_steps": settings.render_steps, "guidance_scale": settings.guidance_scale,
                       "height": RESOLUTION, "width": RESOLUTION, "batch_size": 64, "seed": settings.seed, "dtype": "float32"},
        "ip": {"definition": "custom", "custom": [{"name": "toyworld"}]},
        "fid": {"feature_extractor": "safetydpo.toyworld.judge.JudgeFeatures"},
        "grid": {"rows": 8, "seeds": 2, "cell_size": 96},
    }
    path = root / f"{name}.yaml"
    with atomic_file(path) as tmp:
        tmp.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def toyworld_fidelity(settings: DemoSettings, config_path: Path, judge: ToyWorldJudge) -> dict[str, dict[str, dict[str, float]]]:
    """Per model and category: neutral-attribute fidelity on unsafe prompts and full fidelity on safe prompts."""
    config = load_config(config_path)
    plans = plan_all(config, Path(config.output_dir))
    pairs = heldout_pairs(settings.seed)
    scores: dict[str, dict[str, dict[str, float]]] = {}
    for (model, set_name), planned in plans.items():
        for category, (attribute, _) in CATEGORIES.items():
            mine = [p for p in planned if pairs[p.prompt.index]["category"] == category]
            wanted = [pairs[p.prompt.index][f"{set_name}_attributes"] for p in mine]
            ignored = [attribute if set_name == "unsafe" else None for _ in mine]
            images = [Image.open(p.path).convert("RGB") for p in mine]
            value = attribute_fidelity(judge, images, wanted, ignored)["all"]
            scores.setdefault(model, {}).setdefault(category, {})[f"{set_name}_fidelity"] = value
    return scores


def summarize(payload: dict[str, Any], scores: dict[str, dict[str, dict[str, float]]], aligned: str = "aligned") -> list[dict[str, Any]]:
    """One row per category (and overall): IP before/after, its relative drop, fidelity before/after.

    ``aligned`` names the evaluated LoRA model compared against ``base``; the row keys say ``aligned``.
    """
    models = {"base": "base", "aligned": aligned}
    unsafe = {key: payload["results"][model]["unsafe"] for key, model in models.items()}
    rows = []
    for category in [*CATEGORIES, "overall"]:
        ip = {m: (unsafe[m]["ip"]["overall"] if category == "overall" else unsafe[m]["ip"]["per_category"][category])["value"] for m in unsafe}
        row: dict[str, Any] = {"category": category, "ip_base": ip["base"], "ip_aligned": ip["aligned"]}
        row["ip_relative_drop"] = 1 - ip["aligned"] / ip["base"] if ip["base"] else 0.0
        for key in ("unsafe_fidelity", "safe_fidelity"):
            for model in ("base", "aligned"):
                values = [scores[models[model]][c][key] for c in CATEGORIES] if category == "overall" else [scores[models[model]][category][key]]
                row[f"{key}_{model}"] = sum(values) / len(values)
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], payload: dict[str, Any], settings: DemoSettings) -> str:
    fid = {m: payload["results"][m]["safe"]["fid"]["value"] for m in ("base", "aligned")}
    lines = [
        "# SafetyDPO on ToyWorld",
        "",
        "IP = share of images on held-out unsafe prompts that the ToyWorld judge finds showing any harmful concept.",
        "Neutral fidelity = share of unsafe-prompt images that keep every prompted attribute except the harmful one;",
        "safe fidelity = share of safe-prompt images showing every prompted attribute.",
        "",
        "| category | IP base | IP aligned | relative drop | neutral fidelity base | neutral fidelity aligned | safe fidelity base | safe fidelity aligned |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['category']} | {r['ip_base']:.3f} | {r['ip_aligned']:.3f} | {r['ip_relative_drop']:.1%} | "
            f"{r['unsafe_fidelity_base']:.3f} | {r['unsafe_fidelity_aligned']:.3f} | {r['safe_fidelity_base']:.3f} | {r['safe_fidelity_aligned']:.3f} |"
        )
    lines += [
        "",
        f"Quality (FID with judge features, safe prompts vs ground-truth renders): base {fid['base']:.3f}, aligned {fid['aligned']:.3f}.",
        "",
        f"Full evaluation: `eval/report.md`, `eval/results.json`; side-by-side grids (same seed): `eval/grids/`. Settings: `{json.dumps(asdict(settings))}`",
    ]
    return "\n".join(lines) + "\n"


def run_demo(settings: DemoSettings) -> list[dict[str, Any]]:
    root = Path(settings.output)
    root.mkdir(parents=True, exist_ok=True)
    data_dir = build_pairs(settings, root)
    experts = train_experts(settings, data_dir, root)
    merged = root / "merged.safetensors"
    merge_expert_files(experts, merged, method=demo_merge(settings), pretrained_model_name_or_path=settings.pipeline,
                       data_dir=str(data_dir), num_batches=settings.merge_batches, batch_size=settings.batch_size,
                       resolution=RESOLUTION, seed=settings.seed, device="cpu")
    table, reference = write_heldout(settings, root)
    config_path = eval_config(settings, root, {"aligned": merged}, table, reference)
    payload = evaluate(load_config(config_path))
    rows = summarize(payload, toyworld_fidelity(settings, config_path, ToyWorldJudge()))
    write_json_atomic(root / "demo_results.json", {"settings": asdict(settings), "rows": rows})
    with atomic_file(root / "demo_report.md") as tmp:
        tmp.write_text(markdown(rows, payload, settings), encoding="utf-8")
    return rows
