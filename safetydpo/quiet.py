"""Library messages that are expected in SafetyDPO's use, silenced where our code triggers them.

Each call site says why its message is expected. ``safetydpo --verbose`` (or ``SAFETYDPO_VERBOSE=1``)
installs none of these filters, so everything the libraries print shows again; a warning that no
pattern names always shows.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

from safetydpo.progress import is_terminal

#: Set to a non-empty value other than ``0`` to see every library message (``safetydpo --verbose`` sets it).
VERBOSE_ENV = "SAFETYDPO_VERBOSE"


def verbose() -> bool:
    """Whether the user asked for every library message."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


class _DropMatching(logging.Filter):
    """Drops records whose message matches one of the patterns (regular expressions, searched)."""

    def __init__(self) -> None:
        super().__init__()
        self.patterns: list[re.Pattern[str]] = []

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(pattern.search(message) for pattern in self.patterns)


_log_filters: dict[str, _DropMatching] = {}


def drop_log_messages(logger: str, *patterns: str) -> None:
    """Drop ``logger``'s records matching any of ``patterns`` (unless verbose); repeated calls add nothing twice."""
    if verbose():
        return
    if logger not in _log_filters:
        _log_filters[logger] = _DropMatching()
        logging.getLogger(logger).addFilter(_log_filters[logger])
    known = {pattern.pattern for pattern in _log_filters[logger].patterns}
    _log_filters[logger].patterns += [re.compile(pattern) for pattern in patterns if pattern not in known]


def ignore_warnings(*patterns: str, category: type[Warning] = Warning) -> None:
    """Ignore warnings whose message starts with a match of any of ``patterns`` (unless verbose).

    Called where the warning arises, every time, so the filter is back after a ``catch_warnings`` block reset it.
    """
    if verbose():
        return
    for pattern in patterns:  # filterwarnings replaces an identical filter rather than adding a second one
        warnings.filterwarnings("ignore", message=pattern, category=category)


def hide_library_bars() -> None:
    """In a log (stderr not a terminal), hide the weight-loading bars of transformers, diffusers and the hub.

    In a file each bar is a run of carriage-return redraws with nothing to watch; our own progress
    (safetydpo.progress) still writes its lines. On a terminal, or verbose, nothing changes.
    """
    if verbose() or is_terminal(sys.stderr):
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
