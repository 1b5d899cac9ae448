"""Training progress counted in optimizer steps, readable on a terminal and in a log file alike."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar
from tqdm.auto import tqdm

from safetydpo.progress import elapsed, is_terminal

#: ``callback_metrics`` key -> short name in the bar and the lines (logged by DPOExpertModule).
SHOWN_METRICS = {"loss": "loss", "implicit_accuracy": "acc", "reward_margin": "margin", "anchor_drift": "drift"}


class StepProgress(ProgressBar):
    """Replaces Lightning's bar, which counts epochs (a step-limited run showed ``Epoch 66/-2``).

    On a terminal: one bar per expert, ``expert hate 40/400``, with loss, implicit accuracy, reward
    margin (and anchor drift). Otherwise (CI, ``> log``): one flushed line every ``every_n_steps``
    optimizer steps, after each validation and at the end, with elapsed time and ETA. Only global rank 0
    prints.
    """

    def __init__(self, every_n_steps: int = 50, terminal: bool | None = None) -> None:
        """``terminal``: force the bar (``True``) or the lines (``False``); ``None`` asks whether stdout is a terminal."""
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"StepProgress every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.terminal = terminal
        self._enabled = True
        self._bar: tqdm | None = None
        self._name = "training"
        self._total = 0
        self._first_step = 0
        self._last_step = -1
        self._start = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled and self.trainer.is_global_zero

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.is_enabled:
            return
        category = pl_module.hparams.get("category")
        self._name = f"expert {category}" if category else "training"
        total = trainer.estimated_stepping_batches  # max_steps, or fewer when max_epochs ends the run first
        self._total = int(total) if math.isfinite(total) else 0  # 0: no limit known, no ETA
        self._first_step = self._last_step = trainer.global_step
        self._start = time.perf_counter()
        if self.terminal if self.terminal is not None else is_terminal():
            self._bar = tqdm(total=self._total or None, initial=trainer.global_step, desc=self._name, unit="step", file=sys.stdout, dynamic_ncols=True)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if not self.is_enabled or step == self._last_step:  # a batch accumulated into the next step
            return
        self._last_step = step
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix_str(self._metrics(trainer, "train"), refresh=True)
        elif step % self.every_n_steps == 0 and not 0 < self._total <= step:
            self._line(trainer, "train")

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.is_enabled and not trainer.sanity_checking:
            message = f"{self._name}: validation at step {trainer.global_step}: {self._metrics(trainer, 'val')}"
            (self._bar.write if self._bar is not None else print)(message)
            sys.stdout.flush()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.is_enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._line(trainer, "train")

    def _metrics(self, trainer: Trainer, stage: str) -> str:
        shown = []
        for key, short in SHOWN_METRICS.items():
            value = trainer.callback_metrics.get(f"{stage}/{key}")
            if value is not None:
                shown.append(f"{short} {float(value):.3f}")
        return " · ".join(shown) or "no metrics yet"

    def _line(self, trainer: Trainer, stage: str) -> None:
        step = trainer.global_step
        seconds = time.perf_counter() - self._start
        done = step - self._first_step
        eta = f", ETA {elapsed(seconds / done * (self._total - step))}" if 0 < done and step < self._total else ""
        of_total = f"/{self._total}" if self._total else ""
        print(f"{self._name}: step {step}{of_total} · {self._metrics(trainer, stage)} · {elapsed(seconds)}{eta}", flush=True)
