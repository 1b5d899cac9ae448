"""Attacks in an evaluation: adversarial prompts per (attack, prompt set), rendered and judged like clean prompts.

Each attack entry attacks the chosen prompts of its prompt sets against its target model (or replays
another run's cache), one cache line per prompt. Adversarial prompts keep the clean prompt's row,
categories and seeds, so every model renders them through the same planning, image cache and
classifiers as the clean set, and the attack success rate (IP under attack) sits beside the clean IP
of exactly the same prompts and seeds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safetydpo.attacks import ATTACKS, AttackError, AttackTarget
from safetydpo.attacks.cache import CachedAttack, append_entry, check_reuse, read_cache, reusable
from safetydpo.attacks.target import load_target
from safetydpo.evaluation.classifiers import SafetyClassifier
from safetydpo.evaluation.classify import classify_images
from safetydpo.evaluation.config import AttackConfig, EvalConfig, ModelConfig, attack_target, attacked_sets
from safetydpo.evaluation.errors import EvaluationError
from safetydpo.evaluation.generate import PlannedImage, lora_identity, plan_images
from safetydpo.evaluation.grid import write_grid
from safetydpo.evaluation.ip import bootstrap_mean
from safetydpo.evaluation.prompts import EvalPrompt
from safetydpo.evaluation.results import ip_breakdown, set_results
from safetydpo.progress import progress_bar
from safetydpo.seeding import derive_seed

#: Folder under ``output_dir`` holding one cache folder per attack label.
ATTACKS_FOLDER = "attacks"


@dataclass
class AttackRun:
    """One attack on one prompt set: the prompts attacked and, per prompt, the cached result."""

    config: AttackConfig
    set_name: str
    target: str
    cache: Path
    prompts: list[EvalPrompt]
    entries: list[CachedAttack]

    @property
    def label(self) -> str:
        return self.config.key

    def adversarial_prompts(self) -> list[EvalPrompt]:
        """The clean prompts with their text replaced by the adversarial one (row, categories and seed kept)."""
        return [dataclasses.replace(p, text=e.adversarial_prompt) for p, e in zip(self.prompts, self.entries)]

    def plan(self, config: EvalConfig, model: str, root: Path, images_per_prompt: int) -> list[PlannedImage]:
        """``model``'s images of the adversarial prompts (``images/MODEL/SET@LABEL``; ``@`` is in no set name)."""
        count = self.config.images_per_prompt or images_per_prompt
        return plan_images(self.adversarial_prompts(), count, config.generation, root / "images" / model / f"{self.set_name}@{self.label}")


def select_prompts(prompts: list[EvalPrompt], attack: AttackConfig) -> list[EvalPrompt]:
    """The first ``prompts_per_category`` prompts of each category (a prompt counts for its first), then ``limit``."""
    chosen = prompts
    if attack.prompts_per_category is not None:
        seen: dict[str, int] = {}
        chosen = []
        for prompt in prompts:
            category = prompt.categories[0] if prompt.categories else ""
            if seen.get(category, 0) < attack.prompts_per_category:
                seen[category] = seen.get(category, 0) + 1
                chosen.append(prompt)
    return chosen[: attack.limit] if attack.limit is not None else chosen


def target_identity(model: ModelConfig) -> dict[str, Any]:
    """What identifies the attacked weights in the cache: name, pipeline folder and the LoRA's content hash."""
    return {
        "name": model.name,
        "base_model": str(Path(model.base_model).expanduser().resolve()),
        "lora_content_sha256": lora_identity(model),
    }


def run_attacks(config: EvalConfig, prompts: dict[str, list[EvalPrompt]], root: Path, device: torch.device) -> list[AttackRun]:
    """Every (attack, prompt set): reuse cached prompts, attack the rest (or replay a cache); refuses bad input before work."""
    models = {model.name: model for model in config.models}
    runs = []
    for attack_config in config.attacks:
        for set_name in attacked_sets(config, attack_config):
            chosen = select_prompts(prompts[set_name], attack_config)
            if not chosen:
                raise EvaluationError(
                    f"attacks.{attack_config.key}: prompt set '{set_name}' leaves no prompt to attack; check its file, limit and categories"
                )
            runs.append(AttackRun(attack_config, set_name, attack_target(config, attack_config), Path(), chosen, []))
    targets: dict[str, AttackTarget] = {}
    for run in runs:
        try:
            if run.config.replay:
                _replay(run)
            else:
                _attack(run, models[run.target], targets, root, device)
        except AttackError as err:
            raise EvaluationError(f"attacks.{run.label}: {err}") from None
    targets.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return runs


