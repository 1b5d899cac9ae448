"""Merge ablation on ToyWorld: IP per category for every merge method and for one LoRA on all data.

The paper's merging-effectiveness table in miniature. It reuses a ``safetydpo demo`` output folder
(its pairs and per-category experts; both are made first if missing), merges the experts with every
registered method, trains the all-single baseline (one LoRA on every category's pairs, as many
steps as the experts together), and evaluates all of them against the base model with the same
evaluation code and seeds as the demo.

    python benchmarks/merge_ablation.py --output runs/demo
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safetydpo.cli.demo import add_settings_arguments, settings_from
from safetydpo.evaluation.classifiers.toyworld import ToyWorldJudge
from safetydpo.evaluation.config import load_config
from safetydpo.evaluation.runner import evaluate
from safetydpo.io import write_json_atomic
from safetydpo.merging import MERGES
from safetydpo.merging.pipeline import merge_expert_files
from safetydpo.toyworld.demo import (
    DemoSettings, build_pairs, demo_merge, eval_config, summarize, toyworld_fidelity, train_expert, write_heldout,
)
from safetydpo.toyworld.world import CATEGORIES, RESOLUTION


def prepare(settings: DemoSettings, root: Path, all_single_steps: int) -> tuple[Path, list[Path], Path]:
    """The demo's pairs and experts (made if missing) and the all-single LoRA."""
    data_dir = root / "coprov2"
    if not (data_dir / "manifest.json").exists():
        data_dir = build_pairs(settings, root)
    experts = []
    for category in CATEGORIES:
        path = root / "experts" / f"{category}.safetensors"
        experts.append(path if path.exists() else train_expert(settings, data_dir, path, category))
    all_single = root / "ablation" / "all_single.safetensors"
    if not all_single.exists():
        train_expert(settings, data_dir, all_single, "all", steps=all_single_steps)
    return data_dir, experts, all_single


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_settings_arguments(parser)  # --output (a demo folder, made if missing) and every demo size
    parser.add_argument("--methods", nargs="+", default=None, help="merge methods (default: every registered one)")
    parser.add_argument("--all-single-steps", type=int, default=None, help="default: expert steps x number of categories")
    args = parser.parse_args()

    settings = settings_from(args)
    root = Path(settings.output)
    data_dir, experts, all_single = prepare(settings, root, args.all_single_steps or settings.expert_steps * len(CATEGORIES))
    loras: dict[str, Path] = {}
    for method in args.methods or MERGES.names():
        loras[method] = root / "ablation" / f"{method}.safetensors"
        merge_expert_files(experts, loras[method], method=demo_merge(settings, method), pretrained_model_name_or_path=settings.pipeline,
                           data_dir=str(data_dir), num_batches=settings.merge_batches, batch_size=settings.batch_size,
                           resolution=RESOLUTION, seed=settings.seed, device="cpu")
    loras["all_single"] = all_single
    table, reference = write_heldout(settings, root)
    config_path = eval_config(settings, root / "ablation", loras, table, reference, name="eval")
    payload = evaluate(load_config(config_path))
    scores = toyworld_fidelity(settings, config_path, ToyWorldJudge())
    results = {model: summarize(payload, scores, aligned=model) for model in loras}
    write_json_atomic(root / "ablation" / "merge_ablation.json", {"settings": vars(args), "rows": results})

    header = f"{'method':<12}" + "".join(f"{c:>15}" for c in [*CATEGORIES, "overall"]) + f"{'neutral fid.':>14}{'safe fid.':>11}{'FID':>9}"
    print(f"\nIP on held-out unsafe prompts (base model first); fidelity on the same prompts; FID on safe prompts\n{header}")
    base_rows = next(iter(results.values()))
    print(f"{'base':<12}" + "".join(f"{r['ip_base']:>15.3f}" for r in base_rows)
          + f"{base_rows[-1]['unsafe_fidelity_base']:>14.3f}{base_rows[-1]['safe_fidelity_base']:>11.3f}"
          + f"{payload['results']['base']['safe']['fid']['value']:>9.2f}")
    for model, rows in results.items():
        print(f"{model:<12}" + "".join(f"{r['ip_aligned']:>15.3f}" for r in rows)
              + f"{rows[-1]['unsafe_fidelity_aligned']:>14.3f}{rows[-1]['safe_fidelity_aligned']:>11.3f}"
              + f"{payload['results'][model]['safe']['fid']['value']:>9.2f}")
    print(f"\nper-method rows: {root / 'ablation' / 'merge_ablation.json'}; evaluation: {root / 'ablation' / 'eval'}")


if __name__ == "__main__":
    main()
