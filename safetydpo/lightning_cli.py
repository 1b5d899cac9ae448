"""The training command's parser: LightningCLI in subclass mode, shared by ``safetydpo fit`` and the pipeline.

The pipeline parses each expert's config stack with exactly this class (``parse_fit_config``), so a
pipeline expert and a hand-run ``safetydpo fit`` read the same keys, defaults and links.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, NoReturn

from jsonargparse import Namespace
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.fabric.utilities.exceptions import MisconfigurationException

from safetydpo.callbacks.progress import StepProgress
from safetydpo.checkpointing import check_free_space
from safetydpo.locking import LOCK_NAME, output_lock
from safetydpo.losses import needs_anchors
from safetydpo.quiet import drop_log_messages
from safetydpo.registry import TRUSTED_IMPORTS_ENV, restrict_config_imports, trusted_imports

#: ``model.init_args.category`` value of the expert trained on every category at once (the all-single ablation).
ALL_CATEGORIES = "all"


def categories_for(category: str | None) -> list[str] | None:
    """The data filter an expert's category implies: its own category, or every category (``None``)."""
    return None if category in (None, ALL_CATEGORIES) else [category]


def anchors_for(loss: Any, anchor_weight: float) -> bool:
    """Anchors are served exactly when the anchor term is on: ``anchor_weight > 0`` or an ``anchor`` term in ``loss``."""
    return needs_anchors(loss.as_dict() if isinstance(loss, Namespace) else loss, anchor_weight)


class FitConfigError(ValueError):
    """A config value that its class refused when built, with the config key of that class."""


def _root_cause(err: BaseException) -> BaseException:
    """The innermost exception jsonargparse and Lightning wrapped (``raise ... from``)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def _key_of(config: Any, class_path: str, prefix: str = "") -> str | None:
    """The dotted key (``model``, ``trainer.callbacks.1``) of the config entry that names ``class_path``."""
    if isinstance(config, Namespace):
        if config.get("class_path") == class_path:
            return prefix
        items: Iterator[tuple[str, Any]] = iter(vars(config).items())
    elif isinstance(config, list):
        items = ((str(index), value) for index, value in enumerate(config))
    else:
        return None
    for key, value in items:
        found = _key_of(value, class_path, f"{prefix}.{key}" if prefix else key)
        if found is not None:
            return found
    return None


class FitOutputs(Callback):
    """Locks the folders a fit writes run state to, and checks that a checkpoint fits in them, before step 1.

    The folders are ``default_root_dir`` and every checkpoint ``dirpath``, not the exported expert's
    folder (experts of several categories share one); a second run into them fails at once. Taken in
    ``setup``, once the strategy knows the ranks: only global rank 0 locks, the other ranks of a DDP
    run being the same run. A checkpoint holds the trainable weights and AdamW's two moments of each.
    """

    def __init__(self) -> None:
        self._locks = ExitStack()

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero:
            return
        checkpoint_dirs = [str(c.dirpath) for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)]
        checkpoint_dirs = checkpoint_dirs or ([str(trainer.default_root_dir)] if trainer.checkpoint_callbacks else [])
        local = [Path(f).expanduser().resolve() for f in [str(trainer.default_root_dir), *checkpoint_dirs] if "://" not in f]
        for folder in dict.fromkeys(local):  # remote (fsspec URL) folders: no flock there
            self._locks.enter_context(output_lock(folder / LOCK_NAME, "fit"))  # released by on_exception if one is held
        trainable = sum(p.numel() * p.element_size() for p in pl_module.parameters() if p.requires_grad)
        for folder in (Path(f).expanduser() for f in checkpoint_dirs if "://" not in f):
            check_free_space(folder, 3 * trainable + 2**20, "checkpoint")

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._locks.close()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._locks.close()


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
    ``categories`` from the expert's ``category``, and its ``anchors`` from whether the loss has an
    anchor term (``anchor_weight > 0`` or ``{name: anchor}`` in a ``loss`` list).
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
        parser.link_arguments(("model.init_args.loss", "model.init_args.anchor_weight"), "data.init_args.anchors", compute_fn=anchors_for)

    def instantiate_classes(self) -> None:
        """A value a class refuses (``lora.rank: -2``) is a :class:`FitConfigError` naming the entry, not jsonargparse's
        union report around the class's message."""
        try:
            super().instantiate_classes()
        except Exception as err:
            cause = _root_cause(err)
            if not isinstance(cause, (ValueError, TypeError, OSError, MisconfigurationException)):
                raise
            named = re.search(r"class_path='([^']+)'", str(err))
            config = self.config[self.subcommand] if self.subcommand else self.config
            key = _key_of(config, named.group(1)) if named else None
            raise FitConfigError(f"{key} ({named.group(1)}): {cause}" if key and named else str(cause)) from err

    def _parse_ckpt_path(self) -> None:
        """Keep the config's model arguments on ``--ckpt_path`` (Lightning replaces them with the checkpoint's).

        The checkpoint's are checked against them when it is restored (``resume_with_config``): a
        mismatch that changes the model is an error, any other difference is the config's to make.
        """

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        """Add :class:`FitOutputs`, and :class:`StepProgress` (steps, not epochs; lines in a log file) unless a bar is
        configured or disabled."""
        configured = config.get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        has_bar = any(isinstance(callback, ProgressBar) for callback in [*configured, *callbacks])
        if config.get("enable_progress_bar") is not False and not has_bar:
            callbacks = [*callbacks, StepProgress()]
        return super()._instantiate_trainer(config, [*callbacks, FitOutputs()])


class _ParseOnlyCLI(SafetyDPOCLI):
    """Parses and links a fit config without building the model, the data or the trainer, or seeding."""

    def _set_seed(self) -> None:
        """Planning must not reseed the process: the fit run seeds itself when it starts."""

    def instantiate_classes(self) -> None:
        pass


@contextmanager
def own_argv() -> Iterator[None]:
    """LightningCLI warns when called with ``args`` while ``sys.argv`` holds another command's words."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


def parse_fit_config(args: Sequence[str]) -> tuple[LightningArgumentParser, Namespace]:
    """The parser and parsed namespace of ``safetydpo fit ARGS`` (without the subcommand); raises on bad input."""
    with own_argv():
        cli = _ParseOnlyCLI(args=args, run=False, parser_kwargs={"exit_on_error": False})
    return cli.parser, cli.config


def run_fit(args: Sequence[str]) -> None:
    """``safetydpo fit ARGS`` in this process."""
    with own_argv():
        SafetyDPOCLI(args=["fit", *args])
