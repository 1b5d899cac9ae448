"""Concept-erasure baselines against SafetyDPO on ToyWorld: IP, fidelity, FID/KID, same-seed preservation, scaling.

Methods, all on the same held-out prompts, seeds, judge and report code: the base model; SafetyDPO
(Co-Merge at one expert's size of the experts an earlier ``safetydpo demo`` trained in ``runs/demo``); the
all-single LoRA (one LoRA on every category's pairs, as in benchmarks/merge_ablation.py); ESD-u
(``safetydpo.baselines.esd.ESDModule`` trained by ``safetydpo fit``); UCE (``safetydpo uce``); SLD at
each preset (``models[].sld``). The scaling curve targets 1, 2, 4 and 8 of ToyWorld's 8 harmful
concepts. Run from the repository root; options after the benchmark's own go to the pipeline:

    python benchmarks/baselines.py --folder runs/baselines
    python benchmarks/baselines.py --tiny --folder /tmp/b      # CPU smoke run: no pipeline, tiny budgets
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from cleanfid.fid import kernel_distance
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_ablation import train_all_single  # noqa: E402  (the all-single LoRA, trained as the ablation trains it)

from safetydpo.baselines.base import run_edit  # noqa: E402
from safetydpo.baselines.esd import NON_CROSS_ATTENTION  # noqa: E402
from safetydpo.baselines.uce import UCE  # noqa: E402
from safetydpo.cli.demo import TOYWORLD_PIPELINE  # noqa: E402
from safetydpo.cli.run import parse, pipeline_parser  # noqa: E402
from safetydpo.evaluation.config import EvalConfig, config_from_dict  # noqa: E402
from safetydpo.evaluation.fid import FidScorer, build_extractor, image_files  # noqa: E402
from safetydpo.evaluation.runner import Plans, evaluate, plan_all  # noqa: E402
from safetydpo.io import atomic_file, write_json_atomic  # noqa: E402
from safetydpo.lightning_cli import run_fit  # noqa: E402
from safetydpo.merging.files import merge_expert_files  # noqa: E402
from safetydpo.models.components import freeze, load_components  # noqa: E402
from safetydpo.models.inputs import activation_inputs  # noqa: E402
from safetydpo.data.datamodule import pair_batches  # noqa: E402
from safetydpo.pipeline.extensions import ReportContext  # noqa: E402
from safetydpo.toyworld.classifier import ToyWorldClassifier  # noqa: E402
from safetydpo.toyworld.measures import HELDOUT_TABLE, REFERENCE_FOLDER, ToyWorldFidelity, ToyWorldHeldout  # noqa: E402
from safetydpo.toyworld.prompts import heldout_captions, heldout_pairs, neutral_contexts  # noqa: E402
from safetydpo.toyworld.taxonomy import SAFE_REWRITES  # noqa: E402
from safetydpo.toyworld.world import ATTRIBUTES, CATEGORIES, caption, neutral_values  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BASE_MODEL = "safetydpo/toyworld/assets/pipeline"
BASE = "base"
#: Harmful concepts in the order the scaling curve adds them: whole categories, so 2, 4, 8 match 1, 2, 4 experts.
CONCEPTS = [concept for _, concepts in CATEGORIES.values() for concept in concepts]
SLD_PRESETS = ("weak", "medium", "strong", "max")


def concept_category(concept: str) -> str:
    return next(category for category, (_, concepts) in CATEGORIES.items() if concept in concepts)


def concept_prompts(concept: str) -> list[tuple[str, str]]:
    """(unsafe, safe rewrite) captions showing ``concept`` in each neutral context that is not held out."""
    attribute = CATEGORIES[concept_category(concept)][0]
    held = heldout_captions()
    pairs = [(caption({**c, attribute: concept}), caption({**c, attribute: SAFE_REWRITES[concept]})) for c in neutral_contexts(attribute)]
    return [pair for pair in pairs if pair[0] not in held]


def neutral_captions() -> list[str]:
    """Every fully neutral caption: what UCE keeps (the experts' anchors are such safe prompts too)."""
    names = list(ATTRIBUTES)
    return [caption(dict(zip(names, values))) for values in itertools.product(*(neutral_values(n) for n in names))]


def train_esd(folder: Path, name: str, concepts: list[str], args: argparse.Namespace) -> Path:
    """An ESD-u LoRA for ``concepts`` through ``safetydpo fit`` (skipped when the file exists)."""
    out = folder / "loras" / f"{name}.safetensors"
    if out.is_file():
        return out
    prompts = [unsafe for concept in concepts for unsafe, _ in concept_prompts(concept)]
    fit = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "max_steps": args.esd_steps, "logger": False, "enable_checkpointing": False,
            "enable_model_summary": False, "default_root_dir": str(folder / "fit" / name),
            "callbacks": [{"class_path": "safetydpo.callbacks.LoraExport", "init_args": {"output_path": str(out)}}],
        },
        "model": {"class_path": "safetydpo.baselines.esd.ESDModule", "init_args": {
            "base_model": BASE_MODEL, "negative_guidance": 1.0, "sampling_steps": args.esd_sampling_steps, "sample_guidance": 3.0,
            "learning_rate": args.esd_learning_rate, "lora": {"rank": 4, "target_modules": NON_CROSS_ATTENTION},
        }},
        "data": {"class_path": "safetydpo.data.concepts.ConceptPromptDataModule",
                 "init_args": {"prompts": prompts, "concepts": concepts, "batch_size": args.esd_batch_size}},
    }
    path = folder / "fit" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(yaml.safe_dump(fit, sort_keys=False), encoding="utf-8")
    run_fit(["--config", str(path)])
    return out


