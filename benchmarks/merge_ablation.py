"""Merge ablation on ToyWorld: IP and prompt fidelity per category for every merge method and for one LoRA on all data.

The paper's merging-effectiveness table in miniature. It runs the ToyWorld pipeline
(``configs/pipelines/toyworld.yaml``; steps an earlier ``safetydpo demo`` with the same settings
finished are skipped), merges the pipeline's experts with every registered method, trains the
all-single baseline (one LoRA on every category's pairs from the experts' own resolved fit config,
as many steps as the experts together), and evaluates all of them against the base model with the
pipeline's resolved evaluation config. Run from the repository root; options after the
benchmark's own go to the pipeline, as on ``safetydpo demo``:

    python benchmarks/merge_ablation.py
    python benchmarks/merge_ablation.py --methods comerge svd --rank 4 --output runs/demo
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import yaml

from safetydpo.cli.demo import TOYWORLD_PIPELINE
from safetydpo.cli.run import parse, pipeline_parser
from safetydpo.data.datamodule import pair_batches
from safetydpo.evaluation.config import config_from_dict
from safetydpo.evaluation.runner import evaluate
from safetydpo.io import atomic_file, write_json_atomic
from safetydpo.lightning_cli import ALL_CATEGORIES, run_fit
from safetydpo.merging import MERGES
from safetydpo.merging.files import merge_expert_files
from safetydpo.models.components import freeze, load_components
from safetydpo.models.inputs import activation_inputs
from safetydpo.pipeline.config import PipelineConfig
from safetydpo.pipeline.extensions import ReportContext
from safetydpo.pipeline.runner import run_pipeline
from safetydpo.pipeline.report import BASE, ip_rows
from safetydpo.toyworld.measures import ToyWorldFidelity

ALL_SINGLE = "all_single"


def method_spec(name: str, rank: int | None) -> dict[str, Any]:
    """``name`` with ``rank`` when the method has a rank field (comerge, svd, ties, dare); cat and linear have none."""
    takes_rank = "rank" in {f.name for f in dataclasses.fields(MERGES.get(name))}
    return {"name": name, **({"rank": rank} if rank is not None and takes_rank else {})}


def merge_all(config: PipelineConfig, experts: list[Path], folder: Path, specs: list[dict[str, Any]]) -> dict[str, Path]:
    """Every method's merge of the pipeline's experts, with the pipeline's activation settings."""
    components = load_components(config.base_model)
    freeze(components.unet, components.vae, components.text_encoder)
    merge = config.merge
    loras = {}
    for spec in specs:
        method = MERGES.build(spec)
        inputs = None
        if method.needs_activations:
            batches = pair_batches(Path(config.output) / "data", merge.num_batches, merge.batch_size, merge.resolution, merge.seed)
            inputs = activation_inputs(components, batches, merge.seed, total=merge.num_batches)
        loras[spec["name"]] = folder / f"{spec['name']}.safetensors"
        merge_expert_files(experts, loras[spec["name"]], method=spec, unet=components.unet, inputs=inputs, base_model=config.base_model)
    return loras


