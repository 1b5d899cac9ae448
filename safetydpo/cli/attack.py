"""``safetydpo attack``: the attacks of an evaluation config, without rendering the evaluation (docs/attacks.md).

An evaluation attacks only after planning every clean image and renders every model's adversarial images
afterwards. A transfer attack needs neither: attack one model here, writing the JSONL caches, then render
them with other models by an evaluation whose ``attacks[].replay`` names this run's ``attacks/LABEL``
folders; ``--replay`` checks such folders against a config's prompts in seconds, before that evaluation.
"""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ArgumentError, ArgumentParser

PROG = "safetydpo attack"


def attack_parser() -> ArgumentParser:
    """``--config``, the attack selection, the target, replay, and ``key=value`` overrides of the config."""
    parser = ArgumentParser(
        prog=PROG,
        description="Run the `attacks:` of an evaluation config against its target model (or --target), writing "
        "OUTPUT_DIR/attacks/LABEL/SET.jsonl and no images; a rerun resumes from those caches. With --replay, read another "
        "run's caches instead and check that they hold every chosen prompt (a transfer attack, rendered by "
        "`safetydpo evaluate` with attacks[].replay).",
        exit_on_error=False,
    )
    parser.add_argument("--config", type=str, help="evaluation YAML with an attacks section, e.g. configs/toyworld/eval.yaml")
    parser.add_argument("--only", type=list[str] | None, default=None, help="attack labels to run (default: every entry)")
    parser.add_argument("--target", type=str | None, default=None, help="the model (a models[].name) every attack runs against")
    parser.add_argument(
        "--replay", type=str | None, default=None, help="another run's attacks folder (OUTPUT_DIR/attacks): replay its LABEL/SET.jsonl"
    )
    parser.add_argument("overrides", nargs="*", type=str, default=[], help="key=value overrides of the config, e.g. output_dir=runs/x")
    return parser


def run(argv: list[str]) -> None:
    # Imported here, as in `safetydpo evaluate`: torch and diffusers would slow every other subcommand's start.
    import dataclasses

    from safetydpo.devices import resolve_device
    from safetydpo.evaluation.attacks import objective_summary, run_attacks
    from safetydpo.evaluation.config import attacked_sets, load_config
    from safetydpo.evaluation.errors import EvaluationError
    from safetydpo.evaluation.prompts.base import load_prompt_set

    parser = attack_parser()
    try:
        args = parser.parse_args(argv)
    except ArgumentError as err:
        parser.exit(2, f"{PROG}: error: {' '.join(str(err).split())}\n")
    try:
        config = load_config(args.config, args.overrides)
        labels = [attack.key for attack in config.attacks]
        if not labels:
            raise EvaluationError(f"{args.config} has no attacks section; add one (docs/attacks.md) or pick another config")
        unknown = sorted(set(args.only or ()) - set(labels))
        if unknown:
            raise EvaluationError(f"--only: no attack labelled {', '.join(unknown)}; valid choices: {', '.join(labels)}")
        if args.target is not None and args.target not in [model.name for model in config.models]:
            raise EvaluationError(f"--target: '{args.target}' is not one of the models: {', '.join(m.name for m in config.models)}")
        config.attacks = [
            dataclasses.replace(
                attack,
                target=args.target or attack.target,
                replay=str(Path(args.replay) / attack.key) if args.replay else attack.replay,
            )
            for attack in config.attacks
            if args.only is None or attack.key in args.only
        ]
        wanted = {name for attack in config.attacks for name in attacked_sets(config, attack)}
        prompts = {
            s.name: load_prompt_set(s.source, s.path, s.options, s.categories, s.limit, f"prompt_sets.{s.name}")
            for s in config.prompt_sets
            if s.name in wanted
        }
        runs = run_attacks(config, prompts, Path(config.output_dir), resolve_device(config.device, "device", EvaluationError))
    except EvaluationError as err:
        parser.exit(2, f"{PROG}: error: {err}\n")
    for attack_run in runs:
        summary = objective_summary(attack_run.entries)
        direction = "higher" if summary["higher_is_better"] else "lower"
        how = "replayed from" if attack_run.config.replay else "cached in"
        print(
            f"{attack_run.label}/{attack_run.set_name}: {len(attack_run.entries)} prompts attacked on "
            f"'{attack_run.entries[0].target.get('name')}', objective ({direction} is better) {summary['start']['value']:.4f} -> "
            f"{summary['final']['value']:.4f}, improved on {summary['improved_share']:.0%}; {how} {attack_run.cache}"
        )