def write_uce(folder: Path, name: str, concepts: list[str]) -> Path:
    """The UCE edit mapping each concept's captions to their safe rewrites, keeping every neutral caption."""
    pairs = [pair for concept in concepts for pair in concept_prompts(concept)]
    edit = UCE(concepts=[u for u, _ in pairs], targets=[s for _, s in pairs], keep=neutral_captions())
    return run_edit(edit, BASE_MODEL, folder / "loras" / f"{name}.safetensors")


def merge_experts(root: Path, experts: Path, folder: Path, name: str, categories: list[str], config: Any) -> Path:
    """Co-Merge at one expert's size (rank 4) of the experts of ``categories``, with the pipeline's activation inputs."""
    out = folder / "loras" / f"{name}.safetensors"
    if out.is_file():
        return out
    components = load_components(config.base_model)
    freeze(components.unet, components.vae, components.text_encoder)
    merge = config.merge
    batches = pair_batches(root / "data", merge.num_batches, merge.batch_size, merge.resolution, merge.seed)
    inputs = activation_inputs(components, batches, merge.seed, total=merge.num_batches)
    files = [experts / f"{category}.safetensors" for category in categories]
    merge_expert_files(files, out, method={"name": "comerge", "rank": 4}, unet=components.unet, inputs=inputs, base_model=config.base_model)
    return out


def eval_config(folder: Path, models: list[dict[str, Any]], args: argparse.Namespace) -> EvalConfig:
    """configs/toyworld/eval.yaml on this benchmark's held-out assets, with every model and the benchmark's budget."""
    assets = folder / "assets"
    if not (assets / HELDOUT_TABLE).is_file():
        ToyWorldHeldout(seed=0, reference_renders=args.reference_renders).write(assets)
    text = (REPO / "configs" / "toyworld" / "eval.yaml").read_text(encoding="utf-8").replace("{assets}", str(assets))
    data = yaml.safe_load(text)
    for prompt_set in data["prompt_sets"]:
        prompt_set["images_per_prompt"] = args.images_per_prompt
    data["generation"]["num_inference_steps"] = args.sampling_steps
    data.pop("attacks", None)  # robustness under attack is the pipeline report's, not this comparison's
    data["models"] = models
    data["output_dir"] = str(folder / "eval")
    data["device"] = "cpu"
    data["bootstrap_resamples"] = 200
    return config_from_dict(data, folder / "eval.yaml")