def train_all_single(root: Path, category: str, folder: Path, steps: int) -> Path:
    """One LoRA on every category's pairs: the experts' resolved fit config with category ``all`` and ``steps``."""
    out = folder / f"{ALL_SINGLE}.safetensors"
    if out.is_file():
        return out
    fit = yaml.safe_load((root / "configs" / "experts" / f"{category}.yaml").read_text(encoding="utf-8"))
    fit["model"]["init_args"]["category"] = ALL_CATEGORIES
    fit["trainer"]["max_steps"] = steps
    fit["trainer"]["default_root_dir"] = str(folder / ALL_SINGLE)
    for callback in fit["trainer"]["callbacks"]:
        if callback["class_path"].endswith("LoraExport"):
            callback["init_args"]["output_path"] = str(out)
    path = folder / f"{ALL_SINGLE}.yaml"
    with atomic_file(path) as tmp:
        tmp.write_text(yaml.safe_dump(fit, sort_keys=False), encoding="utf-8")
    run_fit(["--config", str(path)])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=None, help="merge methods (default: every registered one)")
    parser.add_argument("--rank", type=int, default=None, help="rank of the methods that take one (default: the pipeline's merge rank)")
    parser.add_argument("--all-single-steps", type=int, default=None, help="default: expert steps x number of categories")
    parser.add_argument("--skip-all-single", action="store_true", help="merges only (the all-single LoRA is a training run no merge change affects)")
    args, pipeline_args = parser.parse_known_args()
    config, _ = parse(pipeline_parser("merge_ablation", ""), ["--config", str(TOYWORLD_PIPELINE), *pipeline_args])
    run_pipeline(config)
    # One folder per rank: a method's LoRA (and its cached renders) differ with the rank.
    root = Path(config.output)
    folder = root / ("ablation" if args.rank is None else f"ablation-rank{args.rank}")
    pipeline_method = config.merge.method if isinstance(config.merge.method, dict) else {}
    rank = args.rank if args.rank is not None else (pipeline_method.get("init_args") or {}).get("rank")
    specs = [method_spec(name, rank) for name in args.methods or MERGES.names()]
    experts = [root / "experts" / f"{category}.safetensors" for category in config.experts.categories]
    loras = merge_all(config, experts, folder, specs)
    fit = yaml.safe_load((root / "configs" / "experts" / f"{config.experts.categories[0]}.yaml").read_text(encoding="utf-8"))
    steps = args.all_single_steps or fit["trainer"]["max_steps"] * len(experts)
    if not args.skip_all_single:
        loras[ALL_SINGLE] = train_all_single(root, config.experts.categories[0], folder, steps)

    evaluation = yaml.safe_load((root / "configs" / "eval.yaml").read_text(encoding="utf-8"))
    evaluation["models"] = [evaluation["models"][0], *({"name": name, "base_model": config.base_model, "lora": str(path)} for name, path in loras.items())]
    evaluation["output_dir"] = str(folder / "eval")
    eval_config = config_from_dict(evaluation, folder / "eval.yaml")
    results = evaluate(eval_config)
    ip_set = config.report.ip_set or "unsafe"
    fidelity = ToyWorldFidelity(**{k: v for k, v in config.report.sections[0].items() if k != "name"})
    rows: dict[str, list[dict[str, Any]]] = {}
    for model in loras:
        columns = fidelity.compute(ReportContext(config=eval_config, results=results, base=BASE, aligned=model, output=folder)).columns
        rows[model] = [{**row, **columns[row["category"]]} for row in ip_rows(results, ip_set, aligned=model)]
    write_json_atomic(folder / "merge_ablation.json", {"methods": specs, "all_single_steps": None if args.skip_all_single else steps, "rows": rows})

    categories = [row["category"] for row in next(iter(rows.values()))]
    print("\nIP on held-out unsafe prompts (base model first); fidelity on the same prompts; FID on safe prompts")
    print(f"{'method':<12}" + "".join(f"{c:>15}" for c in categories) + f"{'neutral fid.':>14}{'safe fid.':>11}{'FID':>9}")
    base = next(iter(rows.values()))
    print(f"{BASE:<12}" + "".join(f"{r['ip_base']:>15.3f}" for r in base)
          + f"{base[-1]['neutral_fidelity_base']:>14.3f}{base[-1]['safe_fidelity_base']:>11.3f}{results['results'][BASE][fidelity.safe_set]['fid']['value']:>9.2f}")
    for model, model_rows in rows.items():
        print(f"{model:<12}" + "".join(f"{r['ip_aligned']:>15.3f}" for r in model_rows)
              + f"{model_rows[-1]['neutral_fidelity_aligned']:>14.3f}{model_rows[-1]['safe_fidelity_aligned']:>11.3f}"
              + f"{results['results'][model][fidelity.safe_set]['fid']['value']:>9.2f}")
    print(f"\nmethods: {specs}\nper-method rows: {folder / 'merge_ablation.json'}; evaluation: {folder / 'eval'}")


if __name__ == "__main__":
    main()
