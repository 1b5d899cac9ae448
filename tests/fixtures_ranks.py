"""A rank of a two-process gloo group joined the way torchrun starts one (env variables), for the Ranks tests.

Kept apart from the test module so that the spawned processes import only safetydpo.distributed and Fabric.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetydpo.evaluation.errors import EvaluationError
from safetydpo.locking import LOCK_NAME, output_lock
from safetydpo.distributed import DistributedConfig, launch


def rank_worker(rank: int, port: int, out: str, locked: str) -> None:
    """Each helper of :class:`safetydpo.distributed.Ranks` once, and ``locked`` (a folder another process is writing)
    held by rank 0; what this rank saw goes to ``out/<rank>.json``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE="2")
    ranks = launch(DistributedConfig(accelerator="cpu", devices=2), "distributed", EvaluationError)
    seen: dict[str, object] = {"rank": ranks.rank, "world_size": ranks.world_size}

    def rendered() -> int:
        if ranks.rank == 1:
            raise EvaluationError("rank 1 could not render shard 3")
        return ranks.rank

    def checked() -> str:
        raise EvaluationError("output was built with a different config")

    for name, call in (("on_all", lambda: ranks.on_all(rendered)), ("on_zero", lambda: ranks.on_zero(checked))):
        try:
            call()
        except EvaluationError as err:
            seen[name] = str(err)
    try:
        with ranks.held_by_zero(lambda: output_lock(Path(locked) / LOCK_NAME, "build", EvaluationError)):
            seen["lock"] = "not refused"
    except EvaluationError as err:
        seen["lock"] = str(err)
    seen["share"] = ranks.share({"pending": [1, 3]} if ranks.is_zero else None)
    seen["on_all_ok"] = ranks.on_all(lambda: ranks.rank * 10)
    Path(out, f"{rank}.json").write_text(json.dumps(seen))