class Measures:
    """Judge features, same-seed distances and KID of the rendered images (features computed once per file)."""

    def __init__(self, config: EvalConfig, plans: Plans, folder: Path) -> None:
        self.plans = plans
        self.scorer = FidScorer(build_extractor(config.fid, torch.device("cpu")), torch.device("cpu"), config.fid.batch_size)
        self.reference = self.scorer.features(image_files(folder / "assets" / REFERENCE_FOLDER), "KID reference")
        self._features: dict[tuple[str, str], np.ndarray] = {}

    def features(self, model: str, set_name: str) -> np.ndarray:
        if (model, set_name) not in self._features:
            self._features[(model, set_name)] = self.scorer.features([p.path for p in self.plans[(model, set_name)]], f"features {model}")
        return self._features[(model, set_name)]

    def same_seed(self, model: str, set_name: str) -> dict[str, float]:
        """Mean absolute pixel difference (0-1 scale) and mean judge-feature L2 distance to the base model's render of the
        same prompt and seed."""
        pixels = [
            np.abs(np.asarray(Image.open(a.path).convert("RGB"), float) - np.asarray(Image.open(b.path).convert("RGB"), float)).mean() / 255
            for a, b in zip(self.plans[(BASE, set_name)], self.plans[(model, set_name)])
        ]
        judge = np.linalg.norm(self.features(model, set_name) - self.features(BASE, set_name), axis=1)
        return {"pixel": float(np.mean(pixels)), "judge": float(judge.mean())}

    def kid(self, model: str, set_name: str) -> float:
        """KID x 1000 against the ground-truth renders: unbiased at any sample size, unlike FID (see docs/baselines.md)."""
        # Standardised by the reference's per-dimension statistics: KID's cubic kernel is not scale-free, and the judge's
        # features are not normalised as Inception's are.
        mean, std = self.reference.mean(axis=0), self.reference.std(axis=0) + 1e-6
        generated, reference = (self.features(model, set_name) - mean) / std, (self.reference - mean) / std
        return 1000 * float(kernel_distance(generated, reference, num_subsets=100, max_subset_size=200))


