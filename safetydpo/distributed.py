"""Several processes for the commands that only make files (``data build``, ``evaluate``), on Lightning Fabric.

Rendering has no gradients to all-reduce, so Fabric is used only for what such a job needs from it: start
the processes (its own launcher on one machine) or join those a launcher started (torchrun, SLURM
``srun``), put each rank on its device, and give a barrier and a broadcast. Work is split by global
rank and each rank writes the files it makes; rank 0 alone holds the output's lock and writes what is
shared (a build's manifest, results.json), after the other ranks have finished.

Every step that can fail is run so that all ranks learn of the failure: a check done on rank 0 sends its
error to the others, and a rank whose own work fails hands the error to the others at the next meeting
point, so every rank stops with the same one-line message instead of waiting for one that is gone.
"""

from __future__ import annotations

import atexit
import pickle
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar, cast

import torch
import torch.distributed

T = TypeVar("T")


@dataclass
class DistributedConfig:
    """Processes for rendering: the ``trainer`` keys of ``configs/expert_ddp.yaml``; 1 device x 1 node runs in this process."""

    accelerator: str = "auto"
    """Lightning accelerator of every rank: ``auto``, ``gpu``/``cuda`` or ``cpu`` (CPU ranks talk over gloo)."""
    devices: int = 1
    """Processes per node, one device each; must match the launcher (``--nproc-per-node``, ``--ntasks-per-node``)."""
    num_nodes: int = 1
    """Nodes; must match the launcher (``--nnodes``, ``--nodes``)."""
    strategy: str = "ddp"
    """``ddp``: one process per device, started by Fabric on one machine or joined from torchrun / ``srun``."""
    timeout_minutes: float = 120.0
    """How long a rank waits for the others at a barrier (rank 0 generates pairs or scores images meanwhile)."""

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes

    def check(self, key: str, error: type[ValueError]) -> None:
        """Refuse values no launch can use; ``key`` names the config section in the one-line error."""
        for name, value in (("devices", self.devices), ("num_nodes", self.num_nodes)):
            if value < 1:
                raise error(f"{key}.{name} must be >= 1, got {value}")
        if self.strategy != "ddp":
            raise error(f"{key}.strategy '{self.strategy}' is not supported; use ddp (rendering shards nothing, one process per device)")
        if self.timeout_minutes <= 0:
            raise error(f"{key}.timeout_minutes must be > 0, got {self.timeout_minutes}")


class Ranks:
    """The processes of one command; without Fabric (one process) every method runs its work here and now."""

    def __init__(self, fabric: Any = None) -> None:
        self.fabric = fabric

    @property
    def world_size(self) -> int:
        return self.fabric.world_size if self.fabric is not None else 1

    @property
    def rank(self) -> int:
        return self.fabric.global_rank if self.fabric is not None else 0

    @property
    def is_zero(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device | None:
        """The rank's device under Fabric (``cuda:<local rank>``, ``cpu``); ``None``: the command's own device setting."""
        return self.fabric.device if self.fabric is not None else None

    def share(self, value: T) -> T:
        """Rank 0's ``value`` on every rank (picklable, small: rows, paths, a payload)."""
        return self.fabric.broadcast(value, src=0) if self.fabric is not None else value

    def on_zero(self, work: Callable[[], T]) -> T | None:
        """Run ``work`` on rank 0 alone; its error is raised on every rank. Returns its result on rank 0, ``None`` elsewhere."""
        if self.fabric is None:
            return work()
        result, failure = None, None
        if self.is_zero:
            try:
                result = work()
            except Exception as err:  # sent on, so that the other ranks do not wait for a rank that stopped
                failure = err
        sent = self.share(_portable(failure))
        if failure is not None:
            raise failure
        if sent is not None:
            raise sent from None
        return result

    def on_all(self, work: Callable[[], T]) -> T:
        """Run ``work`` on every rank, then wait for all; if any failed, every rank raises the lowest failing rank's error."""
        if self.fabric is None:
            return work()
        result, failure = None, None
        try:
            result = work()
        except Exception as err:
            failure = err
        failures: list[Exception | None] = [None] * self.world_size
        torch.distributed.all_gather_object(failures, _portable(failure))
        failed = [rank for rank, sent in enumerate(failures) if sent is not None]
        if failed and failure is not None and failed[0] == self.rank:
            raise failure
        if failed:
            raise cast(Exception, failures[failed[0]]) from None
        return result  # type: ignore[return-value]  # no failure anywhere: work returned

    @contextmanager
    def held_by_zero(self, hold: Callable[[], AbstractContextManager[Any]]) -> Iterator[None]:
        """Rank 0 holds ``hold()`` (an output lock) for the whole block; a refusal is the same error on every rank."""
        with ExitStack() as stack:
            self.on_zero(lambda: stack.enter_context(hold()))
            yield


def _portable(failure: Exception | None) -> Exception | None:
    """``failure`` if it survives the pickling a broadcast does, else a RuntimeError with its message (a rank must never
    fail while telling the others that it failed)."""
    if failure is None:
        return None
    try:
        pickle.loads(pickle.dumps(failure))
        return failure
    except Exception:
        return RuntimeError(f"{type(failure).__name__}: {failure}")


def launch(config: DistributedConfig, key: str, error: type[ValueError]) -> Ranks:
    """One process for 1 device x 1 node; otherwise start or join the ranks with Fabric (``key``: the config section)."""
    config.check(key, error)
    if config.world_size == 1:
        return Ranks()
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        fabric = Fabric(
            accelerator=config.accelerator,
            devices=config.devices,
            num_nodes=config.num_nodes,
            strategy=DDPStrategy(timeout=timedelta(minutes=config.timeout_minutes)),
        )
        fabric.launch()
    # e.g. accelerator gpu without CUDA, more devices than there are, devices unlike torchrun's --nproc-per-node
    except (MisconfigurationException, ValueError, RuntimeError) as err:
        raise error(f"{key}: {' '.join(str(err).split())}") from None
    # A process group still alive when the interpreter exits can abort the process after its work is done
    # (gloo: "terminate called without an active exception", SIGABRT), so a finished command ends it first.
    atexit.register(_end_group)
    return Ranks(fabric)


def _end_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
