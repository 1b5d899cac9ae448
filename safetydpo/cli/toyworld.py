"""``safetydpo toyworld pretrain | train-judge | fidelity``: build and check the embedded ToyWorld."""

from __future__ import annotations

import json
import time
from dataclasses import fields
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from jsonargparse import ArgumentParser, Namespace, set_parsing_settings

from safetydpo.toyworld.classifier import ToyWorldClassifier
from safetydpo.toyworld.judge import DEFAULT_JUDGE, judge_accuracy, save_judge, train_judge
from safetydpo.toyworld.pretrain import DEFAULT_PIPELINE, PretrainSettings, pretrain
from safetydpo.toyworld.sampling import heldout_fidelity

PROG = "safetydpo toyworld"


def _pretrain(args: Namespace) -> None:
    settings = PretrainSettings(**{f.name: args[f.name] for f in fields(PretrainSettings)})
    started = time.perf_counter()
    pipe = pretrain(Path(args.out), settings)
    minutes = (time.perf_counter() - started) / 60
    print(f"wrote {args.out} in {minutes:.1f} min ({torch.get_num_threads()} threads)")
    scores = heldout_fidelity(pipe, ToyWorldClassifier(args.judge), count=args.check_samples)
    print("held-out prompt fidelity:", json.dumps({k: round(v, 4) for k, v in scores.items()}))


def _train_judge(args: Namespace) -> None:
    net = train_judge(args.steps, seed=args.seed)
    save_judge(net, Path(args.out))
    accuracy = judge_accuracy(net, seed=args.seed + 1000, count=args.check_samples)
    print(f"wrote {args.out}; accuracy on {args.check_samples} fresh renders:", json.dumps({k: round(v, 4) for k, v in accuracy.items()}))


def _fidelity(args: Namespace) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(args.base_model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    scores = heldout_fidelity(pipe, ToyWorldClassifier(args.judge), count=args.samples, seed=args.seed)
    print(json.dumps({k: round(v, 4) for k, v in scores.items()}))


def toyworld_parser() -> ArgumentParser:
    """``pretrain``, ``train-judge`` and ``fidelity``, each its own jsonargparse parser."""
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(prog=PROG, description="Build and check the embedded ToyWorld.", exit_on_error=False)
    commands = parser.add_subcommands(dest="command")

    pre = ArgumentParser(exit_on_error=False)
    pre.add_argument("--out", type=str, default=str(DEFAULT_PIPELINE), help="pipeline folder to write")
    pre.add_argument("--judge", type=str | None, default=None, help="judge weights for the closing fidelity check (default: committed)")
    pre.add_argument("--check_samples", "--check-samples", type=int, default=256, help="held-out prompts of the closing check")
    pre.add_class_arguments(PretrainSettings, as_group=False)  # --seed, --vae_steps, ... (the committed recipe by default)
    commands.add_subcommand("pretrain", pre, help="train the ToyWorld SD pipeline from scratch (VAE, then UNet + text encoder)")

    judge = ArgumentParser(exit_on_error=False)
    judge.add_argument("--out", type=str, default=str(DEFAULT_JUDGE), help="judge weights file to write")
    judge.add_argument("--steps", type=int, default=600, help="training steps")
    judge.add_argument("--seed", type=int, default=0, help="seed of the training renders")
    judge.add_argument("--check_samples", "--check-samples", type=int, default=2000, help="fresh renders of the accuracy check")
    commands.add_subcommand("train-judge", judge, help="train the ToyWorld concept judge (CNN) and report its accuracy")

    fid = ArgumentParser(exit_on_error=False)
    fid.add_argument("--base_model", "--base-model", type=str, default=str(DEFAULT_PIPELINE), help="diffusers pipeline folder")
    fid.add_argument("--judge", type=str | None, default=None, help="judge weights (default: committed)")
    fid.add_argument("--samples", type=int, default=256, help="held-out prompts")
    fid.add_argument("--seed", type=int, default=0, help="sampling seed")
    commands.add_subcommand("fidelity", fid, help="share of held-out prompts whose attributes the judge finds in the samples")
    return parser


def run(argv: list[str]) -> None:
    from safetydpo.cli.run import fail

    handlers = {"pretrain": _pretrain, "train-judge": _train_judge, "fidelity": _fidelity}
    try:
        parsed = toyworld_parser().parse_args(argv)
    except Exception as err:  # jsonargparse's ArgumentError: one line
        fail(PROG, err)
        return
    handlers[parsed.command](parsed[parsed.command])