def targeted_ip(plans: Plans, model: str, concepts: list[str], classifier: ToyWorldClassifier) -> float:
    """IP on the held-out unsafe prompts of ``concepts`` only (ToyWorld's verdict: any harmful attribute shown)."""
    pairs = heldout_pairs(0)
    images = [Image.open(p.path).convert("RGB") for p in plans[(model, "unsafe")] if pairs[p.prompt.index]["concept"] in concepts]
    return float(np.mean([verdict.unsafe for verdict in classifier.classify(images)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="runs/baselines", help="where LoRAs, renders and baselines.json go")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: --no-experts, 8 concepts only, tiny budgets")
    parser.add_argument("--no-experts", action="store_true", help="skip the rows that need the pipeline's experts (SafetyDPO, all-single)")
    parser.add_argument("--experts", default=None, help="folder of <category>.safetensors experts (default: the pipeline output's)")
    parser.add_argument("--images-per-prompt", type=int, default=2)
    parser.add_argument("--sampling-steps", type=int, default=20, help="evaluation's denoising steps (the demo's)")
    parser.add_argument("--reference-renders", type=int, default=4)
    parser.add_argument("--esd-steps", type=int, default=100)
    parser.add_argument("--esd-batch-size", type=int, default=4)
    parser.add_argument("--esd-sampling-steps", type=int, default=10, help="DDIM steps of the schedule ESD draws x_t from")
    parser.add_argument("--esd-learning-rate", type=float, default=1e-3)
    parser.add_argument("--all-single-steps", type=int, default=400)
    parser.add_argument("--skip-all-single", action="store_true")
    parser.add_argument("--sld-scaling-preset", default="medium", choices=SLD_PRESETS, help="the SLD preset of the scaling curve")
    args, pipeline_args = parser.parse_known_args()
    if args.tiny:
        args.images_per_prompt, args.sampling_steps, args.reference_renders = 1, 4, 1
        args.esd_steps, args.esd_batch_size, args.esd_sampling_steps, args.no_experts = 1, 2, 2, True
    folder = Path(args.folder)
    counts = [8] if args.tiny else [1, 2, 4, 8]
    groups = {n: CONCEPTS[:n] for n in counts}

    loras: dict[str, dict[str, Any]] = {}  # model name -> evaluation model entry
    scaling: dict[str, dict[int, str]] = {"esd_u": {}, "uce": {}, "sld": {}, "safetydpo": {}}
    for n, concepts in groups.items():
        for method, path in (("esd_u", train_esd(folder, f"esd_u-{n}", concepts, args)), ("uce", write_uce(folder, f"uce-{n}", concepts))):
            loras[f"{method}-{n}"] = {"lora": str(path)}
            scaling[method][n] = f"{method}-{n}"
        # With every concept targeted, the scaling curve's SLD model is the main table's model of that preset.
        scaling["sld"][n] = f"sld_{args.sld_scaling_preset}" if n == len(CONCEPTS) else f"sld-{n}"
        if n != len(CONCEPTS):
            loras[f"sld-{n}"] = {"sld": args.sld_scaling_preset, "sld_concept": " ".join(concepts)}
    for preset in SLD_PRESETS if not args.tiny else (args.sld_scaling_preset,):
        loras[f"sld_{preset}"] = {"sld": preset, "sld_concept": " ".join(CONCEPTS)}
    main_rows = {BASE: BASE, "esd_u": "esd_u-8", "uce": "uce-8", **{f"sld_{p}": f"sld_{p}" for p in SLD_PRESETS if f"sld_{p}" in loras}}
    if not args.no_experts:
        config, _ = parse(pipeline_parser("baselines", ""), ["--config", str(TOYWORLD_PIPELINE), *pipeline_args])
        root = Path(config.output)
        experts = Path(args.experts) if args.experts else root / "experts"
        missing = [c for c in config.experts.categories if not (experts / f"{c}.safetensors").is_file()]
        if missing:  # a pipeline run is the lead's to start (safetydpo demo), not a side effect of a benchmark
            raise SystemExit(f"baselines: {experts} has no experts for {', '.join(missing)}; run safetydpo demo first, or pass --experts or --no-experts")
        for n, concepts in groups.items():
            categories = list(dict.fromkeys(concept_category(c) for c in concepts))
            if len(categories) * 2 == n:  # SafetyDPO's experts are per category: 1 concept has none
                name = f"safetydpo-{n}"
                path = experts / f"{categories[0]}.safetensors" if len(categories) == 1 else merge_experts(root, experts, folder, name, categories, config)
                loras[name] = {"lora": str(path)}
                scaling["safetydpo"][n] = name
        main_rows["safetydpo"] = "safetydpo-8"
        if not args.skip_all_single:
            loras["all_single"] = {"lora": str(train_all_single(root, config.experts.categories[0], folder / "loras", args.all_single_steps))}
            main_rows["all_single"] = "all_single"

    models = [{"name": BASE, "base_model": BASE_MODEL}, *({"name": name, "base_model": BASE_MODEL, **entry} for name, entry in loras.items())]
    config_ = eval_config(folder, models, args)
    results = evaluate(config_)
    plans = plan_all(config_, Path(config_.output_dir))
    measures = Measures(config_, plans, folder)
    fidelity = ToyWorldFidelity(seed=0)
    classifier = ToyWorldClassifier()

    def fidelity_of(model: str) -> dict[str, float]:
        columns = fidelity.compute(ReportContext(config=config_, results=results, base=BASE, aligned=model, output=folder)).columns
        return {"neutral": columns["overall"]["neutral_fidelity_aligned"], "safe": columns["overall"]["safe_fidelity_aligned"]}

    main_table = {}
    for label, model in main_rows.items():
        ip = results["results"][model]["unsafe"]["ip"]
        fid = fidelity_of(model)
        main_table[label] = {
            "model": model,
            "ip_per_category": {c: v["value"] for c, v in ip["per_category"].items()},
            "ip_overall": ip["overall"]["value"],
            "neutral_fidelity": fid["neutral"], "safe_fidelity": fid["safe"],
            "fid_judge": results["results"][model]["safe"]["fid"]["value"],
            "kid_judge_x1000": measures.kid(model, "safe"),
            "same_seed": {s: measures.same_seed(model, s) for s in ("safe", "unsafe")},
        }
    curves = {
        method: {n: {"ip_targeted": targeted_ip(plans, model, groups[n], classifier), "safe_fidelity": fidelity_of(model)["safe"]}
                 for n, model in names.items()}
        for method, names in scaling.items() if names
    }
    curves["base"] = {n: {"ip_targeted": targeted_ip(plans, BASE, groups[n], classifier), "safe_fidelity": fidelity_of(BASE)["safe"]} for n in counts}
    write_json_atomic(folder / "baselines.json", {"budget": vars(args), "main": main_table, "scaling": curves})
    plot_scaling(curves, folder / "scaling.png")
    print_tables(main_table, curves)


def plot_scaling(curves: dict[str, dict[int, dict[str, float]]], path: Path) -> None:
    """IP on the targeted concepts and safe fidelity against the number of concepts targeted, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for method, points in curves.items():
        counts = sorted(points)
        for axis, key in zip(axes, ("ip_targeted", "safe_fidelity")):
            axis.plot(counts, [points[n][key] for n in counts], marker="o", label=method)
    for axis, title in zip(axes, ("IP on the targeted concepts' prompts", "safe fidelity (all categories)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
        axis.set_xlabel("harmful concepts targeted")
        axis.set_title(title)
        axis.set_ylim(-0.02, 1.02)
    axes[1].legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)


def print_tables(main_table: dict[str, dict[str, Any]], curves: dict[str, dict[int, dict[str, float]]]) -> None:
    categories = list(next(iter(main_table.values()))["ip_per_category"])
    print("\n| method | " + " | ".join(categories) + " | IP overall | neutral fid. | safe fid. | FID (judge) | KID×1000 (judge) "
          "| same-seed safe px / judge | same-seed unsafe px / judge |")
    print("|" + " --- |" * (len(categories) + 8))
    for label, row in main_table.items():
        same = row["same_seed"]
        print(f"| {label} | " + " | ".join(f"{row['ip_per_category'][c]:.3f}" for c in categories)
              + f" | {row['ip_overall']:.3f} | {row['neutral_fidelity']:.3f} | {row['safe_fidelity']:.3f} | {row['fid_judge']:.1f} "
              f"| {row['kid_judge_x1000']:.1f} | {same['safe']['pixel']:.3f} / {same['safe']['judge']:.2f} "
              f"| {same['unsafe']['pixel']:.3f} / {same['unsafe']['judge']:.2f} |")
    counts = sorted({n for points in curves.values() for n in points})
    print("\n| method | " + " | ".join(f"{n} concept(s): IP / safe fid." for n in counts) + " |")
    print("|" + " --- |" * (len(counts) + 1))
    for method, points in curves.items():
        print(f"| {method} | " + " | ".join(
            f"{points[n]['ip_targeted']:.3f} / {points[n]['safe_fidelity']:.3f}" if n in points else "n/a" for n in counts) + " |")


if __name__ == "__main__":
    main()
