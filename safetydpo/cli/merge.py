"""``safetydpo merge``: merge expert LoRA files with Co-Merge or a baseline method (see docs/merging.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

PROG = "safetydpo merge"


def merge_parser() -> ArgumentParser:
    """Every option also reads from ``--config merge.yaml`` (keys with underscores)."""
    parser = ArgumentParser(prog=PROG, description="Merge safety-expert LoRA files into one LoRA.", exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the keys below")
    parser.add_argument("--experts", nargs="+", type=str, required=True, help="expert .safetensors files (LoraExport output)")
    parser.add_argument("--out", type=str, required=True, help="merged LoRA path (.safetensors); a .json model card is written beside it")
    parser.add_argument(
        "--method", type=str | dict[str, Any], default="comerge",
        help="registered merge name, or a spec such as '{name: comerge, rank: 4}' (names: safetydpo --help)",
    )
    parser.add_argument("--args", type=dict[str, Any], default={}, help="arguments of a named method, e.g. '{density: 0.3}'")
    parser.add_argument("--base_model", "--base-model", type=str | None, default=None,
                        help="base model, a diffusers folder or hub id (default: the experts' model cards)")
    parser.add_argument("--data", type=str | None, default=None, help="CoProV2 dataset folder for activation statistics (comerge)")
    parser.add_argument("--num_batches", "--num-batches", type=int, default=8, help="batches of pairs for activation statistics")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=4, help="pairs per activation batch")
    parser.add_argument("--resolution", type=int, default=512, help="image size fed to the VAE")
    parser.add_argument("--seed", type=int, default=0, help="shuffling and noise seed of the activation batches")
    parser.add_argument("--device", type=str | None, default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    return parser


def method_spec(method: str | dict[str, Any], args: dict[str, Any]) -> str | dict[str, Any]:
    """``--method NAME --args {...}`` as one registry spec."""
    if not args:
        return method
    if not isinstance(method, str):
        raise ValueError("--args goes with a method name; put the arguments in the --method spec instead")
    return {"name": method, **args}


def check_options(options: dict[str, Any]) -> None:
    """The activation options, refused before any model is loaded."""
    for key in ("num_batches", "batch_size"):
        if options[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {options[key]}")
    if options["resolution"] < 8 or options["resolution"] % 8:
        raise ValueError(f"--resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {options['resolution']}")


def merge(options: dict[str, Any]) -> dict[str, Any]:
    """Check the experts and options, then for activation-based methods build the base UNet and its inputs, and merge."""
    from safetydpo.merging.files import plan_merge, run_merge
    from safetydpo.devices import resolve_device
    from safetydpo.models.inputs import base_model_inputs

    check_options(options)
    plan = plan_merge(options["experts"], options["out"], method_spec(options["method"], options["args"]), options["base_model"])
    unet = inputs = None
    if plan.method.needs_activations:
        if not plan.base_model or not options["data"]:
            raise ValueError(f"{plan.method.registry_name} needs the base model (--base-model or the experts' cards) and --data DATASET_DIR")
        if not Path(options["data"]).is_dir():
            raise FileNotFoundError(f"--data {options['data']} is not a dataset folder; build one with safetydpo data build")
        device = resolve_device(options["device"], "--device")
        unet, inputs = base_model_inputs(
            plan.base_model, options["data"], options["num_batches"], options["batch_size"], options["resolution"], options["seed"], device
        )
    return run_merge(plan, unet=unet, inputs=inputs)


def run(argv: list[str]) -> None:
    from safetydpo.cli.run import fail

    parser = merge_parser()
    try:
        options = parser.parse_args(argv).as_dict()
        options.pop("config", None)
        card = merge(options)
    except Exception as err:  # jsonargparse's errors, unreadable files, mismatched experts, bad data: one line
        fail(PROG, err)
        return
    shares = card.get("contribution_share")
    print(f"wrote {options['out']} ({card['method']})" + (f"; weight share per expert: {shares}" if shares else ""))
