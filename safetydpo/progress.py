"""How progress is written: a redrawn bar on a terminal, flushed lines in a log (CI, ``> log``, SLURM output).

tqdm redraws its bar with carriage returns, which a log file keeps as one ever-growing line that
shows up late; :func:`progress_bar` gives tqdm on a terminal and :class:`LineProgress` (same interface:
iterate, ``update``, ``close``, context manager) otherwise.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm.auto import tqdm

#: Seconds between two lines of a :class:`LineProgress` (the first and the last line are always written).
LINE_INTERVAL = 30.0


def elapsed(seconds: float) -> str:
    """``4 min 07 s`` or ``3.4 s``: a duration as the progress lines print it."""
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{seconds:.1f} s"


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default stdout) is a terminal, where a redrawn bar reads well; a log file gets lines."""
    stream = sys.stdout if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


class LineProgress:
    """tqdm's interface as lines: ``render: 128/384 pair · 49.2 s, ETA 1 min 36 s`` at most every ``interval`` seconds."""

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        initial: int = 0,
        interval: float = LINE_INTERVAL,
        stream: TextIO | None = None,
    ) -> None:
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)  # type: ignore[arg-type]
        self.desc, self.unit, self.n, self.interval = desc, unit, initial, interval
        self.stream = stream or sys.stderr
        self._initial = initial
        self._start = time.monotonic()
        self._last_line = -float("inf")
        self._last_n: int | None = None
        self._closed = False

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None, "LineProgress was given no iterable"
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self._last_line >= self.interval:
            self._line()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.n != self._last_n:  # the last update already wrote this count
                self._line()

    def _line(self) -> None:
        now = time.monotonic()
        self._last_line, self._last_n = now, self.n
        spent = now - self._start
        count = f"{self.n}/{self.total}" if self.total else str(self.n)
        line = f"{self.desc}: {count} {self.unit} · {elapsed(spent)}"
        done = self.n - self._initial
        if self.total and 0 < done and self.n < self.total:
            line += f", ETA {elapsed(spent / done * (self.total - self.n))}"
        print(line, file=self.stream, flush=True)


def progress_bar(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "", unit: str = "it", initial: int = 0) -> Any:
    """A tqdm bar when stderr is a terminal, else a :class:`LineProgress` writing lines to stderr."""
    if is_terminal(sys.stderr):
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial)
