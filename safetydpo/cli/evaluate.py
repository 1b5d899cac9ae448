"""``safetydpo evaluate``: IP, FID and CLIPScore of base and aligned models (see docs/evaluation.md)."""

from __future__ import annotations

from typing import Any

from jsonargparse import ArgumentError, ArgumentParser, Namespace

PROG = "safetydpo evaluate"


class EvaluateParser(ArgumentParser):
    """jsonargparse's help names list entries only by type; this one also lists their keys (``models[].lora``)."""

    def format_help(self) -> str:
        from safetydpo.evaluation.config import entries_help

        heading = "Keys of list entries (in the YAML file; override one by its index: models.1.lora=x.safetensors):"
        return f"{super().format_help()}\n{heading}\n\n{entries_help()}"


def evaluate_parser() -> ArgumentParser:
    """``--config``, ``--convert-q16``, ``key=value`` overrides, and every config key as ``--key value``."""
    from safetydpo.evaluation.config import add_config_arguments

    parser = EvaluateParser(
        prog=PROG,
        description="Render every model on every prompt set (reusing cached images), then write "
        "OUTPUT_DIR/results.json, OUTPUT_DIR/report.md and OUTPUT_DIR/grids/*.png. Options after --config override "
        "its keys (a list given as an option replaces the file's); key=value overrides reach list entries by index.",
        exit_on_error=False,
    )
    parser.add_argument("--config", type=str | None, default=None, help="evaluation YAML, e.g. configs/eval.yaml")
    parser.add_argument(
        "--convert-q16",
        nargs=2,
        metavar=("PICKLE", "SAFETENSORS"),
        default=None,
        help="one-time conversion of Q16's prompts.p into the safetensors file ip.classifier_args.q16.prompts names",
    )
    parser.add_argument(
        "overrides", nargs="*", type=str, default=[], help="key=value overrides, e.g. models.1.lora=x.safetensors generation.seed=3"
    )
    return add_config_arguments(parser)


def _plain(value: Any) -> Any:
    """A parsed option value with jsonargparse's Namespaces (list entries given as options) as dicts."""
    if isinstance(value, Namespace):
        return value.as_dict()
    return [_plain(item) for item in value] if isinstance(value, list) else value


def run(argv: list[str]) -> None:
    # Imported here: CLIP, clean-fid and NudeNet's ONNX runtime would slow every other subcommand's start.
    from safetydpo.evaluation.config import load_config
    from safetydpo.evaluation.errors import EvaluationError
    from safetydpo.evaluation.q16_prompts import convert_q16_prompts
    from safetydpo.evaluation.runner import evaluate

    parser = evaluate_parser()
    try:
        given = parser.parse_args(argv, defaults=False)  # only what the command line sets: the file supplies the rest
    except ArgumentError as err:  # its message can span lines
        parser.exit(2, f"{PROG}: error: {' '.join(str(err).split())}\n")
    config_path, convert, overrides = given.pop("config", None), given.pop("convert_q16", None), given.pop("overrides", [])
    options = {key: _plain(value) for key, value in given.items()}
    if (config_path is None) == (convert is None):
        parser.exit(2, f"{PROG}: error: give exactly one of --config FILE and --convert-q16 PICKLE SAFETENSORS\n")
    try:
        if convert is not None:
            if options or overrides:
                raise EvaluationError("--convert-q16 takes no config keys")
            print(f"wrote {convert_q16_prompts(*convert)}")
            return
        config = load_config(config_path, overrides, options)
        evaluate(config)
    except EvaluationError as err:
        parser.exit(2, f"{PROG}: error: {err}\n")
    print(f"wrote {config.output_dir}/results.json, {config.output_dir}/report.md and {config.output_dir}/grids/")
