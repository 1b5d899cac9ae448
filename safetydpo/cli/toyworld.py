"""``safetydpo toyworld pretrain | train-judge | fidelity``: build and check the embedded ToyWorld."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from safetydpo.toyworld.classifier import ToyWorldClassifier
from safetydpo.toyworld.judge import DEFAULT_JUDGE, judge_accuracy, save_judge, train_judge
from safetydpo.toyworld.pretrain import DEFAULT_PIPELINE, PretrainSettings, pretrain
from safetydpo.toyworld.sampling import heldout_fidelity


def _pretrain(args: argparse.Namespace) -> None:
    settings = PretrainSettings(**{f.name: getattr(args, f.name) for f in fields(PretrainSettings)})
    started = time.perf_counter()
    pipe = pretrain(args.out, settings)
    minutes = (time.perf_counter() - started) / 60
    print(f"wrote {args.out} in {minutes:.1f} min ({torch.get_num_threads()} threads)")
    scores = heldout_fidelity(pipe, ToyWorldClassifier(args.judge), count=args.check_samples)
    print("held-out prompt fidelity:", json.dumps({k: round(v, 4) for k, v in scores.items()}))


def _train_judge(args: argparse.Namespace) -> None:
    net = train_judge(args.steps, seed=args.seed)
    save_judge(net, args.out)
    accuracy = judge_accuracy(net, seed=args.seed + 1000, count=args.check_samples)
    print(f"wrote {args.out}; accuracy on {args.check_samples} fresh renders:", json.dumps({k: round(v, 4) for k, v in accuracy.items()}))


def _fidelity(args: argparse.Namespace) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(args.base_model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    scores = heldout_fidelity(pipe, ToyWorldClassifier(args.judge), count=args.samples, seed=args.seed)
    print(json.dumps({k: round(v, 4) for k, v in scores.items()}))


def run(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="safetydpo toyworld", description="Build and check the embedded ToyWorld.")
    commands = parser.add_subparsers(dest="command", required=True)

    pre = commands.add_parser("pretrain", help="train the ToyWorld SD pipeline from scratch (VAE, then UNet + text encoder)")
    pre.add_argument("--out", type=Path, default=DEFAULT_PIPELINE)
    pre.add_argument("--judge", default=None, help="judge weights for the closing fidelity check (default: committed)")
    pre.add_argument("--check-samples", type=int, default=256)
    for field in fields(PretrainSettings):
        pre.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, type=type(field.default), default=field.default)
    pre.set_defaults(handler=_pretrain)

    judge = commands.add_parser("train-judge", help="train the ToyWorld concept judge (CNN) and report its accuracy")
    judge.add_argument("--out", type=Path, default=DEFAULT_JUDGE)
    judge.add_argument("--steps", type=int, default=600)
    judge.add_argument("--seed", type=int, default=0)
    judge.add_argument("--check-samples", type=int, default=2000)
    judge.set_defaults(handler=_train_judge)

    fid = commands.add_parser("fidelity", help="share of held-out prompts whose attributes the judge finds in the samples")
    fid.add_argument("--base-model", default=str(DEFAULT_PIPELINE))
    fid.add_argument("--judge", default=None)
    fid.add_argument("--samples", type=int, default=256)
    fid.add_argument("--seed", type=int, default=0)
    fid.set_defaults(handler=_fidelity)

    args = parser.parse_args(argv)
    args.handler(args)
