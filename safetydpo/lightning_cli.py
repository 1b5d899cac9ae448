"""The training command's parser: LightningCLI in subclass mode, shared by ``safetydpo fit`` and the pipeline.

The pipeline parses each expert's config stack with exactly this class (``parse_fit_config``), so a
pipeline expert and a hand-run ``safetydpo fit`` read the same keys, defaults and links.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

from jsonargparse import Namespace
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from safetydpo.callbacks.progress import StepProgress
from safetydpo.quiet import drop_log_messages
from safetydpo.registry import TRUSTED_IMPORTS_ENV, restrict_config_imports, trusted_imports

#: ``model.init_args.category`` value of the expert trained on every category at once (the all-single ablation).
ALL_CATEGORIES = "all"


def categories_for(category: str | None) -> list[str] | None:
    """The data filter an expert's category implies: its own category, or every category (``None``)."""
    return None if category in (None, ALL_CATEGORIES) else [category]


def anchors_for(anchor_weight: float) -> bool:
    """Anchors are served exactly when the anchor term is on."""
    return anchor_weight > 0


class _TrustingParser(LightningArgumentParser):
    """Says how to trust a package when a config names a class outside the trusted ones (jsonargparse's
    own advice, a ``set_parsing_settings`` call, is for programs, not for users of this command)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if "import path denylist" in message:
            message = re.sub(
                r"Add the import path to import_path_allowlist in set_parsing_settings to allow it\.?",
                f"Configs may only name classes of {', '.join(trusted_imports())}; to trust your own package, "
                f"set {TRUSTED_IMPORTS_ENV}=PACKAGE (see docs/configuration.md).",
                message,
            )
        super().error(message, ex)


class SafetyDPOCLI(LightningCLI):
    """LightningCLI where ``model`` and ``data`` take a class_path (subclass mode), OmegaConf interpolation on.

    Class paths (and callables, types) in configs are imported only from trusted packages (see
    :func:`safetydpo.registry.restrict_config_imports`), so a shared YAML cannot run code.

    Two values follow from the model and are linked, so no config repeats them: the DataModule's
    ``categories`` from the expert's ``category``, and its ``anchors`` from ``anchor_weight > 0``.
    """

    def __init__(self, args: Sequence[str] | None = None, run: bool = True, parser_kwargs: dict[str, Any] | None = None) -> None:
        # Lightning's advertisements for its cloud products, printed by every fit.
        drop_log_messages("lightning.pytorch.utilities.rank_zero", r"^💡 Tip: ")
        restrict_config_imports()
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_class=_TrustingParser,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"parser_mode": "omegaconf", **(parser_kwargs or {})},
            args=None if args is None else list(args),
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.init_args.category", "data.init_args.categories", compute_fn=categories_for)
        parser.link_arguments("model.init_args.anchor_weight", "data.init_args.anchors", compute_fn=anchors_for)

    def _parse_ckpt_path(self) -> None:
        """Keep the config's model arguments on ``--ckpt_path`` (Lightning replaces them with the checkpoint's).

        The checkpoint's are checked against them when it is restored (``resume_with_config``): a
        mismatch that changes the model is an error, any other difference is the config's to make.
        """

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        """Add :class:`StepProgress` (steps, not epochs; lines in a log file) unless a bar is configured or disabled."""
        configured = config.get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        has_bar = any(isinstance(callback, ProgressBar) for callback in [*configured, *callbacks])
        if config.get("enable_progress_bar") is not False and not has_bar:
            callbacks = [*callbacks, StepProgress()]
        return super()._instantiate_trainer(config, callbacks)


class _ParseOnlyCLI(SafetyDPOCLI):
    """Parses and links a fit config without building the model, the data or the trainer, or seeding."""

    def _set_seed(self) -> None:
        """Planning must not reseed the process: the fit run seeds itself when it starts."""

    def instantiate_classes(self) -> None:
        pass


@contextmanager
def _own_argv() -> Iterator[None]:
    """LightningCLI warns when called with ``args`` while ``sys.argv`` holds another command's words."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


def parse_fit_config(args: Sequence[str]) -> tuple[LightningArgumentParser, Namespace]:
    """The parser and parsed namespace of ``safetydpo fit ARGS`` (without the subcommand); raises on bad input."""
    with _own_argv():
        cli = _ParseOnlyCLI(args=args, run=False, parser_kwargs={"exit_on_error": False})
    return cli.parser, cli.config


def run_fit(args: Sequence[str]) -> None:
    """``safetydpo fit ARGS`` in this process."""
    with _own_argv():
        SafetyDPOCLI(args=["fit", *args])