def _replay(run: AttackRun) -> None:
    """Take every chosen prompt's adversarial prompt from another run's cache (matched by row and text)."""
    run.cache = Path(run.config.replay or "").expanduser() / f"{run.set_name}.jsonl"
    if not run.cache.is_file():
        raise AttackError(f"replay: no cache {run.cache}; point replay at another evaluation's attacks/LABEL folder")
    cached = {entry.prompt_index: entry for entry in read_cache(run.cache)}
    for prompt in run.prompts:
        entry = cached.get(prompt.index)
        if entry is None or entry.prompt != prompt.text:
            raise AttackError(
                f"replay: {run.cache} has no line for prompt #{prompt.index} '{prompt.text[:60]}'; "
                "replay a cache of the same prompt set and selection, or attack here (drop replay)"
            )
        run.entries.append(entry)


def _attack(run: AttackRun, model: ModelConfig, targets: dict[str, AttackTarget], root: Path, device: torch.device) -> None:
    """Attack the chosen prompts not in the cache yet, appending one line per finished prompt."""
    attack = ATTACKS.build(run.config.name, **run.config.args)
    run.cache = root / ATTACKS_FOLDER / run.label / f"{run.set_name}.jsonl"
    identity = target_identity(model)
    cached = reusable(read_cache(run.cache), run.cache, attack.registry_name, identity)
    todo = [prompt for prompt in run.prompts if prompt.index not in cached]
    if todo and run.target not in targets:
        targets[run.target] = load_target(model.name, model.base_model, model.lora, device)
    if todo:
        attack.check(targets[run.target])
    with progress_bar(total=len(run.prompts), desc=f"attack {run.label}/{run.set_name}", unit="prompt", initial=len(run.prompts) - len(todo)) as bar:
        for prompt in run.prompts:
            focused = attack.for_categories(prompt.categories)
            if prompt.index in cached:
                check_reuse(cached[prompt.index], run.cache, prompt.text, focused.budget())
                run.entries.append(cached[prompt.index])
                continue
            seed = derive_seed("attack", focused.budget().get("seed", 0), prompt.index, prompt.text)
            outcome = focused.attack(prompt.text, targets[run.target], torch.Generator().manual_seed(seed))
            entry = CachedAttack.from_outcome(prompt.text, prompt.index, attack.registry_name, identity, focused.budget(), seed, outcome)
            append_entry(run.cache, entry)
            run.entries.append(entry)
            bar.update(1)


def objective_summary(entries: list[CachedAttack]) -> dict[str, Any]:
    """Mean objective before and after the search, and the share of prompts the search improved."""
    improved = [(e.objective > e.history[0]) if e.higher_is_better else (e.objective < e.history[0]) for e in entries]
    return {
        "higher_is_better": entries[0].higher_is_better,
        "start": bootstrap_mean([e.history[0] for e in entries]).as_dict(),
        "final": bootstrap_mean([e.objective for e in entries]).as_dict(),
        "improved_share": sum(improved) / len(improved),
    }


def clean_ip(clean: list[PlannedImage], flags: list[bool], indices: set[int], count: int, resamples: int) -> dict[str, Any]:
    """IP of the clean images of the attacked prompts, first ``count`` seeds each (the adversarial images' seeds)."""
    shown: dict[int, int] = {}
    images, chosen = [], []
    for image, flag in zip(clean, flags):
        if image.prompt.index in indices and shown.get(image.prompt.index, 0) < count:
            shown[image.prompt.index] = shown.get(image.prompt.index, 0) + 1
            images.append(image)
            chosen.append(flag)
    return ip_breakdown(images, chosen, resamples)


AttackPlans = dict[tuple[int, str], list[PlannedImage]]


