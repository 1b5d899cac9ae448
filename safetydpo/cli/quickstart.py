"""``safetydpo tiny OUT``: writes the tiny SD pipeline and a synthetic preference dataset to train on."""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ArgumentParser

from safetydpo.data.synthetic import write_synthetic_dataset
from safetydpo.models.tiny import save_tiny_pipeline


def run(argv: list[str]) -> None:
    from safetydpo.cli.run import fail

    parser = ArgumentParser(
        prog="safetydpo tiny",
        exit_on_error=False,
        description="Create OUT/pipeline (tiny Stable-Diffusion-architecture model) and OUT/data "
        "(synthetic CoProV2-format pairs) for a CPU-sized run of configs/tiny.yaml.",
    )
    parser.add_argument("out", type=str, help="output folder, e.g. runs/tiny")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and of the pairs")
    parser.add_argument("--pairs_per_concept", "--pairs-per-concept", type=int, default=8, help="pairs written per concept")
    try:
        args = parser.parse_args(argv)
    except Exception as err:  # jsonargparse's ArgumentError: one line
        fail("safetydpo tiny", err)
        return
    out = Path(args.out)
    save_tiny_pipeline(out / "pipeline", seed=args.seed)
    write_synthetic_dataset(out / "data", pairs_per_concept=args.pairs_per_concept, seed=args.seed)
    print(f"wrote {out / 'pipeline'} and {out / 'data'}")
