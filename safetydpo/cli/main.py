"""Command-line entry points: ``safetydpo`` and ``lightning`` (LightningCLI in subclass mode)."""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentError

import safetydpo
from safetydpo.lightning_cli import SafetyDPOCLI, own_argv
from safetydpo.quiet import VERBOSE_ENV, hide_library_bars, verbose
from safetydpo.registry import Registry, restrict_config_imports

#: The project's own subcommands (module in safetydpo.cli with a ``run(argv)``, summary); everything
#: else goes to LightningCLI (fit/validate/test/predict). Modules load on use, keeping start-up light.
PROJECT_COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("run", "a whole pipeline from one config: data, experts, merge, evaluate, report (resumable)"),
    "demo": ("demo", "the ToyWorld pipeline (configs/pipelines/toyworld.yaml) with its before/after table"),
    "tiny": ("quickstart", "write a tiny SD pipeline and synthetic pairs for a CPU run"),
    "toyworld": ("toyworld", "pretrain / check the embedded ToyWorld model and judge"),
    "merge": ("merge", "merge expert LoRA files with Co-Merge or a baseline (the merges listed below)"),
    "uce": ("uce", "the UCE concept-erasure baseline: a closed-form cross-attention edit written as a LoRA"),
    "evaluate": ("evaluate", "IP (Q16/NudeNet), FID and CLIPScore of base vs aligned models, with reports"),
    "attack": ("attack", "an evaluation config's red-teaming attacks alone: JSONL caches, or a replay check (transfer)"),
    "data": ("data", "build, inspect or import CoProV2-format datasets (prompt pairs + paired renders)"),
}


#: Where the project's own ``raise`` statements live (a ValueError raised there is a message for the user).
_PACKAGE_DIR = str(Path(safetydpo.__file__).parent)


def is_user_error(err: BaseException) -> bool:
    """An error the user fixes in the input: a project error class, or a ValueError, FloatingPointError or
    OSError raised by the project's own code (its messages name the culprit), anywhere in the chain."""
    while err is not None:
        if type(err).__module__.split(".")[0] == "safetydpo":
            return True
        frames = traceback.extract_tb(err.__traceback__)
        if isinstance(err, (ValueError, FloatingPointError, OSError)) and frames and frames[-1].filename.startswith(_PACKAGE_DIR):
            return True
        err = err.__cause__
    return False


def lightning_main(argv: list[str] | None = None, prog: str = "lightning") -> None:
    """``lightning fit --config expert.yaml``: the command users know from Lightning's CLI docs.

    A bad key or value, and a project error (dataset, resume, allow-list, NaN loss), end the run with
    one line and status 2 (``--verbose`` / SAFETYDPO_VERBOSE=1: the traceback).
    """
    from safetydpo.cli.run import fail

    words = sys.argv[1:] if argv is None else argv
    prog = f"{prog} {words[0]}" if words and not words[0].startswith("-") else prog
    try:
        with nullcontext() if argv is None else own_argv():  # LightningCLI reads sys.argv when given no args
            SafetyDPOCLI(args=argv, parser_kwargs={"exit_on_error": False})
    except ArgumentError as err:
        from safetydpo.pipeline.stages import condense_parse_error

        fail(prog, err if verbose() else ValueError(condense_parse_error(str(err))))
    except Exception as err:
        if not is_user_error(err):
            raise
        fail(prog, err)


def registries() -> dict[str, Registry[Any]]:
    """Every registry, by the label ``--help`` shows (tests/test_docs.py fails when a ``Registry`` in the package is missing)."""
    from safetydpo.attacks import ATTACKS
    from safetydpo.baselines import BASELINES
    from safetydpo.data.builder.generators import GENERATORS
    from safetydpo.evaluation.classifiers import CLASSIFIERS
    from safetydpo.evaluation.fid import FEATURE_EXTRACTORS
    from safetydpo.evaluation.prompts import PROMPT_SOURCES
    from safetydpo.losses import LOSSES
    from safetydpo.merging import MERGES
    from safetydpo.models.denoisers import DENOISERS
    from safetydpo.pipeline.extensions import ASSETS, REPORT_SECTIONS

    return {
        "losses": LOSSES, "merges": MERGES, "classifiers": CLASSIFIERS, "prompt sources": PROMPT_SOURCES,
        "pair generators": GENERATORS, "FID feature extractors": FEATURE_EXTRACTORS,
        "evaluation assets": ASSETS, "report sections": REPORT_SECTIONS, "baselines": BASELINES,
        "attacks": ATTACKS, "model families": DENOISERS,
    }


def registered_names() -> dict[str, list[str]]:
    """Every registry's names (plugins included), read from the registries themselves."""
    return {kind: registry.names() for kind, registry in registries().items()}


def help_text() -> str:
    """``safetydpo --help``: the commands, then every registered name a config can use."""
    lines = ["usage: safetydpo [--verbose] COMMAND ...   (--verbose: show the library messages silenced as expected)", "",
             "SafetyDPO commands:", *(f"  {name:<10} {summary}" for name, (_, summary) in PROJECT_COMMANDS.items())]
    lines += ["  fit, validate, test, predict: LightningCLI (see below)", "", "Registered names (usable in configs):"]
    lines += [f"  {kind}: {', '.join(names)}" for kind, names in registered_names().items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """``safetydpo``: the project's own subcommands, else LightningCLI (``argv=None`` reads sys.argv)."""
    words = sys.argv[1:] if argv is None else list(argv)
    if words and words[0] == "--verbose":
        os.environ[VERBOSE_ENV] = "1"  # read where each library message is silenced (safetydpo.quiet)
        words = words[1:]
        if argv is None:  # LightningCLI reads sys.argv itself (and warns when given both)
            sys.argv = [sys.argv[0], *words]
    hide_library_bars()
    restrict_config_imports()  # every command's config parser, not only fit's (docs/configuration.md)
    if words and words[0] in PROJECT_COMMANDS:
        importlib.import_module(f"safetydpo.cli.{PROJECT_COMMANDS[words[0]][0]}").run(words[1:])
        return
    if not words or words[0] in ("-h", "--help"):
        print(help_text())
    lightning_main(None if argv is None else words, prog="safetydpo")
