"""How progress is written, shared by the pipeline's stage lines and the training progress callback."""

from __future__ import annotations

import sys
from typing import TextIO


def elapsed(seconds: float) -> str:
    """``4 min 07 s`` or ``3.4 s``: a duration as the progress lines print it."""
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{seconds:.1f} s"


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default stdout) is a terminal, where a redrawn bar reads well; a log file gets lines."""
    stream = sys.stdout if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())
