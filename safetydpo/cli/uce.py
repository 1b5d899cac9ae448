"""``safetydpo uce``: the closed-form UCE edit of a base model, written as a LoRA (see docs/baselines.md)."""

from __future__ import annotations

from jsonargparse import ActionConfigFile, ArgumentParser

PROG = "safetydpo uce"


def uce_parser() -> ArgumentParser:
    """UCE's fields as options (their docstrings are the help); every option also reads from ``--config uce.yaml``."""
    from jsonargparse import set_parsing_settings

    from safetydpo.baselines.uce import UCE

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(prog=PROG, description="Erase concepts by UCE's closed-form cross-attention edit; writes a LoRA.",
                            exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the keys below")
    parser.add_argument("--base_model", "--base-model", type=str, required=True, help="SD 1.x/2.x diffusers pipeline folder or hub id")
    parser.add_argument("--out", type=str, required=True, help="LoRA path (.safetensors); its .json model card is written beside it")
    parser.add_class_arguments(UCE, fail_untyped=True)
    return parser


def run(argv: list[str]) -> None:
    from safetydpo.baselines.base import run_edit
    from safetydpo.baselines.uce import UCE
    from safetydpo.cli.run import fail

    try:
        options = uce_parser().parse_args(argv).as_dict()
        options.pop("config", None)
        base_model, out = options.pop("base_model"), options.pop("out")
        path = run_edit(UCE(**options), base_model, out)
    except Exception as err:  # jsonargparse's errors, bad concepts, a model UCE does not edit: one line
        fail(PROG, err)
        return
    print(f"wrote {path} (uce: {len(options['concepts'])} concepts erased, {len(options['keep'])} kept)")