def plan_attack_images(config: EvalConfig, runs: list[AttackRun], root: Path) -> AttackPlans:
    """Every model's images of every run's adversarial prompts, keyed by (run position, model name)."""
    sets = {s.name: s for s in config.prompt_sets}
    return {
        (position, model.name): run.plan(config, model.name, root, sets[run.set_name].images_per_prompt)
        for position, run in enumerate(runs)
        for model in config.models
    }


def score_attacks(
    runs: list[AttackRun],
    attack_plans: AttackPlans,
    clean_plans: dict[tuple[str, str], list[PlannedImage]],
    payload: dict[str, Any],
    config: EvalConfig,
    classifiers: dict[str, SafetyClassifier],
    root: Path,
) -> dict[str, Any]:
    """``results.json``'s ``attacks``: per attack and prompt set, each model's IP under attack beside its clean IP."""
    report: dict[str, Any] = {}
    for position, run in enumerate(runs):
        entry = report.setdefault(run.label, {
            "attack": run.config.name,
            "args": dict(run.config.args),
            "target": run.target,
            "replay": run.config.replay,
            "prompt_sets": {},
        })
        indices = {prompt.index for prompt in run.prompts}
        results = {}
        for model in config.models:
            planned = attack_plans[(position, model.name)]
            verdicts = classify_images([image.path for image in planned], classifiers, config.ip.batch_size, f"classify {model.name}/{run.set_name}@{run.label}")
            clean = clean_plans[(model.name, run.set_name)]
            flags = [record["unsafe"] for prompt in payload["results"][model.name][run.set_name]["prompts"] for record in prompt["images"]]
            count = len(planned) // len(run.prompts)  # adversarial images per prompt, seeds first, first+1, ...
            results[model.name] = {
                "clean_ip": clean_ip(clean, flags, indices, count, config.bootstrap_resamples),
                "attacked": set_results(planned, root, verdicts, None, None, config.bootstrap_resamples),
            }
        cache = run.cache.relative_to(root) if run.cache.is_relative_to(root) else run.cache
        entry["prompt_sets"][run.set_name] = {
            "cache": str(cache),
            "num_prompts": len(run.prompts),
            "attacked_model": run.entries[0].target.get("name"),
            "objective": objective_summary(run.entries),
            "results": results,
        }
    return report


def attack_grid_rows(
    config: EvalConfig, run: AttackRun, position: int, attack_plans: AttackPlans, clean_plans: dict[tuple[str, str], list[PlannedImage]]
) -> list[tuple[str, list[Path]]]:
    """The first ``grid.rows`` attacked prompts, ``grid.seeds`` seeds each: every model's clean and adversarial image."""
    rows: list[tuple[str, list[Path]]] = []
    shown: dict[int, int] = {}
    first = config.models[0].name
    clean = {m.name: {(c.prompt.index, c.seed): c.path for c in clean_plans[(m.name, run.set_name)]} for m in config.models}
    for place, image in enumerate(attack_plans[(position, first)]):
        index = image.prompt.index
        if index not in shown and len(shown) == config.grid.rows:
            break
        if shown.setdefault(index, 0) >= config.grid.seeds or (index, image.seed) not in clean[first]:
            continue  # a seed the clean set did not render has nothing to compare with
        shown[index] += 1
        cells = [path for model in config.models for path in (clean[model.name][(index, image.seed)], attack_plans[(position, model.name)][place].path)]
        rows.append((f"#{index} seed {image.seed}", cells))
    return rows


def write_attack_grids(
    config: EvalConfig, runs: list[AttackRun], attack_plans: AttackPlans, clean_plans: dict[tuple[str, str], list[PlannedImage]],
    payload: dict[str, Any], root: Path,
) -> None:
    """One grid per (attack, prompt set) under ``grids/attacks/``, its path recorded in ``payload``."""
    for position, run in enumerate(runs):
        columns = [name for model in config.models for name in (model.name, f"{model.name} {run.label}")]
        grid = root / "grids" / ATTACKS_FOLDER / f"{run.label}-{run.set_name}.png"
        write_grid(columns, attack_grid_rows(config, run, position, attack_plans, clean_plans), grid, config.grid.cell_size)
        payload["attacks"][run.label]["prompt_sets"][run.set_name]["grid"] = str(grid.relative_to(root))
