"""A pipeline step run as a ``safetydpo`` process of its own, so that several can train at once.

Torch on a CPU splits one small network's operations over threads less well than separate processes
split whole networks (docs/performance.md), and a process of its own also keeps Lightning's
per-process state (signal handlers, the global seed) apart.
"""

from __future__ import annotations

import os
import subprocess
import sys

#: What the child's one-line error starts with (``safetydpo.cli.run.fail``), left out when it is passed on.
_ERROR_MARK = ": error: "


def run_child(args: list[str], name: str, threads: int) -> None:
    """Run ``safetydpo ARGS`` with ``threads`` CPU threads, passing its output on line by line as ``[NAME] line``.

    A child that fails raises its own last line (its one-line error) as a ValueError, which the runner names the step in.
    """
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    last = ""
    with subprocess.Popen(
        [sys.executable, "-m", "safetydpo.cli", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, text=True, errors="replace", bufsize=1,
    ) as child:
        assert child.stdout is not None
        for line in child.stdout:
            line = line.rstrip("\n")
            if line.strip():
                last = line
                print(f"[{name}] {line}", flush=True)
    if child.returncode != 0:
        message = last.split(_ERROR_MARK, 1)[-1] if _ERROR_MARK in last else last
        raise ValueError(message or f"safetydpo {args[0]} exited with status {child.returncode} and printed nothing")
