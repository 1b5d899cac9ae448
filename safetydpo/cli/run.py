"""``safetydpo run --config configs/pipelines/NAME.yaml``: the whole method from one config (see docs/pipeline.md)."""

from __future__ import annotations

import sys
from dataclasses import fields

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace, set_parsing_settings

from safetydpo.io import read_yaml
from safetydpo.quiet import verbose
from safetydpo.pipeline.config import STAGES, PipelineConfig, from_dict, unknown_key
from safetydpo.pipeline.runner import run_pipeline
from safetydpo.pipeline.stages import PipelineError, condense_parse_error


def pipeline_parser(prog: str, description: str) -> ArgumentParser:
    """The pipeline's keys (documented by the dataclass attribute docstrings) plus --from/--only/--dry-run."""
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(prog=prog, description=description, parser_mode="omegaconf+", exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="pipeline YAML, e.g. configs/pipelines/toyworld.yaml")
    parser.add_class_arguments(PipelineConfig, fail_untyped=True, sub_configs=True)
    parser.add_argument("--from", type=str | None, default=None, help=f"start at this stage ({', '.join(STAGES)}); earlier ones must be done")
    parser.add_argument("--only", type=str | None, default=None, help="run only this stage")
    parser.add_argument("--dry_run", "--dry-run", action="store_true", help="print the resolved plan (stages, commands, outputs) and stop")
    return parser


def config_files(argv: list[str]) -> list[str]:
    """The files given as ``--config FILE`` or ``--config=FILE``."""
    found = [value for flag, value in zip(argv, argv[1:]) if flag == "--config"]
    return found + [word.split("=", 1)[1] for word in argv if word.startswith("--config=")]


def check_config_file(path: str) -> None:
    """A pipeline file that exists, is a YAML mapping and holds only known keys, else one line naming it."""
    data = read_yaml(path, "pipeline config", PipelineError)
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: a pipeline config is a mapping of keys ({', '.join(f.name for f in fields(PipelineConfig))})")
    problem = unknown_key(data)
    if problem:
        raise PipelineError(f"{path}: {problem}")


def parse(parser: ArgumentParser, argv: list[str]) -> tuple[PipelineConfig, Namespace]:
    """The checked PipelineConfig and the run options; a bad key or value is a one-line PipelineError."""
    for path in config_files(argv):
        check_config_file(path)
    try:
        namespace = parser.parse_args(argv)
    except Exception as err:  # jsonargparse's ArgumentError, or a config file that fails to load
        raise PipelineError(condense_parse_error(str(err))) from None
    values = namespace.as_dict()
    return from_dict({f.name: values[f.name] for f in fields(PipelineConfig)}), namespace


def fail(prog: str, err: BaseException) -> None:
    """Print one line (or the traceback with SAFETYDPO_VERBOSE=1) and exit with status 2."""
    if verbose():
        raise err
    sys.stderr.write(f"{prog}: error: {' '.join(str(err).split())}\n")
    raise SystemExit(2)


def execute(prog: str, parser: ArgumentParser, argv: list[str]) -> tuple[PipelineConfig, Namespace]:
    """Parse ``argv`` and run the pipeline it describes; errors end the process with one line."""
    try:
        config, options = parse(parser, argv)
        run_pipeline(config, start=options["from"], only=options["only"], dry_run=options["dry_run"])
    except PipelineError as err:
        fail(prog, err)
    return config, options


def run(argv: list[str]) -> None:
    parser = pipeline_parser(
        "safetydpo run",
        "Run a pipeline: build or import the CoProV2 data, train one DPO expert per category (each a `safetydpo fit`), "
        "merge them, evaluate base vs aligned, and write OUTPUT/report.md. Finished steps are skipped on a rerun.",
    )
    config, options = execute("safetydpo run", parser, argv)
    if not options["dry_run"] and config.evaluate.config is not None:
        print(f"report: {config.output}/report.md")
